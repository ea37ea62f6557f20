"""A publish over etcd 3.4's default limits on one transaction (128
operations, 1.5 MiB) is refused by etcd; `publish` says which limit and the
etcd flags that raise it (docs/operations.md "Publishing a table")."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import ROOT
from tests.fleet.fleet import PREFIX, Site, publish

if TYPE_CHECKING:
    from pathlib import Path

    from tests.fleet.etcd import Etcd

pytestmark = pytest.mark.slow


def test_too_many_operations_name_the_flag(etcd: Etcd, tmp_path: Path) -> None:
    site = Site(tmp_path / "site", "127.0.0.1:7001")
    for i in range(130):  # keys of an older table: the publish deletes each
        etcd.put(f"{PREFIX}/files/old/{i}.proto", "")
    done = publish(site, etcd)
    assert done.returncode == 1, done.stdout
    assert "--max-txn-ops" in done.stderr
    assert "nothing written" in done.stderr


def test_too_many_bytes_name_the_flag(etcd: Etcd, tmp_path: Path) -> None:
    site = Site(tmp_path / "site", "127.0.0.1:7001")
    (site.directory / "proto").unlink()
    shutil.copytree(ROOT / "proto", site.directory / "proto")
    with (site.directory / "proto" / "demo" / "im.proto").open("a") as proto:
        proto.write(("// " + "x" * 97 + "\n") * 17_000)  # 1.7 MB
    done = publish(site, etcd)
    assert done.returncode == 1, done.stdout
    assert "--max-request-bytes" in done.stderr
    assert etcd.get_prefix(PREFIX) == {}

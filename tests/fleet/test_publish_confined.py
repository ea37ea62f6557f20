"""`publish` refuses a table that every gateway would refuse: it loads the
keys it is about to write exactly as a gateway does, confined to their own
directory (docs/operations.md "Publishing a table")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.fleet.fleet import PREFIX, Site, publish

if TYPE_CHECKING:
    from pathlib import Path

    from tests.fleet.etcd import Etcd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("where", ["absolute", "up_and_back"])
def test_a_table_naming_its_files_by_a_path_gateways_refuse_is_not_published(
    etcd: Etcd, tmp_path: Path, where: str
) -> None:
    site = Site(tmp_path / "site", "127.0.0.1:7001")
    proto = str(site.directory / "proto") if where == "absolute" else "../site/proto"
    site.write(proto={"paths": [proto]})
    done = publish(site, etcd)
    assert done.returncode == 1, done.stdout
    assert "nothing written to etcd" in done.stderr
    assert f"{PREFIX}/table" in done.stderr  # named as the gateways would name it
    assert etcd.get_prefix(PREFIX) == {}

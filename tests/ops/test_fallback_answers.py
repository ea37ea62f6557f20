"""What a `fallback` answers with, through `tlvproxy serve` and the demo service
(SPEC 4.6): kept answers do not outlive a change of the `.proto` files that
would read them wrongly."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import ROOT
from tests.ops.test_traffic import PROFILE, commands

if TYPE_CHECKING:
    from pathlib import Path

    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow


def test_a_proto_change_starts_the_kept_answers_afresh(procs: Processes, tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", protos)
    current, address = procs.upstream_process()
    rules = {"get_profile": {"fallback": {"last_good": {"key": "path.user_id", "ttl": "10m"}}}}
    gateway = procs.gateway(address, proto={"paths": [str(protos)]}, commands=commands(**rules))
    kept = gateway.call("GET", PROFILE)
    assert kept.status == 200
    current.kill()

    # A reload that changes nothing keeps the answers.
    assert gateway.admin("POST", "/admin/reload").status == 200
    answer = gateway.call("GET", PROFILE)
    assert (answer.status, answer.headers["x-fallback"], answer.body) == (
        200,
        "last_good",
        kept.body,
    )
    # demo.im.Profile by the same name, its fields renumbered: the kept body
    # would read `nickname` as `tags`.
    proto = protos / "demo" / "im.proto"
    text = proto.read_text()
    for old, new in (("string nickname = 2;", "string nickname = 9;"), ("tags = 6;", "tags = 2;")):
        assert old in text
        text = text.replace(old, new)
    proto.write_text(text)
    assert gateway.admin("POST", "/admin/reload").status == 200
    refused = gateway.call("GET", PROFILE)
    assert refused.status == 502, refused
    assert "x-fallback" not in refused.headers

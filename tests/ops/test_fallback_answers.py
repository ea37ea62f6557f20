"""What a `fallback` answers with, through `tlvproxy serve` and the demo service
(SPEC 4.6): kept answers do not outlive a change of the `.proto` files that
would read them wrongly, and one that no longer renders gives way to the
static body, which is what is counted."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import ROOT
from tests.ops.test_traffic import PROFILE, commands, counted

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


def test_a_kept_answer_that_no_longer_renders_gives_way_to_the_static_body(
    procs: Processes,
) -> None:
    current, address = procs.upstream_process()
    fallback = {
        "last_good": {"key": "path.user_id", "ttl": "10m"},
        "body": {"messages": []},
    }
    gateway = procs.gateway(address, commands=commands(list_messages={"fallback": fallback}))
    for n in range(12):
        sent = gateway.call(
            "POST",
            "/v1/messages",
            {"to_uid": 7, "text": f"message {n} " + "x" * 100},
            headers={"X-User-Id": "1"},
        )
        assert sent.status == 200, sent
    kept = gateway.call("GET", "/v1/users/7/messages")
    assert kept.status == 200
    assert len(kept.json()["messages"]) == 12
    assert len(kept.body) > 8 * 256
    current.kill()

    # An answer may render to 8 x framing.max_body of JSON: the kept one no
    # longer fits once max_body is 256 bytes.
    gateway.rewrite_table(framing={"max_body": 256})
    assert gateway.admin("POST", "/admin/reload").status == 200
    answer = gateway.call("GET", "/v1/users/7/messages")
    assert (answer.status, answer.headers.get("x-fallback"), answer.json()) == (
        200,
        "static",
        {"messages": []},
    )

    def fallbacks(kind: str) -> float:
        return counted(gateway, "tlvproxy_fallbacks_total", command="list_messages", kind=kind)

    assert (fallbacks("last_good"), fallbacks("static")) == (0, 1)
    [line] = [
        r
        for r in gateway.process.records()
        if r.get("message") == "a fallback answer did not render"
    ]
    assert (line["logger"], line["command"], line["kind"]) == (
        "tlvproxy.fallback",
        "list_messages",
        "last_good",
    )

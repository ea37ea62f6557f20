"""Mirrored copies give their place back, whatever becomes of them (SPEC 4.6:
at most 1,000 outstanding): through `tlvproxy serve` and two demo services,
copies whose body the `to` command refuses, callers' requests that time out
on REST and on a json-mode WebSocket session's own connection, and ordinary
ones, until `tlvproxy_mirror_outstanding` is back to 0 and every copy was
counted once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ops.procs import Gateway, Processes, WebSocket, metric, wait_for
from tests.ops.test_traffic import commands, counted, start

pytestmark = pytest.mark.slow

# list_messages, with a body, mirrored to a command whose request message
# lacks `limit`: a body with `limit` is the caller's to send, and no copy can
# be built of it.
LIST_POST = {
    "http": {"method": "POST", "path": "/v1/list"},
    "mirror": {"to": "list_narrow", "compare": True},
}
LIST_NARROW = {
    "name": "list_narrow",
    "command": 0x1004,
    "upstream": "im_next",
    "request": "demo.im.GetProfileRequest",  # the demo service answers it as get_profile
    "response": "demo.im.Profile",
}
ECHO_NEXT = {
    "name": "echo_next",
    "command": 0x1003,
    "upstream": "im_next",
    "codec": "json",
}


def outcomes(gateway: Gateway, command: str) -> dict[str, float]:
    values = gateway.metrics()
    names = ("same", "different", "answered", "failed", "dropped")
    found = {
        name: metric(values, "tlvproxy_mirror_total", command=command, outcome=name)
        for name in names
    }
    return {name: count for name, count in found.items() if count}


def test_every_copy_gives_its_place_back(procs: Processes, upstream: str) -> None:
    echo: dict[str, Any] = {"timeout": "300ms", "mirror": {"to": "echo_next", "compare": True}}
    table = commands(LIST_NARROW, ECHO_NEXT, echo=echo, list_messages=LIST_POST)
    gateway = start(procs, upstream, commands=table)
    assert "tlvproxy_mirror_outstanding" in gateway.metrics()

    # The caller's body fits its command, not the mirror's: answered, no copy.
    for _ in range(5):
        answer = gateway.call("POST", "/v1/list", {"user_id": 7, "limit": 3})
        assert (answer.status, answer.json()) == (200, {"messages": []})
    for _ in range(3):
        assert gateway.call("POST", "/v1/list", {"user_id": 7}).status == 200
    # Callers' requests that time out; their copies answer later.
    assert gateway.call("POST", "/v1/echo", {"a": 1}).status == 200
    for _ in range(2):
        assert gateway.call("POST", "/v1/echo", {"_delay_ms": 1000}).status == 504
    session = WebSocket(gateway.http_port, "/ws?uid=1&did=a")
    try:
        for seq in (1, 2):
            session.send({"cmd": "echo", "seq": seq, "body": {"_delay_ms": 1000}})
            late = session.receive()
            assert isinstance(late, dict)
            assert (late["seq"], late["error"]["code"]) == (seq, "upstream_timeout")
        for seq in (3, 4):
            session.send({"cmd": "echo", "seq": seq, "body": {"b": seq}})
            assert session.receive() == {"cmd": "echo", "seq": seq, "status": 0, "body": {"b": seq}}
    finally:
        session.close()

    wait_for(
        lambda: (
            counted(gateway, "tlvproxy_mirror_outstanding") == 0
            and sum(outcomes(gateway, "echo").values()) == 7
        ),
        "every copy worked out",
    )
    assert outcomes(gateway, "list_messages") == {"failed": 5, "different": 3}
    # The demo service knows no `echo_next`: it answers status 1, a difference.
    assert outcomes(gateway, "echo") == {"different": 3, "failed": 4}

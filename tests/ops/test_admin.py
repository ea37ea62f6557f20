"""The admin listener of a real `tlvproxy serve` process (SPEC 6): the bearer
token, /admin/config, and metrics that count what was done."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import WebSocket, metric, wait_for

if TYPE_CHECKING:
    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"


def test_admin_token_guards_admin_only(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, admin_token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}

    for method, path in (("GET", "/admin/config"), ("POST", "/admin/reload")):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
        ):
            answer = gateway.admin(method, path, headers=headers)
            assert answer.status == 401, (method, path, headers, answer)
            assert answer.json()["error"]["code"] == "unauthorized"
        assert gateway.admin(method, path, headers=good).status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert gateway.admin("GET", path).status == 200, path


def test_admin_config_shows_the_table_and_live_nodes(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream)
    assert gateway.call("POST", "/v1/echo", {"warm": 1}).status == 200

    config = gateway.admin("GET", "/admin/config").json()

    assert config["source"] == str(gateway.table)
    echo = next(c for c in config["commands"] if c["name"] == "echo")
    assert echo == {
        "name": "echo",
        "command": "0x1003",
        "upstream": "im",
        "codec": "json",
        "request": None,
        "response": None,
        "push": None,
        "http": {"method": "POST", "path": "/v1/echo"},
    }
    assert {"method": "GET", "path": "/v1/users/{user_id}/profile", "command": "get_profile"} in (
        config["routes"]
    )
    [node] = config["upstreams"]["im"]["nodes"]
    assert node["address"] == upstream
    assert node["healthy"] is True
    assert node["in_flight"] == 0
    assert node["connections"] >= 1
    assert gateway.admin("POST", "/admin/config").status == 405
    assert gateway.admin("GET", "/admin/reload").status == 405
    assert gateway.admin("GET", "/admin/nothing").status == 404


def test_metrics_count_what_was_done(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream)
    before = gateway.metrics()

    for n in range(7):
        assert gateway.call("POST", "/v1/echo", {"n": n}).status == 200
    assert gateway.call("GET", "/v1/nowhere").status == 404
    message = {"to_uid": 2, "text": "hi"}
    sent = [
        gateway.call("POST", "/v1/messages", message, headers={"X-User-Id": "9"}) for _ in range(26)
    ]
    statuses = [answer.status for answer in sent]
    limited = statuses.count(429)
    assert limited >= 1, statuses  # burst 20, 10/s: 26 at once cannot all pass
    assert statuses.count(200) + limited == 26
    assert gateway.call("GET", "/v1/users/1/profile?next=../etc").status == 403
    ws = WebSocket(gateway.http_port)
    for seq in (1, 2, 3):
        ws.send({"cmd": "echo", "seq": seq, "body": {"seq": seq}})
        assert ws.receive()["seq"] == seq
    assert metric(gateway.metrics(), "tlvproxy_websocket_sessions") == 1
    ws.close()
    wait_for(
        lambda: metric(gateway.metrics(), "tlvproxy_websocket_sessions") == 0,
        "the session to end",
    )

    after = gateway.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    requests = "tlvproxy_http_requests_total"
    assert delta(requests, route="echo", method="POST", status="200") == 7
    assert delta(requests, route="unmatched", method="GET", status="404") == 1
    assert delta(requests, route="send_message", method="POST", status="200") == 26 - limited
    assert delta(requests, route="send_message", method="POST", status="429") == limited
    assert delta(requests, method="GET", status="403") == 1  # route: rest.py's choice
    assert delta("tlvproxy_http_request_duration_seconds_count", route="echo") == 7
    assert delta("tlvproxy_rate_limited_total", rule="send_per_user") == limited
    assert delta("tlvproxy_waf_blocked_total", rule="path_traversal") == 1
    ok = delta("tlvproxy_upstream_requests_total", upstream="im", node=upstream, outcome="ok")
    assert ok >= 7 + 26 - limited  # REST requests; heartbeats and WebSocket may add
    assert delta("tlvproxy_websocket_messages_total", direction="in") == 3
    assert delta("tlvproxy_websocket_messages_total", direction="out") == 3
    assert metric(after, "tlvproxy_upstream_node_healthy", upstream="im", node=upstream) == 1

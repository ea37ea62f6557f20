"""The admin listener of a real `tlvproxy serve` process (docs/reference.md,
"Admin listener"): its guards (Host, bearer token, Content-Type, no CORS),
/admin/config, and metrics that count what was done."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import (
    DEADLINE,
    Gateway,
    WebSocket,
    call,
    metric,
    parse_metrics,
    rewrite,
    wait_for,
)

if TYPE_CHECKING:
    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"


PROTECTED = (
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/admin/config"),
    ("POST", "/admin/reload"),
)


def raw(port: int, head: bytes) -> tuple[int, bytes]:
    """Send `head` as it is (no Host header is added) and read the answer until the
    server closes; returns (status, whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return int(received.split(b" ", 2)[1]), received


def test_the_token_guards_everything_but_the_probes(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, admin_token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}

    for method, path in PROTECTED:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
            {"Authorization": "Bearer s3cr\u00e9t"},  # sent as latin-1 by http.client
            {"Authorization": b"Bearer \xe2\x82\xac"},  # UTF-8 bytes on the wire
        ):
            answer = gateway.admin(method, path, headers=headers)
            assert answer.status == 401, (method, path, headers, answer)
            assert answer.json()["error"]["code"] == "unauthorized"
            assert answer.headers["www-authenticate"] == 'Bearer realm="tlvproxy-admin"'
        answer = gateway.admin(method, path, headers=good)
        assert answer.status == 200, (method, path, answer)
    for path in ("/healthz", "/readyz"):
        assert gateway.admin("GET", path).status == 200, path
        assert gateway.admin("HEAD", path).status == 200, path
    assert gateway.process.alive()


def test_without_a_token_every_endpoint_answers(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream)
    for method, path in PROTECTED:
        assert gateway.admin(method, path).status == 200, (method, path)


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_post_must_be_json_or_nothing_reloads(
    procs: Processes, upstream: str, token: str | None
) -> None:
    gateway = procs.gateway(upstream, admin_token=token)
    auth = {} if token is None else {"Authorization": f"Bearer {TOKEN}"}
    before = version(gateway, auth)
    reloads = metric(metrics(gateway, auth), "tlvproxy_config_reloads_total")
    gateway.rewrite_table(shutdown_timeout="7s")  # a new version, if it were loaded

    refused = [
        gateway.admin("POST", "/admin/reload", headers={**auth, "Content-Type": content_type})
        for content_type in (
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/json-patch+json",
        )
    ]
    # No Content-Type at all (http.client adds none for a POST without a body).
    refused.append(call(gateway.admin_port, "POST", "/admin/reload", headers=auth))
    refused.append(call(gateway.admin_port, "POST", "/admin/reload", body=b"{}", headers=auth))

    for answer in refused:
        assert answer.status == 415, answer
        error = answer.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert "Content-Type: application/json" in error["message"]
    assert version(gateway, auth) == before
    assert metric(metrics(gateway, auth), "tlvproxy_config_reloads_total") == reloads
    assert not [r for r in gateway.process.records() if r["message"] == "reload done"]

    answer = gateway.admin(
        "POST", "/admin/reload", headers={**auth, "Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert answer.status == 200, answer
    assert answer.json()["version"] != before
    assert version(gateway, auth) == answer.json()["version"]
    assert metric(metrics(gateway, auth), "tlvproxy_config_reloads_total", result="ok") == 1


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_the_host_header_must_name_this_listener(
    procs: Processes, upstream: str, parser: str
) -> None:
    gateway = procs.gateway(upstream, "--http-parser", parser)
    port = gateway.admin_port

    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}"):
        for method, path in (("GET", "/healthz"), ("GET", "/readyz"), *PROTECTED):
            answer = gateway.admin(method, path, headers={"Host": host})
            assert answer.status == 403, (host, path, answer)
            assert answer.json()["error"]["code"] == "forbidden"
    for host in (f"localhost:{port}", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}"):
        for method, path in (("GET", "/healthz"), ("GET", "/readyz"), *PROTECTED):
            answer = gateway.admin(method, path, headers={"Host": host})
            assert answer.status == 200, (host, path, answer)
    # Another IP address than the bound one is not this listener's name.
    assert gateway.admin("GET", "/readyz", headers={"Host": f"10.1.2.3:{port}"}).status == 403

    # HTTP/1.0 may leave Host out, and no browser does: accepted. HTTP/1.1 may not.
    status, _ = raw(port, b"GET /readyz HTTP/1.0\r\n\r\n")
    assert status == 200
    status, _ = raw(port, b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status == 400


def test_the_host_check_comes_before_the_token(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, admin_token=TOKEN)
    headers = {"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"}
    for method, path in PROTECTED:
        assert gateway.admin(method, path, headers=headers).status == 403, path
    assert gateway.admin("GET", "/metrics", headers={"Host": "evil.example"}).status == 403


def test_an_any_address_bind_accepts_ip_literals(procs: Processes, upstream: str) -> None:
    path, http_port, admin_port = procs.table(upstream, "any")
    rewrite(path, listen={"http": f"127.0.0.1:{http_port}", "admin": f"0.0.0.0:{admin_port}"})
    process = procs.start("gateway", "serve", "-c", str(path))
    gateway = Gateway(process, path, http_port, admin_port)
    wait_for(lambda: process.alive() and gateway.ready(), "the gateway's /readyz")

    for host in (f"10.1.2.3:{admin_port}", "192.0.2.7", f"[2001:db8::1]:{admin_port}"):
        for method, path_ in (("GET", "/readyz"), *PROTECTED):
            answer = gateway.admin(method, path_, headers={"Host": host})
            assert answer.status == 200, (host, path_, answer)
    for host in ("evil.example", f"evil.example:{admin_port}", f"10.1.2.3.nip.io:{admin_port}"):
        assert gateway.admin("GET", "/readyz", headers={"Host": host}).status == 403, host


def test_a_preflight_is_never_approved(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream)
    preflight = {
        "Origin": "http://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    for path in ("/admin/reload", "/admin/config", "/metrics", "/healthz", "/nowhere"):
        answer = gateway.admin("OPTIONS", path, headers=preflight)
        assert answer.status in (404, 405), (path, answer)
        assert not [name for name in answer.headers if name.startswith("access-control-")]
    answer = gateway.admin("GET", "/admin/config", headers={"Origin": "http://evil.example"})
    assert not [name for name in answer.headers if name.startswith("access-control-")]


def test_the_supervisor_guards_its_admin_listener(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, "--workers", "2", admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    port = gateway.admin_port

    assert gateway.admin("GET", "/metrics").status == 401
    assert gateway.admin("GET", "/metrics", headers=auth).status == 200
    assert gateway.admin("GET", "/readyz", headers={"Host": "evil.example"}).status == 403
    assert gateway.admin("GET", "/readyz", headers={"Host": f"localhost:{port}"}).status == 200
    before = version(gateway, auth)
    gateway.rewrite_table(shutdown_timeout="7s")
    plain = {**auth, "Content-Type": "text/plain"}
    assert gateway.admin("POST", "/admin/reload", headers=plain).status == 415
    assert version(gateway, auth) == before
    answer = gateway.admin("POST", "/admin/reload", headers=auth)
    assert answer.status == 200, answer
    assert answer.json()["version"] != before


def metrics(gateway: Gateway, headers: dict[str, str]) -> dict[str, float]:
    return parse_metrics(gateway.admin("GET", "/metrics", headers=headers).body.decode())


def version(gateway: Gateway, headers: dict[str, str]) -> str:
    value: str = gateway.admin("GET", "/admin/config", headers=headers).json()["version"]
    return value


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
        "auth": None,
        "split": [],
        "mirror": None,
        "fallback": None,
    }
    assert config["auth"] == []  # names and types only; the tests' table has none
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

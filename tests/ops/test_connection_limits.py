"""Connection limits and file descriptors of a real `tlvproxy serve` process.

Issue 16, finding 6: with `ulimit -n 512` and 1,200 idle clients, /healthz and
new REST clients timed out, "accept failed" was logged hundreds of times and
the upstream node was marked unhealthy. docs/operations.md "Connections and
file descriptors" says what happens instead; docs/configuration.md "limits"
describes `max_connections` and `max_connections_per_ip`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import resource
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.ops.procs import Gateway, Process, call, metric, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.ops.procs import Answer, Processes

pytestmark = pytest.mark.slow

# The gateway's descriptor limit in the flood tests, and the flood.
NOFILE = 512
FLOOD = 1200
# Loopback addresses the flood comes from (127.0.0.0/8 is all local), so that
# max_connections_per_ip (256 by default) never binds before the descriptors.
FLOOD_SOURCES = [f"127.0.0.{n}" for n in range(10, 20)]
# Heartbeats every second and idle clients that stay: within a few seconds of
# flood a lost heartbeat would show, and no client leaves by header_timeout.
FLOOD_TABLE: dict[str, Any] = {
    "upstreams": {"im": {"heartbeat": {"command": 1, "interval": "1s"}}},
    "limits": {"header_timeout": "60s"},
}
QUICK = 3.0  # seconds: an answer under load must come within this


# ---------------------------------------------------------------- helpers


def limited_gateway(
    procs: Processes, upstream: str, soft: int, hard: int | None = None, **overrides: Any
) -> Gateway:
    """`tlvproxy serve` under RLIMIT_NOFILE = (soft, hard or soft), ready."""
    path, http_port, admin_port = procs.table(upstream, f"limited{soft}", **overrides)
    process = limited_serve(procs, path, soft, hard)
    gateway = Gateway(process, path, http_port, admin_port)

    def ready() -> bool:
        assert process.alive(), process.text()
        return gateway.ready()

    wait_for(ready, "the gateway's /readyz")
    return gateway


def limited_serve(
    procs: Processes, path: Path, soft: int, hard: int | None = None, *arguments: str
) -> Process:
    """`tlvproxy serve -c PATH ARGUMENTS` under RLIMIT_NOFILE = (soft, hard or
    soft), started (not waited for)."""
    hard = soft if hard is None else hard
    # setrlimit in the child, then the gateway in the same process.
    launcher = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "sys.argv[0] = 'tlvproxy'; "
        "runpy.run_module('tlvproxy', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", launcher, "serve", "-c", str(path), *arguments]
    process = Process(command, procs.directory / f"limited-{soft}.log")
    procs._started.append(process)  # killed with the test's other processes
    return process


@contextlib.contextmanager
def descriptors_for(count: int) -> Iterator[None]:
    """This (test) process may open `count` more descriptors for the time being."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    assert hard == resource.RLIM_INFINITY or hard >= wanted, (
        f"the test needs {wanted} descriptors; the hard limit is {hard}"
    )
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood(port: int, count: int, sources: list[str]) -> list[socket.socket]:
    """`count` connections to `port` that never send a byte (connected without
    waiting: the kernel completes them whether the gateway accepts or not)."""
    clients = []
    for index in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((sources[index % len(sources)], 0))
        code = sock.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
        clients.append(sock)
    return clients


def idle(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """`count` connected clients that send nothing. The gateway accepts
    connections in the order they were made (the listen queue is FIFO), so a
    connection made after these is judged with these counted."""
    return [_connected(port, source) for _ in range(count)]


def _connected(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=QUICK, source_address=(source, 0))


def answer_unasked(port: int, source: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    """Connect and, sending nothing, read what the gateway writes before it
    closes: (HTTP status, JSON body)."""
    sock = _connected(port, source)
    with sock:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    assert headers[b"Connection"] == b"close"
    assert int(headers[b"Content-Length"]) == len(body)
    return status, json.loads(body)


def quick_call(port: int, method: str, path: str, **options: Any) -> Answer:
    """`call`, which must answer within QUICK seconds (a timeout fails the test)."""
    return call(port, method, path, timeout=QUICK, **options)


def is_overloaded(answer: Answer) -> bool:
    return answer.status == 503 and answer.json()["error"]["code"] == "overloaded"


def node_healthy(gateway: Gateway) -> float:
    return metric(gateway.metrics(), "tlvproxy_upstream_node_healthy", upstream="im")


def warnings(gateway: Gateway) -> list[dict[str, Any]]:
    return [r for r in gateway.process.records() if r.get("level") in ("WARNING", "ERROR")]


def served_again(gateway: Gateway) -> bool:
    return call(gateway.http_port, "POST", "/v1/echo", body=b"{}").status == 200


class Ws:
    """A WebSocket handshake on a socket and wsproto: `status` 101 when the
    session opened, else the refusal's status and JSON `body`."""

    def __init__(
        self, port: int, source: str = "127.0.0.1", forwarded_for: str | None = None
    ) -> None:
        self.sock = _connected(port, source)
        self.ws = WSConnection(ConnectionType.CLIENT)
        extra = [("X-Forwarded-For", forwarded_for)] if forwarded_for else []
        request = Request(host="localhost", target="/ws?uid=1&did=a", extra_headers=extra)
        self.sock.sendall(self.ws.send(request))
        self.status = 0
        self.body: Any = None
        data = b""
        while not self.status or (self.status != 101 and self.body is None):
            for event in self._events():
                if isinstance(event, AcceptConnection):
                    self.status = 101
                elif isinstance(event, RejectConnection):
                    self.status = event.status_code
                    if not event.has_body:
                        self.body = {}
                elif isinstance(event, RejectData):
                    data += event.data
                    if event.body_finished:
                        self.body = json.loads(data)

    def _events(self) -> list[Any]:
        data = self.sock.recv(65536)
        assert data, "the gateway closed the connection without an answer"
        self.ws.receive_data(data)
        return list(self.ws.events())

    def echo(self, seq: int) -> dict[str, Any]:
        message = {"cmd": "echo", "seq": seq, "body": {"n": seq}}
        self.sock.sendall(self.ws.send(TextMessage(data=json.dumps(message))))
        while True:
            for event in self._events():
                if isinstance(event, TextMessage):
                    value: dict[str, Any] = json.loads(event.data)
                    return value
                assert not isinstance(event, CloseConnection), event

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- descriptors


def test_a_flood_of_idle_clients_leaves_healthz_rest_and_the_upstream_working(
    procs: Processes, upstream: str
) -> None:
    gateway = limited_gateway(procs, upstream, NOFILE, **FLOOD_TABLE)
    assert gateway.call("POST", "/v1/echo", body=b'{"warm": 1}').status == 200

    with descriptors_for(FLOOD + 64):
        clients = flood(gateway.http_port, FLOOD, FLOOD_SOURCES)
        try:
            # The flood lasts a few heartbeat intervals: heartbeats, health
            # checks and new clients all have to get through it.
            until = time.monotonic() + 4.0
            refused = 0
            while time.monotonic() < until:
                healthz = quick_call(gateway.admin_port, "GET", "/healthz")
                assert healthz.status == 200, healthz
                answer = quick_call(gateway.http_port, "POST", "/v1/echo", body=b"{}")
                assert answer.status == 200 or is_overloaded(answer), answer
                refused += answer.status == 503
                time.sleep(0.2)
            assert refused, "the flood never filled the gateway"
            assert node_healthy(gateway) == 1
        finally:
            close_all(clients)

    # The flood gone, every request is served at once: no 502 from a node
    # wrongly marked unhealthy.
    wait_for(lambda: served_again(gateway), "the flood's connections to close", deadline=5.0)
    for _ in range(20):
        answer = gateway.call("POST", "/v1/echo", body=b'{"after": 1}')
        assert answer.status == 200, answer
    assert node_healthy(gateway) == 1
    # One line for the refusals, none per connection.
    assert len(warnings(gateway)) <= 3, [r["message"] for r in warnings(gateway)]


def close_all(clients: list[socket.socket]) -> None:
    for sock in clients:
        sock.close()


def test_websocket_sessions_count_their_upstream_descriptor(
    procs: Processes, upstream: str
) -> None:
    # 2,000 sessions hold 4,000 descriptors: each session's upstream connection
    # counts, and the sessions beyond what the limit holds are refused 503
    # before any upstream connect can fail for want of a descriptor.
    gateway = limited_gateway(procs, upstream, NOFILE, **FLOOD_TABLE)
    sessions: list[Ws] = []
    try:
        with descriptors_for(NOFILE):
            for index in range(NOFILE // 2 + 1):
                session = Ws(gateway.http_port, FLOOD_SOURCES[index % len(FLOOD_SOURCES)])
                if session.status != 101:
                    break
                sessions.append(session)
            else:
                pytest.fail(f"{len(sessions)} sessions under a limit of {NOFILE} descriptors")
            assert session.status == 503, session.body
            assert session.body["error"]["code"] == "overloaded"
            session.close()
            assert len(sessions) > 100  # 2 descriptors each, less the reserve
            assert sessions[0].echo(1)["body"] == {"n": 1}
            assert sessions[-1].echo(2)["body"] == {"n": 2}
            assert quick_call(gateway.admin_port, "GET", "/healthz").status == 200
            assert node_healthy(gateway) == 1
    finally:
        close_all([session.sock for session in sessions])
    wait_for(lambda: served_again(gateway), "the sessions to close", deadline=5.0)
    assert node_healthy(gateway) == 1
    assert Ws(gateway.http_port).status == 101


def test_the_soft_descriptor_limit_is_raised_to_the_hard_limit(
    procs: Processes, upstream: str
) -> None:
    gateway = limited_gateway(procs, upstream, 256, 1024)
    limits = Path(f"/proc/{gateway.process.pid}/limits").read_text()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == ["1024", "1024"], line
    (raised,) = [r for r in gateway.process.records() if r["message"].startswith("raised the file")]
    assert (raised["from"], raised["to"]) == (256, 1024)


# ---------------------------------------------------------------- max_connections


def test_max_connections_refuses_rest_clients_beyond_it(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, limits={"max_connections": 3})
    held = idle(gateway.http_port, 3)
    try:
        # Refused before a byte of request is read: the answer comes unasked.
        status, body = answer_unasked(gateway.http_port)
        assert status == 503
        assert body["error"]["code"] == "overloaded"
        assert "max_connections (3)" in body["error"]["message"]
        assert body["error"]["request_id"]
        assert is_overloaded(quick_call(gateway.http_port, "POST", "/v1/echo", body=b"{}"))
        # The held connections are served as any.
        held[0].sendall(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
        # One gone, one more is served.
        held.pop(0).close()
        wait_for(lambda: served_again(gateway), "a connection to be released")
    finally:
        close_all(held)


def test_max_connections_refuses_websocket_sessions_beyond_it(
    procs: Processes, upstream: str
) -> None:
    gateway = procs.gateway(upstream, limits={"max_connections": 2})
    first, second = Ws(gateway.http_port), Ws(gateway.http_port)
    assert (first.status, second.status) == (101, 101)
    third = Ws(gateway.http_port)
    assert third.status == 503
    assert third.body["error"]["code"] == "overloaded"
    third.close()
    assert first.echo(1)["body"] == {"n": 1}
    first.close()

    def opens() -> bool:
        session = Ws(gateway.http_port)
        session.close()
        return session.status == 101

    wait_for(opens, "a session to be released")
    second.close()


def test_max_connections_per_ip_refuses_one_address_beyond_it(
    procs: Processes, upstream: str
) -> None:
    gateway = procs.gateway(upstream, limits={"max_connections_per_ip": 2})
    held = idle(gateway.http_port, 2, "127.0.0.1")
    try:
        status, body = answer_unasked(gateway.http_port, "127.0.0.1")
        assert status == 503
        assert body["error"]["code"] == "overloaded"
        assert "127.0.0.1 holds max_connections_per_ip (2)" in body["error"]["message"]
        session = Ws(gateway.http_port, "127.0.0.1")
        assert session.status == 503
        session.close()
        # Another address is served, REST and WebSocket.
        other = Ws(gateway.http_port, "127.0.0.2")
        assert other.status == 101
        assert other.echo(1)["body"] == {"n": 1}
        other.close()
    finally:
        close_all(held)
    wait_for(lambda: served_again(gateway), "the address's connections to be released")


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_max_connections_per_ip_counts_sessions_by_the_client_a_trusted_proxy_names(
    procs: Processes, upstream: str, parser: str
) -> None:
    gateway = procs.gateway(
        upstream,
        "--http-parser",
        parser,
        trusted_proxies=["127.0.0.1/32"],
        limits={"max_connections_per_ip": 2},
    )
    # A trusted proxy's connections carry many clients' requests: they are not
    # counted per address, however many.
    held = idle(gateway.http_port, 3, "127.0.0.1")
    sessions: list[Ws] = []
    try:
        assert quick_call(gateway.http_port, "POST", "/v1/echo", body=b"{}").status == 200
        # Its WebSocket sessions are one client's each: counted by that client.
        sessions = [Ws(gateway.http_port, forwarded_for="192.0.2.7") for _ in range(2)]
        assert [session.status for session in sessions] == [101, 101]
        third = Ws(gateway.http_port, forwarded_for="192.0.2.7")
        assert third.status == 503
        assert "192.0.2.7 holds max_connections_per_ip (2)" in third.body["error"]["message"]
        third.close()
        other = Ws(gateway.http_port, forwarded_for="192.0.2.8")
        assert other.status == 101
        other.close()
    finally:
        close_all(held + [session.sock for session in sessions])


def test_the_admin_listener_refuses_beyond_its_own_connections(
    procs: Processes, upstream: str
) -> None:
    gateway = procs.gateway(upstream)
    held = idle(gateway.admin_port, 32)
    try:
        status, body = answer_unasked(gateway.admin_port)
        assert status == 503
        assert body["error"]["code"] == "overloaded"
        # Clients are served all the same.
        assert quick_call(gateway.http_port, "POST", "/v1/echo", body=b"{}").status == 200
    finally:
        close_all(held)
    wait_for(lambda: gateway.ready(), "an admin connection to be released")

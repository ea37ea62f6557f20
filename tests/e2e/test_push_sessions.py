"""Push sessions (SPEC 8) in one process: the real gateway on the real mock
upstream, on trio's clock where time matters (poll_timeout, idle_timeout,
the 15 s comment, credentials that expire), with both HTTP parsers."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
import yaml

from tests.auth.keys import jwks, rsa_jwk, token
from tests.e2e.client import HttpClient, fetch
from tests.ops.push_client import EventParser, split_head, stream_request
from tlvproxy.server import http_conn

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.client import Answer
    from tests.e2e.conftest import GatewayFactory
    from tests.ops.push_client import Event
    from tests.stores.redis_server import RedisServer
    from tlvproxy.app import Gateway

PATH = "/v1/sessions"
SESSIONS = {"upstream": "im", "hash_on": "query.did", "uid": "query.uid"}
# Heartbeats are real frames: on a jumping clock they would race it.
NO_HEARTBEAT = {"im": {"heartbeat": None}}


class Events:
    """An event stream read from a trio socket."""

    def __init__(self, stream: trio.SocketStream, status: int, headers: dict[str, str]) -> None:
        self.stream = stream
        self.status = status
        self.headers = headers
        self.parser = EventParser()
        self.pending: list[Event] = []

    @classmethod
    async def open(
        cls, gateway: Gateway, target: str, headers: dict[str, str] | None = None
    ) -> Events:
        address = gateway.http_address
        assert address is not None
        stream = await trio.open_tcp_stream(address.host, address.port)
        await stream.send_all(stream_request(target, headers))
        received = b""
        while (head := split_head(received)) is None:
            chunk = await stream.receive_some(65536)
            assert chunk, received
            received += chunk
        status, found, rest = head
        events = cls(stream, status, found)
        events.pending = events.parser.feed(rest)
        return events

    async def next(self) -> Event | None:
        while not self.pending:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.pending = self.parser.feed(chunk)
        return self.pending.pop(0)

    async def close(self) -> None:
        await self.stream.aclose()


async def create(
    gateway: Gateway, query: str = "uid=2&did=a", headers: dict[str, str] | None = None
) -> str:
    answer = await fetch(gateway.http_address, "POST", f"{PATH}?{query}", headers=headers)
    assert answer.status == 201, answer
    session_id: str = answer.json()["session"]
    return session_id


async def send(
    gateway: Gateway, session_id: str, message: Any, headers: dict[str, str] | None = None
) -> Answer:
    body = message if isinstance(message, bytes) else json.dumps(message)
    return await fetch(gateway.http_address, "POST", f"{PATH}/{session_id}/messages", body, headers)


async def poll(
    gateway: Gateway, session_id: str, after: int = 0, headers: dict[str, str] | None = None
) -> Answer:
    target = f"{PATH}/{session_id}/poll?after={after}"
    return await fetch(gateway.http_address, "GET", target, headers=headers)


async def push(gateway: Gateway, uid: int, text: str) -> None:
    answer = await fetch(
        gateway.http_address,
        "POST",
        "/v1/messages",
        {"to_uid": uid, "text": text},
        {"X-User-Id": "9"},
    )
    assert answer.status == 200, answer


async def register(gateway: Gateway, session_id: str) -> None:
    """The session's first frame tells the demo upstream whose it is."""
    answer = await send(gateway, session_id, {"cmd": "echo", "seq": 0})
    assert answer.json()["status"] == 0, answer


# ---------------------------------------------------------------- time


async def test_a_poll_waits_poll_timeout_and_a_stream_gets_a_comment_every_15_s(
    gateways: GatewayFactory, autojump_clock: Any
) -> None:
    gateway = await gateways.start(sessions=SESSIONS, upstreams=NO_HEARTBEAT)
    session_id = await create(gateway)
    began = trio.current_time()
    answer = await poll(gateway, session_id)
    assert answer.json() == {"messages": [], "next": 0}
    assert trio.current_time() - began == pytest.approx(25, abs=0.5)  # the default

    events = await Events.open(gateway, f"{PATH}/{session_id}/events")
    began = trio.current_time()
    with trio.move_on_after(46):
        assert await events.next() is None
    assert events.parser.comments == 3  # at 15, 30 and 45 s
    # The stream kept the session from expiring (idle_timeout 60 s).
    assert len(gateway.push_sessions) == 1
    await events.close()


async def test_idle_expiry_counts_from_the_last_stream_poll_or_send(
    gateways: GatewayFactory, autojump_clock: Any
) -> None:
    gateway = await gateways.start(
        sessions={**SESSIONS, "idle_timeout": "60s", "poll_timeout": "10s"},
        upstreams=NO_HEARTBEAT,
    )
    session_id = await create(gateway)
    await trio.sleep(50)
    await register(gateway, session_id)  # a send
    await trio.sleep(50)
    assert (await poll(gateway, session_id)).status == 200  # a poll of 10 s
    await trio.sleep(59)
    assert len(gateway.push_sessions) == 1
    await trio.sleep(2)
    assert len(gateway.push_sessions) == 0
    gone = await poll(gateway, session_id)
    assert (gone.status, gone.json()["error"]["code"]) == (404, "session_not_found")
    assert gateway.metrics.registry.get_sample_value("tlvproxy_push_sessions") == 0


async def test_a_stream_ends_when_its_token_expires(
    gateways: GatewayFactory, tmp_path: Path, autojump_clock: Any
) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(rsa_jwk()))
    users = {
        "name": "users",
        "type": "jwt",
        "keys": str(keys),
        "token_from": ["query.access_token"],
    }
    gateway = await gateways.start(
        auth=[users],
        sessions={**SESSIONS, "auth": "users", "uid": "auth.sub", "idle_timeout": "1h"},
        upstreams=NO_HEARTBEAT,
    )
    session_id = await create(gateway, f"did=a&access_token={token({'sub': '7'})}")
    expiry = int(time.time()) + 120
    short = token({"sub": "7", "exp": expiry})
    events = await Events.open(gateway, f"{PATH}/{session_id}/events?access_token={short}")
    began = trio.current_time()
    assert await events.next() is None  # ended, without an event: the session goes on
    assert trio.current_time() - began == pytest.approx(expiry - time.time(), abs=2)
    assert len(gateway.push_sessions) == 1
    renewed = token({"sub": "7"})
    assert (await poll(gateway, session_id, headers=None)).status == 401
    again = await Events.open(gateway, f"{PATH}/{session_id}/events?access_token={renewed}")
    assert again.status == 200
    await again.close()


def users(tmp_path: Path) -> dict[str, Any]:
    """A `jwt` authenticator reading tokens from the Authorization header."""
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(rsa_jwk()))
    return {"name": "users", "type": "jwt", "keys": str(keys)}


def bearer(claims: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(claims)}"}


async def test_tokens_without_sub_reach_only_the_sessions_of_their_own_uid(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    gateway = await gateways.start(
        auth=[users(tmp_path)],
        sessions={**SESSIONS, "auth": "users", "uid": "auth.claim.uid"},
    )
    alice = bearer({"uid": 5})  # no sub: the identities differ only by their uid
    session_id = await create(gateway, "did=a", alice)
    address = gateway.http_address
    mallory = bearer({"uid": 6})
    for method, suffix in (
        ("GET", "/poll?after=0"),
        ("GET", "/events"),
        ("POST", "/messages"),
        ("DELETE", ""),
    ):
        answer = await fetch(address, method, f"{PATH}/{session_id}{suffix}", b"{}", mallory)
        assert (answer.status, answer.json()["error"]["code"]) == (404, "session_not_found")
    # Another token of the same uid (a renewed one) is the same caller.
    renewed = bearer({"uid": 5, "exp": int(time.time()) + 60})
    answer = await send(gateway, session_id, {"cmd": "echo", "seq": 1}, renewed)
    assert answer.json() == {"cmd": "echo", "seq": 1, "status": 0, "body": {}}
    assert (await fetch(address, "DELETE", f"{PATH}/{session_id}", headers=alice)).status == 204


async def test_a_session_is_refused_to_an_identity_that_names_nobody(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    gateway = await gateways.start(
        auth=[users(tmp_path)], sessions={**SESSIONS, "auth": "users", "uid": "query.uid"}
    )
    # Neither sub nor anything the session reads from the identity: every
    # such token would be the same caller.
    refused = await fetch(
        gateway.http_address, "POST", f"{PATH}?uid=5&did=a", headers=bearer({"role": "x"})
    )
    assert (refused.status, refused.json()["error"]["code"]) == (403, "forbidden")
    assert "name no subject" in refused.json()["error"]["message"]
    assert len(gateway.push_sessions) == 0
    assert await create(gateway, "uid=5&did=a", bearer({"sub": "5"}))


async def test_a_message_the_upstream_does_not_answer_gets_upstream_timeout(
    gateways: GatewayFactory, autojump_clock: Any
) -> None:
    gateway = await gateways.start(sessions=SESSIONS, upstreams=NO_HEARTBEAT)
    session_id = await create(gateway)
    answer = await send(gateway, session_id, {"cmd": "echo", "seq": 3, "body": {"_delay_ms": 9000}})
    assert answer.status == 200
    assert answer.json()["seq"] == 3
    assert answer.json()["error"]["code"] == "upstream_timeout"


# ---------------------------------------------------------------- requests


async def test_messages_pass_the_policy_of_websocket_messages(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(
        sessions=SESSIONS,
        rate_limits=[{"name": "echoes", "commands": ["echo"], "key": "query.uid", "rate": "1/m"}],
    )
    session_id = await create(gateway)
    first = await send(gateway, session_id, {"cmd": "echo", "seq": 1, "body": {"a": 1}})
    assert first.json() == {"cmd": "echo", "seq": 1, "status": 0, "body": {"a": 1}}
    limited = await send(gateway, session_id, {"cmd": "echo", "seq": 2})
    assert (limited.status, limited.json()["error"]["code"]) == (200, "rate_limited")
    for body, code in (
        (b"{not json", "bad_request"),
        (b"\xff\xfe", "bad_request"),
        ({"cmd": "new_message", "seq": 4}, "bad_request"),
        ({"cmd": "echo"}, "bad_request"),
    ):
        answer = await send(gateway, session_id, body)
        assert (answer.status, answer.json()["error"]["code"]) == (200, code), answer
    # A WAF deny refuses the request, 403, as on REST; the session stays open.
    denied = await send(gateway, session_id, {"cmd": "get_profile", "seq": 5, "body": "eval(1)"})
    assert (denied.status, denied.json()["error"]["code"]) == (403, "forbidden")
    profile = await send(
        gateway, session_id, {"cmd": "get_profile", "seq": 6, "body": {"user_id": 3}}
    )
    assert profile.json()["status"] == 0
    registry = gateway.metrics.registry
    # Seven messages reached the session; the one the WAF refused did not.
    assert (
        registry.get_sample_value(
            "tlvproxy_push_messages_total", {"direction": "in", "transport": "http"}
        )
        == 7
    )
    assert registry.get_sample_value("tlvproxy_waf_blocked_total", {"rule": "php_injection"}) == 1


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_rate_limits_apply_to_creating_sessions(
    gateways: GatewayFactory, redis: RedisServer, store: str
) -> None:
    gateway = await gateways.start(
        sessions=SESSIONS,
        redis={"url": redis.url},
        rate_limits=[
            # Named for session creation: per device.
            {
                "name": "creates",
                "commands": ["sessions.create"],
                "key": "query.did",
                "rate": "1/m",
                "store": store,
            },
            # For every command, so for session creation too: per uid.
            {"name": "everything", "key": "query.uid", "rate": "1/m", "burst": 1},
        ],
    )
    address = gateway.http_address
    assert (await fetch(address, "POST", f"{PATH}?uid=2&did=a")).status == 201
    refused = await fetch(address, "POST", f"{PATH}?uid=3&did=a")
    assert (refused.status, refused.json()["error"]["code"]) == (429, "rate_limited")
    assert "'creates'" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert (await fetch(address, "POST", f"{PATH}?uid=2&did=b")).status == 201
    refused = await fetch(address, "POST", f"{PATH}?uid=2&did=c")
    assert (refused.status, refused.json()["error"]["code"]) == (429, "rate_limited")
    assert "'everything'" in refused.json()["error"]["message"]
    assert len(gateway.push_sessions) == 2
    registry = gateway.metrics.registry
    for rule in ("creates", "everything"):
        assert registry.get_sample_value("tlvproxy_rate_limited_total", {"rule": rule}) == 1


async def test_paths_and_methods_under_the_sessions_path(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(sessions=SESSIONS)
    address = gateway.http_address
    session_id = await create(gateway)
    for method, target, status, code in (
        ("GET", PATH, 405, "method_not_allowed"),
        ("GET", f"{PATH}/{session_id}", 405, "method_not_allowed"),
        ("POST", f"{PATH}/{session_id}/poll", 405, "method_not_allowed"),
        ("GET", f"{PATH}/{session_id}/other", 404, "route_not_found"),
        ("GET", f"{PATH}/{session_id}/poll/more", 404, "route_not_found"),
        ("GET", f"{PATH}//poll", 404, "route_not_found"),
        ("GET", f"{PATH}/x/poll", 404, "session_not_found"),
        ("GET", f"{PATH}/{session_id}/poll?after=-1", 400, "bad_request"),
        ("GET", f"{PATH}/{session_id}/poll?after=1e3", 400, "bad_request"),
        ("GET", f"{PATH}sX", 404, "route_not_found"),
    ):
        answer = await fetch(address, method, target)
        assert (answer.status, answer.json()["error"]["code"]) == (status, code), target
        assert answer.headers["x-request-id"]
    allow = await fetch(address, "DELETE", f"{PATH}/{session_id}/events")
    assert allow.headers["allow"] == "GET"
    # A REST route that merely starts like the path is routed as ever.
    assert (await fetch(address, "POST", "/v1/echo", {"n": 1})).json() == {"n": 1}


async def test_a_poll_after_a_push_not_made_yet_is_refused(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(sessions={**SESSIONS, "poll_timeout": "200ms"})
    session_id = await create(gateway)
    await register(gateway, session_id)
    await push(gateway, 2, "one")
    while not (await poll(gateway, session_id)).json()["messages"]:
        pass  # until push 1 is kept
    # Waiting for push 3 would answer push 2 with nothing, and the client,
    # polling after 2 from then on, would never see it.
    beyond = await poll(gateway, session_id, after=2)
    assert (beyond.status, beyond.json()["error"]["code"]) == (400, "bad_request")
    assert "beyond the session's last push, 1" in beyond.json()["error"]["message"]
    await push(gateway, 2, "two")
    polled = await poll(gateway, session_id, after=1)
    assert [m["body"]["text"] for m in polled.json()["messages"]] == ["two"]


async def test_a_poll_and_a_stream_on_one_keep_alive_connection(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(sessions={**SESSIONS, "poll_timeout": "200ms"})
    session_id = await create(gateway)
    await register(gateway, session_id)
    await push(gateway, 2, "kept")
    client = await HttpClient.connect(gateway.http_address)
    polled = await client.request("GET", f"{PATH}/{session_id}/poll")
    assert [m["id"] for m in polled.json()["messages"]] == [1]
    waited = await client.request("GET", f"{PATH}/{session_id}/poll?after=1")
    assert waited.json() == {"messages": [], "next": 1}
    # The stream takes the connection over once the answers before it are out.
    await client.stream.send_all(stream_request(f"{PATH}/{session_id}/events?after=0"))
    received = b""
    while b"data: " not in received:
        received += await client.stream.receive_some(65536)
    assert b"text/event-stream" in received
    assert b"id: 1\n" in received
    await client.aclose()


async def test_sessions_count_against_the_connection_limits(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(sessions=SESSIONS, limits={"max_connections_per_ip": 3})
    client = await HttpClient.connect(gateway.http_address)
    first = await client.request("POST", f"{PATH}?uid=2&did=a")
    assert (await client.request("POST", f"{PATH}?uid=3&did=b")).status == 201
    # This connection and two sessions: a third session is one too many.
    refused = await client.request("POST", f"{PATH}?uid=4&did=c")
    assert (refused.status, refused.json()["error"]["code"]) == (503, "overloaded")
    deleted = await client.request("DELETE", first.headers["location"])
    assert deleted.status == 204
    await trio.testing.wait_all_tasks_blocked()  # the session's task has let go
    assert (await client.request("POST", f"{PATH}?uid=4&did=c")).status == 201
    await client.aclose()


async def test_no_healthy_node_refuses_the_session(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(
        sessions=SESSIONS, upstreams={"im": {"nodes": ["127.0.0.1:1"], "retries": 0}}
    )
    answer = await fetch(gateway.http_address, "POST", f"{PATH}?uid=2&did=a")
    assert (answer.status, answer.json()["error"]["code"]) == (502, "upstream_unavailable")
    assert len(gateway.push_sessions) == 0


async def test_a_deleted_session_answers_its_waiting_poll(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await gateways.start(sessions={**SESSIONS, "poll_timeout": "20s"})
    session_id = await create(gateway)
    caplog.set_level(logging.INFO, "tlvproxy.access")
    async with trio.open_nursery() as nursery:
        answers: list[Answer] = []

        async def waiting() -> None:
            answers.append(await poll(gateway, session_id))

        nursery.start_soon(waiting)
        await trio.sleep(0.2)
        deleted = await fetch(gateway.http_address, "DELETE", f"{PATH}/{session_id}")
        assert deleted.status == 204
    assert answers[0].json() == {"messages": [], "next": 0, "closed": "deleted"}
    await trio.testing.wait_all_tasks_blocked()  # the session's task has ended
    [record] = [r for r in caplog.records if r.getMessage() == "push session"]
    assert record.closed == "deleted"  # type: ignore[attr-defined]


async def test_a_session_the_drain_ends_while_it_opens_is_recorded_as_answered(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture, autojump_clock: Any
) -> None:
    # A node whose accept queue is full: it drops the SYN of every connect,
    # so the session's connection never opens.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    host, port = silent.getsockname()
    fillers = [socket.socket() for _ in range(2)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex((host, port))
    gateway = await gateways.start(
        sessions=SESSIONS,
        upstreams={"im": {"nodes": [f"{host}:{port}"], "heartbeat": None, "connect_timeout": "1m"}},
        shutdown_timeout="2s",
    )
    caplog.set_level(logging.INFO, "tlvproxy.access")
    address = gateway.http_address
    assert address is not None
    async with await trio.open_tcp_stream(address.host, address.port) as client:
        await client.send_all(b"POST /v1/sessions?uid=2&did=a HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(1)  # the session's connect is on its way
        gateway.drain()
        received = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await client.receive_some(65536):
                received += chunk
    # Answered 503 (when the answer made it out before the connection was
    # closed at shutdown_timeout), and recorded so.
    assert received == b"" or received.startswith(b"HTTP/1.1 503 "), received
    [record] = [r for r in caplog.records if r.getMessage() == "push session"]
    assert record.status == 503  # type: ignore[attr-defined]
    assert record.closed == "shutting_down"  # type: ignore[attr-defined]
    for sock in (silent, *fillers):
        sock.close()


async def test_cors_headers_on_session_answers(gateways: GatewayFactory) -> None:
    origin = "https://web.example.com"
    gateway = await gateways.start(sessions=SESSIONS, cors={"origins": [origin]})
    answer = await fetch(
        gateway.http_address, "POST", f"{PATH}?uid=2&did=a", headers={"Origin": origin}
    )
    assert answer.status == 201
    assert answer.headers["access-control-allow-origin"] == origin
    session_id = answer.json()["session"]
    events = await Events.open(gateway, f"{PATH}/{session_id}/events", {"Origin": origin})
    assert events.headers["access-control-allow-origin"] == origin
    await events.close()


async def test_a_stream_whose_client_does_not_read_ends_and_resumes(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await gateways.start(sessions=SESSIONS)
    session_id = await create(gateway)
    await register(gateway, session_id)
    address = gateway.http_address
    assert address is not None
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    await sock.connect((address.host, address.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(stream_request(f"{PATH}/{session_id}/events"))
    text = "x" * 400_000
    for n in range(16):  # 6.4 MB of pushes, none read
        await push(gateway, 2, f"{n}{text}")
    assert any("not reading" in r.getMessage() for r in caplog.records)
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk  # what was sent before the stream ended, then the end
    assert received.count(b"\nid: ") < 16
    # The pushes are kept (the last 4 MiB of them): the client resumes.
    events = await Events.open(gateway, f"{PATH}/{session_id}/events?after=0")
    gap = await events.next()
    assert gap is not None
    assert gap.kind == "gap"
    kept = [await events.next() for _ in range(16 - gap.json()["missed_to"])]
    assert [event.id for event in kept if event] == [
        str(n) for n in range(gap.json()["missed_to"] + 1, 17)
    ]
    await events.close()


async def test_a_worker_keeps_at_most_max_buffered_per_worker_of_pushes(
    gateways: GatewayFactory,
) -> None:
    gateway = await gateways.start(
        sessions={**SESSIONS, "max_buffered_per_worker": "100 KiB"}, rate_limits=[]
    )
    first = await create(gateway, "uid=2&did=a")
    second = await create(gateway, "uid=3&did=b")
    for session_id in (first, second):
        await register(gateway, session_id)
    text = "x" * 40_000
    for n in (1, 2, 3):
        await push(gateway, 2, f"{n}{text}")
    await push(gateway, 3, f"4{text}")
    await push(gateway, 3, f"5{text}")  # the second's push wait: the worker's oldest go
    while len((await poll(gateway, second)).json()["messages"]) < 2:
        pass
    # The first session's pushes went, oldest first, to make room: a gap.
    polled = (await poll(gateway, first)).json()
    assert polled == {"messages": [], "next": 3, "gap": True}
    events = await Events.open(gateway, f"{PATH}/{first}/events")
    gap = await events.next()
    assert gap is not None
    assert (gap.kind, gap.json()) == ("gap", {"missed_from": 1, "missed_to": 3})
    await events.close()
    kept = (await poll(gateway, second)).json()["messages"]
    assert [message["body"]["text"][0] for message in kept] == ["4", "5"]
    # Its numbering goes on, and a session that ends gives its bytes back.
    await push(gateway, 2, "6")
    while not (await poll(gateway, first, after=3)).json()["messages"]:
        pass
    assert [m["id"] for m in (await poll(gateway, first, after=3)).json()["messages"]] == [4]
    assert gateway.push_sessions.kept.bytes > 80_000
    for session_id in (first, second):
        assert (await fetch(gateway.http_address, "DELETE", f"{PATH}/{session_id}")).status == 204
    await trio.testing.wait_all_tasks_blocked()
    assert gateway.push_sessions.kept.bytes == 0


async def test_an_idle_session_holds_nothing_of_the_request_that_opened_it(
    gateways: GatewayFactory,
) -> None:
    gateway = await gateways.start(sessions=SESSIONS)
    client = await HttpClient.connect(gateway.http_address)

    def answers() -> int:
        gc.collect()
        return sum(isinstance(thing, http_conn.Answer) for thing in gc.get_objects())

    before = answers()
    for uid in range(20):
        assert (await client.request("POST", f"{PATH}?uid={uid}&did=d")).status == 201
    await client.aclose()
    await trio.testing.wait_all_tasks_blocked()
    # Each create's answer (and through it its HTTP connection) is let go of.
    assert answers() == before
    assert len(gateway.push_sessions) == 20


async def test_a_session_keeps_its_table_across_a_reload(gateways: GatewayFactory) -> None:
    gateway = await gateways.start(sessions=SESSIONS)
    session_id = await create(gateway)
    await register(gateway, session_id)
    events = await Events.open(gateway, f"{PATH}/{session_id}/events")
    admin = gateway.admin_address
    assert admin is not None
    async with await trio.open_tcp_stream(admin.host, admin.port) as stream:
        await stream.send_all(b"GET /admin/config HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        while (head := split_head(received)) is None or len(head[2]) < int(
            head[1]["content-length"]
        ):
            received += await stream.receive_some(65536)
    config = json.loads(head[2])
    assert config["sessions"] == {"path": PATH, "upstream": "im", "auth": None}
    # The echo command goes away with the reload; the session keeps its table.
    table = gateway.table.source
    assert table is not None
    document = yaml.safe_load(table.read_text())
    document["commands"] = [c for c in document["commands"] if c["name"] != "echo"]
    table.write_text(yaml.safe_dump(document))
    await gateway.reload()
    assert "echo" not in gateway.table.commands_by_name
    await push(gateway, 2, "after the reload")
    pushed = await events.next()
    assert pushed is not None
    assert pushed.json()["body"]["text"] == "after the reload"
    answer = await send(gateway, session_id, {"cmd": "echo", "seq": 5, "body": [1]})
    assert answer.json() == {"cmd": "echo", "seq": 5, "status": 0, "body": [1]}
    # A session created now is on the new table.
    newer = await create(gateway, "uid=3&did=b")
    refused = await send(gateway, newer, {"cmd": "echo", "seq": 6})
    assert refused.json()["error"]["code"] == "bad_request"
    await events.close()

"""The WebSocket gateway (SPEC 5) end to end: a real client, the real HTTP driver
and pool, and the real mock upstream, all on 127.0.0.1."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import struct
import sys
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.fixtures import FIXTURE_TABLE
from tests.stores.local import local_checks
from tlvproxy.auth.authenticators import Authenticators
from tlvproxy.config.loader import load_table
from tlvproxy.metrics import Metrics, RequestTally
from tlvproxy.mock_upstream import serve_mock_upstream
from tlvproxy.policy.waf import Waf
from tlvproxy.server import ws_reading
from tlvproxy.server.access_log import AccessLog
from tlvproxy.server.http_conn import HttpSettings, serve_http_connection
from tlvproxy.server.read_hub import ReadHub
from tlvproxy.server.rest import RestHandler, error_response_for
from tlvproxy.server.websocket import WebSocketSessions, serve_websocket
from tlvproxy.server.ws_calls import BinaryCall, JsonCall
from tlvproxy.server.ws_session import WebSocketSession
from tlvproxy.server.ws_writing import OUTGOING_QUEUE
from tlvproxy.stores.limits import RateLimits
from tlvproxy.stores.redis_store import RedisBuckets
from tlvproxy.upstream.pool import Pool, open_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tlvproxy.config.model import Table

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
HEADER = struct.Struct(">BBHIIIHH")  # SPEC 1 default header, packed by hand


# ---------------------------------------------------------------- a tiny client


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class Client:
    """A WebSocket client on trio + wsproto that answers closes like a browser."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._pending: list[Any] = []
        self._text: list[str] = []
        self._bytes: list[bytes] = []

    @classmethod
    async def connect(
        cls, port: int, target: str = "/ws?uid=1&did=a", *, receive_buffer: int | None = None
    ) -> Client:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            # Before connect, so the window the client offers stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="localhost", target=target)))
        client = cls(stream, ws)
        while True:
            events = await client._events()
            for index, event in enumerate(events):
                if isinstance(event, RejectConnection | RejectData):
                    raise AssertionError(f"handshake rejected: {event}")
                if isinstance(event, AcceptConnection):
                    client._pending.extend(events[index + 1 :])
                    return client

    async def _events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        event = (
            BytesMessage(data=message) if isinstance(message, bytes) else TextMessage(data=message)
        )
        await self.stream.send_all(self.ws.send(event))

    async def receive(self) -> str | bytes:
        """The next message; raises Closed (after answering the close) at the end."""
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        text = "".join(self._text)
                        self._text.clear()
                        return text
                elif isinstance(event, BytesMessage):
                    self._bytes.append(bytes(event.data))
                    if event.message_finished:
                        data = b"".join(self._bytes)
                        self._bytes.clear()
                        return data
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self.stream.send_all(self.ws.send(event.response()))
                    raise Closed(event.code, event.reason or "")
                elif isinstance(event, Pong):
                    return f"pong:{event.payload.decode()}"
            self._pending.extend(await self._events())

    async def receive_json(self) -> Any:
        message = await self.receive()
        assert isinstance(message, str), message
        return json.loads(message)

    async def call(self, cmd: str | int, seq: int, body: Any = None) -> Any:
        message: dict[str, Any] = {"cmd": cmd, "seq": seq}
        if body is not None:
            message["body"] = body
        await self.send(message)
        return await self.receive_json()

    async def drain(self, into: list[str | bytes]) -> None:
        """Put every message into `into` until the close, which raises Closed."""
        while True:
            into.append(await self.receive())

    async def expect_close(self) -> Closed:
        with pytest.raises(Closed) as info:
            await self.drain([])
        return info.value

    async def close(self, code: int = 1000) -> None:
        await self.stream.send_all(self.ws.send(CloseConnection(code=code)))
        await self.expect_close()
        await self.stream.aclose()


async def raw_exchange(port: int, head: bytes, *, until_close: bool = True) -> bytes:
    """Send `head` and read until the server closes (or, if not `until_close`, the
    end of the answer's head)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        answer = b""
        while until_close or b"\r\n\r\n" not in answer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            answer += chunk
    return answer


# ---------------------------------------------------------------- the gateway


TABLE = """
listen: {{http: 127.0.0.1:0, admin: null}}
proto: {{paths: [{proto}], files: [demo/im.proto]}}
upstreams:
  im:
    nodes: [{nodes}]
    balance: consistent_hash
    hash_on: query.did
    connect_timeout: 1s
    timeout: {timeout}
    health: {{unhealthy_after: 1, healthy_after: 1}}
{upstreams}
commands:
  - name: heartbeat
    command: 0x0001
    upstream: im
    request: demo.im.Heartbeat
    response: demo.im.Heartbeat
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.SendMessageRequest
    response: demo.im.SendMessageResponse
  - name: get_profile
    command: 0x1002
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
  - name: echo
    command: 0x1003
    upstream: im
    codec: json
  - name: new_message
    command: 0x2001
    push: demo.im.MessagePush
{commands}
websocket:
  path: /ws
  upstream: im
  hash_on: query.did
  uid: query.uid
  mode: {mode}
  max_message: {max_message}
  idle_timeout: {idle_timeout}
{extra}
"""


def make_table(
    tmp_path: Path,
    nodes: list[str],
    *,
    mode: str = "json",
    max_message: str = "64 KiB",
    idle_timeout: str = "120s",
    timeout: str = "3s",
    extra: str = "",
    upstreams: str = "",
    commands: str = "",
) -> Table:
    path = tmp_path / "commands.yaml"
    path.write_text(
        TABLE.format(
            proto=PROTO_ROOT,
            nodes=", ".join(nodes),
            mode=mode,
            max_message=max_message,
            idle_timeout=idle_timeout,
            timeout=timeout,
            extra=extra,
            upstreams=upstreams,
            commands=commands,
        )
    )
    return load_table(path)


@attrs.frozen
class Runtime:
    table: Table
    pools: dict[str, Pool]
    limiter: RateLimits
    waf: Waf
    auth: Authenticators
    traffic: dict[str, Any]


@attrs.frozen
class Gateway:
    port: int
    sessions: WebSocketSessions
    metrics: Metrics
    hub_scope: trio.CancelScope  # the read hub's task runs in it


class WrappedStream(trio.abc.Stream):
    """A stream that is not a socket's (as a TLS stream is not)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def open_mock_upstream() -> AsyncIterator[tuple[str, trio.CancelScope]]:
    """The real mock upstream on 127.0.0.1:0; cancel the scope to take it down."""
    stop = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[str]) -> None:
        with stop:
            demo = await trio.to_thread.run_sync(load_table, FIXTURE_TABLE)
            await serve_mock_upstream("127.0.0.1", 0, demo, task_status=task_status)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve)
        yield address, stop
        nursery.cancel_scope.cancel()


def _no_key_urls(spec: Any) -> Any:
    raise AssertionError(f"these tests fetch no key set ({spec.keys})")


@asynccontextmanager
async def open_gateway(
    table: Table,
    *,
    send_buffer: int | None = None,
    wrap: bool = False,
    redis: str | None = None,
    read_hub: bool = True,
) -> AsyncIterator[Gateway]:
    """The HTTP driver with `serve_websocket` as its upgrade handler, on a real pool.

    `send_buffer` sets SO_SNDBUF on the gateway's side of each client connection;
    `wrap` hands the session a `WrappedStream` instead of the socket's stream;
    `redis` is the URL of the store of `store: redis` rate limits; with
    `read_hub`, a worker's read hub waits for the sessions' bytes, as in the
    gateway, else each session's task waits for its own.
    """
    metrics = Metrics()
    sessions = WebSocketSessions()
    with local_checks() as local:
        async with (
            trio.open_nursery() as nursery,
            open_pool(table.upstreams["im"], table.framing, metrics) as pool,
        ):
            nursery.start_soon(local.run)
            hub = None
            hub_scope = trio.CancelScope()
            if read_hub:
                hub = ReadHub()

                async def run_hub(*, task_status: trio.TaskStatus[None]) -> None:
                    assert hub is not None
                    with hub_scope:
                        await hub.run(task_status=task_status)

                await nursery.start(run_hub)
            shared = None
            if redis is not None:
                shared = RedisBuckets(redis)
                await nursery.start(shared.run)
            runtime = Runtime(
                table=table,
                pools={"im": pool},
                limiter=RateLimits(table.rate_limits, metrics, local=local, redis=shared),
                waf=Waf(table.waf),
                auth=Authenticators(table.auth, metrics, _no_key_urls),
                traffic={},
            )
            settings = HttpSettings.from_limits(table.limits, "h11")
            tally = RequestTally(metrics)
            rest = RestHandler(lambda: runtime, metrics, AccessLog(tally=tally), tally)
            nursery.start_soon(rest.run)
            errors = error_response_for(lambda: runtime, metrics)

            async def upgrade(request: Any, stream: trio.abc.Stream, leftover: bytes) -> None:
                if wrap:
                    stream = WrappedStream(stream)
                await serve_websocket(
                    request,
                    stream,
                    leftover,
                    runtime=runtime,
                    metrics=metrics,
                    sessions=sessions,
                    read_hub=hub,
                )

            async def handle(stream: trio.SocketStream) -> None:
                if send_buffer is not None:
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
                peer = stream.socket.getpeername()[0]
                await serve_http_connection(
                    stream,
                    peer,
                    settings,
                    rest,
                    errors,
                    upgrade=upgrade,
                    draining=sessions.is_draining,
                    read_hub=hub,
                )

            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            yield Gateway(port=port, sessions=sessions, metrics=metrics, hub_scope=hub_scope)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, trio.CancelScope]]:
    async with open_mock_upstream() as found:
        yield found


@pytest.fixture(params=["hub", "task"])
async def gateway(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> AsyncIterator[Gateway]:
    """A gateway whose sessions' bytes the read hub waits for ("hub"), or each
    session's task ("task": the hub does not run, as while a worker stops)."""
    table = make_table(tmp_path, [upstream[0]])
    async with open_gateway(table, read_hub=request.param == "hub") as found:
        yield found


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def frame(command: int, seq: int, body: bytes, *, uid: int = 0, flags: int = 0) -> bytes:
    return b"\x09" + HEADER.pack(1, flags, command, seq, uid, len(body), 0, 0) + body + b"\x0a"


def unframe(data: bytes) -> tuple[int, int, int, int, int, bytes]:
    """(flags, command, seq, uid, status, body) of one hand-parsed frame."""
    assert data[0] == 0x09
    assert data[-1] == 0x0A
    _version, flags, command, seq, uid, length, status, _reserved = HEADER.unpack_from(data, 1)
    body = data[1 + HEADER.size : -1]
    assert len(body) == length
    return flags, command, seq, uid, status, body


@attrs.define
class SilentUpstream:
    """A TLV node that accepts and reads but never answers."""

    node: str = ""
    accepted: int = 0
    closed: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self._note()
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass  # a reset is a close too
        self.closed += 1
        self._note()


@asynccontextmanager
async def open_silent_upstream() -> AsyncIterator[SilentUpstream]:
    silent = SilentUpstream()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent.serve, 0, host="127.0.0.1"))
        silent.node = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield silent
        nursery.cancel_scope.cancel()


@attrs.define
class ScriptedUpstream:
    """A TLV node whose answers the test writes by hand: it collects the requests
    of its one connection, parsed with `struct` (an independent reading of SPEC 1)."""

    node: str = ""
    stream: trio.SocketStream | None = None
    requests: list[tuple[int, int, int, bytes]] = attrs.field(
        factory=list
    )  # command, seq, uid, body
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def serve(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while data := await stream.receive_some(65536):
            # The connection that sends requests; the pool's probes send none.
            self.stream = stream
            buffer += data
            while len(buffer) >= 2 + HEADER.size:
                end = 1 + HEADER.size + HEADER.unpack_from(buffer, 1)[5] + 1
                if len(buffer) < end:
                    break
                _flags, command, seq, uid, _status, body = unframe(buffer[:end])
                self.requests.append((command, seq, uid, body))
                buffer = buffer[end:]
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, count: int) -> list[tuple[int, int, int, bytes]]:
        with trio.fail_after(10):
            while len(self.requests) < count:
                await self.changed.wait()
        return self.requests

    async def send(self, data: bytes) -> None:
        assert self.stream is not None
        await self.stream.send_all(data)


@asynccontextmanager
async def open_scripted_upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, scripted.serve, 0, host="127.0.0.1")
        )
        scripted.node = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield scripted
        nursery.cancel_scope.cancel()


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame packed by hand (RFC 6455 5.2), masked with a fixed key."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126:
        head = struct.pack("!BB", first, mask_bit | len(payload))
    elif len(payload) < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, len(payload))
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, len(payload))
    if not masked:
        return head + payload
    key = b"\x12\x34\x56\x78"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class LogWatcher(logging.Handler):
    """Collects the records of one logger; `wait_for(n)` waits until n arrived."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self._arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[logging.LogRecord]:
        with trio.fail_after(10):
            while len(self.records) < count:
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self.records

    def __enter__(self) -> LogWatcher:
        self.logger.addHandler(self)
        self.previous_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.previous_level)


# ---------------------------------------------------------------- json mode


async def test_request_and_response(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port)
    assert await client.call("echo", 7, {"text": "hi", "n": [1, 2]}) == {
        "cmd": "echo",
        "seq": 7,
        "status": 0,
        "body": {"text": "hi", "n": [1, 2]},
    }
    # By number, as a string or an integer (SPEC 5: a command's name or number).
    answer = await client.call("0x1002", 8, {"user_id": 42})
    assert answer["cmd"] == "get_profile"
    assert answer["seq"] == 8
    assert answer["status"] == 0
    assert answer["body"]["user_id"] == 42
    assert (await client.call(0x1003, 9, [1]))["body"] == [1]
    await client.close()
    assert sample(gateway.metrics, "tlvproxy_websocket_messages_total", {"direction": "in"}) == 3
    assert sample(gateway.metrics, "tlvproxy_websocket_messages_total", {"direction": "out"}) == 3


async def test_requests_of_one_session_run_concurrently(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port)
    for seq in range(20):
        await client.send({"cmd": "echo", "seq": seq, "body": seq})
    answers = [await client.receive_json() for _ in range(20)]
    assert sorted(a["seq"] for a in answers) == list(range(20))
    assert all(a["body"] == a["seq"] for a in answers)
    await client.close()


async def test_push_reaches_the_recipients_session_only(gateway: Gateway) -> None:
    alice = await Client.connect(gateway.port, "/ws?uid=1&did=alice")
    bob = await Client.connect(gateway.port, "/ws?uid=2&did=bob")
    # Each session's first request tells the upstream whose connection it is.
    assert (await bob.call("echo", 1, {}))["status"] == 0
    sent = await alice.call("send_message", 2, {"to_uid": 2, "text": "hello bob"})
    assert sent["status"] == 0
    assert sent["seq"] == 2
    push = await bob.receive_json()
    assert push["cmd"] == "new_message"
    assert push["push"] is True
    assert push["body"]["from_uid"] == 1
    assert push["body"]["to_uid"] == 2
    assert push["body"]["text"] == "hello bob"
    assert push["body"]["msg_id"] == sent["body"]["msg_id"]
    # Alice's next message is her own answer: the push did not reach her.
    assert (await alice.call("echo", 3, "x"))["seq"] == 3
    await alice.close()
    await bob.close()


@pytest.mark.parametrize(
    ("message", "seq", "expected"),
    [
        ("{not json", None, "message is not valid JSON"),
        ("[" * 30_000 + "]" * 30_000, None, "nested too deeply"),
        ('["echo", 1]', None, "must be a JSON object"),
        ('{"cmd": "echo", "body": {}}', None, '"seq" must be an integer'),
        ('{"cmd": "echo", "seq": "7"}', "7", '"seq" must be an integer'),
        ('{"cmd": "nope", "seq": 4}', 4, "unknown command 'nope'"),
        ('{"cmd": 4660, "seq": 4}', 4, "unknown command 4660"),
        ('{"seq": 4}', 4, '"cmd" is missing'),
        ('{"cmd": "echo", "seq": 4, "bdy": 1}', 4, "unknown member(s) 'bdy'"),
        ('{"cmd": "new_message", "seq": 5}', 5, "is a push command"),
        ('{"cmd": "get_profile", "seq": 6, "body": {"user_id": "x"}}', 6, "user_id"),
        ('{"cmd": "get_profile", "seq": 6, "body": {"nope": 1}}', 6, "nope"),
    ],
)
async def test_bad_messages_get_a_per_message_error(
    gateway: Gateway, message: str, seq: object, expected: str
) -> None:
    client = await Client.connect(gateway.port)
    await client.send(message)
    answer = await client.receive_json()
    assert answer["seq"] == seq
    assert answer["error"]["code"] == "bad_request"
    assert expected in answer["error"]["message"]
    # The session stays open (SPEC 5).
    assert (await client.call("echo", 10, 1))["body"] == 1
    await client.close()


async def test_a_binary_message_in_json_mode_is_a_per_message_error(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port)
    await client.send(frame(0x1003, 1, b"{}"))
    answer = await client.receive_json()
    assert answer["error"]["code"] == "bad_request"
    assert "json mode takes text messages" in answer["error"]["message"]
    await client.close()


async def test_non_zero_upstream_status_is_a_response_with_that_status(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port)
    # The mock upstream answers status 2 (not found) for an unknown user.
    answer = await client.call("get_profile", 3, {"user_id": 0})
    assert answer["seq"] == 3
    assert answer["status"] != 0
    assert "error" not in answer
    await client.close()


async def test_rate_limited_messages_get_a_per_message_error(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    extra = """
rate_limits:
  - name: echo_per_uid
    commands: [echo]
    key: query.uid
    rate: 1/m
    burst: 1
"""
    async with open_gateway(make_table(tmp_path, [upstream[0]], extra=extra)) as gateway:
        client = await Client.connect(gateway.port)
        other = await Client.connect(gateway.port, "/ws?uid=2&did=b")
        assert (await client.call("echo", 1, 1))["status"] == 0
        assert (await client.call("echo", 2, 2))["status"] == 0
        refused = await client.call("echo", 3, 3)
        assert refused["seq"] == 3
        assert refused["error"]["code"] == "rate_limited"
        assert "echo_per_uid" in refused["error"]["message"]
        # Another key, and another command, are not limited.
        assert (await other.call("echo", 1, 1))["status"] == 0
        assert (await client.call("get_profile", 4, {"user_id": 1}))["status"] == 0
        assert sample(gateway.metrics, "tlvproxy_rate_limited_total", {"rule": "echo_per_uid"}) == 1
        await client.close()
        await other.close()


async def test_upstream_timeout_is_a_per_message_error(tmp_path: Path, autojump_clock: Any) -> None:
    async with (
        open_silent_upstream() as silent,
        open_gateway(make_table(tmp_path, [silent.node], timeout="2s")) as gateway,
    ):
        client = await Client.connect(gateway.port)
        answer = await client.call("echo", 5, {})
        assert answer["seq"] == 5
        assert answer["error"]["code"] == "upstream_timeout"
        assert "2 s" in answer["error"]["message"]
        # Still open: the next request gets its own answer (another timeout).
        assert (await client.call("echo", 6, {}))["seq"] == 6
        await client.close()


async def test_requests_are_state_and_time_out_from_the_deadline_heap(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with (
        open_scripted_upstream() as upstream,
        open_gateway(make_table(tmp_path, [upstream.node], timeout="2s")) as gateway,
    ):
        client = await Client.connect(gateway.port)
        await upstream.wait_for(0)
        await trio.testing.wait_all_tasks_blocked()
        idle_tasks = count_tasks()
        started = trio.current_time()
        await client.send({"cmd": "echo", "seq": 1, "body": 1})
        await trio.sleep(1)
        await client.send({"cmd": "echo", "seq": 2, "body": 2})
        await trio.sleep(0.5)
        await client.send({"cmd": "echo", "seq": 3, "body": 3})
        requests = await upstream.wait_for(3)
        # Three requests in flight, and not one task more.
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == idle_tasks
        await upstream.send(frame(0x1003, requests[1][1], b"2", flags=1))
        answers = []
        for _ in range(3):
            answer = await client.receive_json()
            answers.append((answer["seq"], trio.current_time() - started))
        assert answers[0] == (2, pytest.approx(1.5, abs=0.1))
        assert answers[1] == (1, pytest.approx(2.0, abs=0.1))
        assert answers[2] == (3, pytest.approx(3.5, abs=0.1))
        # The late answer to seq 1 is dropped and counted; the session goes on.
        await upstream.send(frame(0x1003, requests[0][1], b"1", flags=1))
        await client.send({"cmd": "echo", "seq": 4, "body": 4})
        requests = await upstream.wait_for(4)
        await upstream.send(frame(0x1003, requests[3][1], b"4", flags=1))
        assert (await client.receive_json())["body"] == 4
        rejected = sample(
            gateway.metrics, "tlvproxy_frames_rejected_total", {"reason": "unknown_seq"}
        )
        assert rejected == 1
        timeouts = sample(
            gateway.metrics,
            "tlvproxy_upstream_requests_total",
            {"upstream": "im", "node": upstream.node, "outcome": "timeout"},
        )
        assert timeouts == 2
        await client.close()


async def test_a_push_arriving_while_requests_wait_goes_out_at_once(tmp_path: Path) -> None:
    async with (
        open_scripted_upstream() as upstream,
        open_gateway(make_table(tmp_path, [upstream.node])) as gateway,
    ):
        client = await Client.connect(gateway.port)
        await client.send({"cmd": "echo", "seq": 1, "body": "one"})
        await client.send({"cmd": "echo", "seq": 2, "body": "two"})
        requests = await upstream.wait_for(2)
        # MessagePush{to_uid: 1, text: "hi"}, then the answers in reverse order.
        push = frame(0x2001, 0, b"\x10\x01\x1a\x02hi", flags=2)
        await upstream.send(push)
        pushed = await client.receive_json()
        assert (pushed["cmd"], pushed["push"]) == ("new_message", True)
        assert (pushed["body"]["to_uid"], pushed["body"]["text"]) == (1, "hi")
        await upstream.send(
            frame(0x1003, requests[1][1], b'"two"', flags=1)
            + push
            + frame(0x1003, requests[0][1], b'"one"', flags=1)
        )
        assert (await client.receive_json())["seq"] == 2
        assert (await client.receive_json())["push"] is True
        assert (await client.receive_json())["seq"] == 1
        await client.close()


async def test_a_client_that_stops_reading_gets_every_answer_when_it_reads_again(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]]), send_buffer=4096) as gateway:
        client = await Client.connect(gateway.port, receive_buffer=4096)
        assert (await client.call("echo", 0, 0))["body"] == 0
        body = "x" * 30_000
        count = OUTGOING_QUEUE // 2
        for seq in range(1, count + 1):
            await client.send({"cmd": "echo", "seq": seq, "body": body})
        # The socket takes a few answers, then one flush task writes the rest
        # (not one per message) as the client reads again.
        with trio.fail_after(10):
            while not count_tasks("._flush"):  # noqa: ASYNC110 - no event says a write blocked
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks("._flush") == 1
        answers = [await client.receive_json() for _ in range(count)]
        assert sorted(a["seq"] for a in answers) == list(range(1, count + 1))
        assert all(a["body"] == body for a in answers)
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks("._flush") == 0
        assert (await client.call("echo", 99, 99))["body"] == 99
        await client.close()


@pytest.mark.parametrize("read_hub", [True, False], ids=["hub", "task"])
async def test_past_32_requests_in_flight_reading_waits_for_an_answer(
    tmp_path: Path, read_hub: bool
) -> None:
    async with (
        open_scripted_upstream() as upstream,
        open_gateway(make_table(tmp_path, [upstream.node]), read_hub=read_hub) as gateway,
    ):
        client = await Client.connect(gateway.port)
        for seq in range(40):
            await client.send({"cmd": "echo", "seq": seq, "body": seq})
        requests = await upstream.wait_for(32)
        await trio.testing.wait_all_tasks_blocked()
        assert len(requests) == 32  # the 33rd message waits, unread
        answered: list[int] = []
        for index in range(40):
            # Each answer frees a slot: the next message goes upstream.
            requests = await upstream.wait_for(min(32 + index, 40))
            await trio.testing.wait_all_tasks_blocked()
            assert len(requests) == min(32 + index, 40)
            _, upstream_seq, _, body = requests[index]
            await upstream.send(frame(0x1003, upstream_seq, body, flags=1))
            answered.append((await client.receive_json())["seq"])
        assert answered == list(range(40))
        await client.close()


async def test_reads_that_fill_the_buffer_lose_no_message(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reads of 1 KiB, and three messages of 5 KB that arrive together: a read
    # leaves bytes behind it, which no new readiness announces.
    monkeypatch.setattr(ws_reading, "READ_SIZE", 1024)
    client = await Client.connect(gateway.port)
    assert (await client.call("echo", 9, 9))["body"] == 9
    await trio.testing.wait_all_tasks_blocked()  # the session waits for bytes
    bodies = [str(seq) * 5_000 for seq in range(3)]
    data = b"".join(
        client.ws.send(TextMessage(data=json.dumps({"cmd": "echo", "seq": seq, "body": body})))
        for seq, body in enumerate(bodies)
    )
    await client.stream.send_all(data)
    with trio.fail_after(10):
        answers = [await client.receive_json() for _ in bodies]
    # (In the order of the upstream's answers.)
    assert sorted((answer["seq"], answer["body"]) for answer in answers) == list(enumerate(bodies))
    await client.close()


@pytest.mark.parametrize("read_hub", [True, False], ids=["hub", "task"])
async def test_a_client_gone_behind_a_full_read_ends_its_session(
    tmp_path: Path,
    upstream: tuple[str, trio.CancelScope],
    read_hub: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reads of 1 KiB; 5 KB of a message and the client's FIN arrive together:
    # the end of the stream is behind full reads and a short one, and gets
    # no readiness of its own.
    monkeypatch.setattr(ws_reading, "READ_SIZE", 1024)
    table = make_table(tmp_path, [upstream[0]], idle_timeout="60s")
    async with open_gateway(table, read_hub=read_hub) as gateway:
        with LogWatcher("tlvproxy.access") as access:
            client = await Client.connect(gateway.port)
            assert (await client.call("echo", 1, 1))["status"] == 0
            await trio.testing.wait_all_tasks_blocked()  # the session waits for bytes
            message = json.dumps({"cmd": "echo", "seq": 2, "body": "x" * 20_000})
            whole = client.ws.send(TextMessage(data=message))
            # Written without a checkpoint, through a second descriptor of the socket.
            with socket.socket(fileno=os.dup(client.stream.socket.fileno())) as raw:
                assert raw.send(whole[:5_000]) == 5_000
                raw.shutdown(socket.SHUT_WR)
            [record] = await access.wait_for(1)  # within 10 s, not the idle 60 s
    assert (record.close_code, record.messages_in) == (1006, 1)


async def test_a_client_whose_bytes_never_stop_does_not_hold_the_worker(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process floods a session with pings for 3 s, never reading the
    # pongs; with reads of 1 KiB, each read of the session finds more bytes.
    # Meanwhile a task of the worker's must still run every few milliseconds.
    monkeypatch.setattr(ws_reading, "READ_SIZE", 1024)
    flood = r"""
import socket, struct, sys, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"GET /ws?uid=1&did=a HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += sock.recv(4096)
ping = struct.pack("!BB", 0x89, 0x80 | 100) + b"mask" + b"x" * 100
chunk = ping * 20_000
end = time.monotonic() + 3
while time.monotonic() < end:
    sock.sendall(chunk)
sock.close()
"""
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, [sys.executable, "-c", flood, str(gateway.port)])
        )
        longest = 0.0
        last = trio.current_time()
        while process.returncode is None:
            await trio.sleep(0.005)
            now = trio.current_time()
            longest = max(longest, now - last)
            last = now
    assert process.returncode == 0
    assert longest < 1.0, f"the worker's other tasks waited {longest:.2f} s"


async def test_sessions_read_on_their_own_once_the_read_hub_stops(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]])) as gateway:
        client = await Client.connect(gateway.port)
        assert (await client.call("echo", 1, "before"))["body"] == "before"
        gateway.hub_scope.cancel()  # as when a worker stops
        await trio.testing.wait_all_tasks_blocked()
        assert (await client.call("echo", 2, "after"))["body"] == "after"
        await client.close()


async def test_fragments_and_control_frames_between_them(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port)
    text = json.dumps({"cmd": "echo", "seq": 1, "body": "split in three"}).encode()
    first, second, third = text[:10], text[10:20], text[20:]
    await client.stream.send_all(
        ws_frame(0x1, first, fin=False)
        + ws_frame(0x9, b"between")  # a ping inside a fragmented message
        + ws_frame(0x0, second, fin=False)
        + ws_frame(0x0, third)
        + ws_frame(0x1, json.dumps({"cmd": "echo", "seq": 2, "body": "whole"}).encode())
    )
    assert await client.receive() == "pong:between"
    answers = [await client.receive_json() for _ in range(2)]
    assert sorted((a["seq"], a["body"]) for a in answers) == [(1, "split in three"), (2, "whole")]
    # A frame that trickles in a byte at a time, and a binary one in json mode.
    for byte in ws_frame(0x1, json.dumps({"cmd": "echo", "seq": 3, "body": "é" * 70}).encode()):
        await client.stream.send_all(bytes([byte]))
        await trio.lowlevel.checkpoint()
    assert (await client.receive_json())["body"] == "é" * 70
    await client.stream.send_all(ws_frame(0x2, b"\x00"))
    assert (await client.receive_json())["error"]["code"] == "bad_request"
    await client.close()
    assert sample(gateway.metrics, "tlvproxy_websocket_messages_total", {"direction": "in"}) == 4


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (ws_frame(0x1, b'{"seq": "\xff"}'), 1007),  # not UTF-8
        (ws_frame(0x1, b"{}", masked=False), 1002),  # a client must mask
        (ws_frame(0x0, b"{}"), 1002),  # a continuation of nothing
        (ws_frame(0x9, b"p" * 126), 1002),  # a control frame over 125 bytes
        (ws_frame(0x1, b"[", fin=False) + ws_frame(0x0, b"", fin=False) * 1024, 1009),
    ],
)
async def test_protocol_errors_close_the_session(gateway: Gateway, data: bytes, code: int) -> None:
    client = await Client.connect(gateway.port)
    await client.stream.send_all(data)
    closed = await client.expect_close()
    assert closed.code == code


async def test_a_stream_other_than_a_socket_works_the_same(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]]), wrap=True) as gateway:
        client = await Client.connect(gateway.port)
        for seq in range(3):
            await client.send({"cmd": "echo", "seq": seq, "body": seq})
        answers = [await client.receive_json() for _ in range(3)]
        assert sorted(a["body"] for a in answers) == [0, 1, 2]
        await client.stream.send_all(client.ws.send(Ping(payload=b"w")))
        assert await client.receive() == "pong:w"
        await client.close(4001)
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks("._flush") == 0


# ---------------------------------------------------------------- handshake


async def test_ping_is_answered_with_pong(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port)
    await client.stream.send_all(client.ws.send(Ping(payload=b"abc")))
    assert await client.receive() == "pong:abc"
    await client.close()


async def test_bad_handshakes_are_refused(gateway: Gateway) -> None:
    good = (
        "GET /ws?uid=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    answer = await raw_exchange(gateway.port, (good + "\r\n").encode(), until_close=False)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    cases = [
        (good.replace("Version: 13", "Version: 8"), b"400", b"Sec-WebSocket-Version"),
        (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), b"400", b"16 bytes"),
        (good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""), b"400", b"missing"),
        (good.replace("/ws?", "/elsewhere?"), b"404", b"route_not_found"),
        (good.replace("uid=1", "uid=abc"), b"400", b"query.uid"),
        (good.replace("uid=1", "uid=4294967296"), b"400", b"out of range"),
    ]
    for head, status, detail in cases:
        answer = await raw_exchange(gateway.port, (head + "\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 " + status), answer
        assert detail in answer, answer


# ---------------------------------------------------------------- close codes


async def test_shutdown_closes_sessions_with_1001(gateway: Gateway) -> None:
    with LogWatcher("tlvproxy.access") as access:
        clients = [await Client.connect(gateway.port) for _ in range(3)]
        assert (await clients[0].call("echo", 1, 1))["status"] == 0
        assert gateway.metrics.websocket_sessions._value.get() == 3
        gateway.sessions.drain()
        for client in clients:
            closed = await client.expect_close()
            assert closed.code == 1001
            assert closed.reason == "gateway shutting down"
        records = await access.wait_for(3)
    assert [r.close_code for r in records] == [1001] * 3
    assert gateway.metrics.websocket_sessions._value.get() == 0


async def test_waf_deny_closes_1008_and_log_only_records(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope], caplog: pytest.LogCaptureFixture
) -> None:
    extra = """
waf:
  - name: php_injection
    in: [body]
    pattern: '(?i)\\b(eval|system)\\s*\\('
    action: deny
  - name: curious
    in: [body]
    pattern: 'peek'
    action: log
"""
    async with open_gateway(make_table(tmp_path, [upstream[0]], extra=extra)) as gateway:
        client = await Client.connect(gateway.port)
        assert (await client.call("echo", 1, "just a peek"))["status"] == 0
        assert sample(gateway.metrics, "tlvproxy_waf_blocked_total", {"rule": "curious"}) == 1
        await client.send({"cmd": "echo", "seq": 2, "body": "system('rm -rf /')"})
        closed = await client.expect_close()
        assert closed.code == 1008
        assert "php_injection" in closed.reason
        assert sample(gateway.metrics, "tlvproxy_waf_blocked_total", {"rule": "php_injection"}) == 1


async def test_message_over_max_message_closes_1009(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]], max_message="1 KiB")) as gateway:
        client = await Client.connect(gateway.port)
        assert (await client.call("echo", 1, "x" * 900))["status"] == 0
        await client.send({"cmd": "echo", "seq": 2, "body": "x" * 2000})
        closed = await client.expect_close()
        assert closed.code == 1009
        assert "max_message" in closed.reason


async def test_fragmented_message_over_max_message_closes_1009(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]], max_message="1 KiB")) as gateway:
        client = await Client.connect(gateway.port)
        for _ in range(3):
            chunk = TextMessage(data="x" * 400, message_finished=False)
            await client.stream.send_all(client.ws.send(chunk))
        closed = await client.expect_close()
        assert closed.code == 1009


async def test_upstream_loss_closes_1011(
    gateway: Gateway, upstream: tuple[str, trio.CancelScope]
) -> None:
    client = await Client.connect(gateway.port)
    assert (await client.call("echo", 1, 1))["status"] == 0
    upstream[1].cancel()
    closed = await client.expect_close()
    assert closed.code == 1011


async def test_no_healthy_node_closes_1013(tmp_path: Path) -> None:
    # A port nobody listens on: connects are refused.
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    node = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    async with open_gateway(make_table(tmp_path, [node])) as gateway:
        codes = []
        for _ in range(2):
            client = await Client.connect(gateway.port)
            codes.append((await client.expect_close()).code)
        # The first refused connect makes the only node unhealthy (unhealthy_after: 1).
        assert codes == [1011, 1013]


async def test_idle_session_closes_after_idle_timeout(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope], autojump_clock: Any
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]], idle_timeout="30s")) as gateway:
        client = await Client.connect(gateway.port)
        await trio.sleep(20)
        assert (await client.call("echo", 1, 1))["status"] == 0
        await trio.sleep(20)  # 40 s since the start, 20 s since the last message
        await client.stream.send_all(client.ws.send(Ping(payload=b"p")))
        assert await client.receive() == "pong:p"
        started = trio.current_time()
        closed = await client.expect_close()
        assert closed.code == 1000
        assert "idle" in closed.reason
        assert trio.current_time() - started == pytest.approx(30, abs=0.5)


async def test_client_close_and_client_vanishing_are_logged(gateway: Gateway) -> None:
    with LogWatcher("tlvproxy.access") as access:
        client = await Client.connect(gateway.port, "/ws?uid=1&did=a&x=1")
        assert (await client.call("echo", 1, 1))["status"] == 0
        await client.close(4000)
        gone = await Client.connect(gateway.port)
        assert (await gone.call("echo", 1, 1))["status"] == 0
        await gone.stream.aclose()
        records = await access.wait_for(2)
    assert [r.close_code for r in records] == [4000, 1006]
    for record in records:
        assert record.getMessage() == "websocket session"
        assert record.messages_in == 1
        assert record.messages_out == 1
        assert record.path == "/ws"
        assert record.client_ip == "127.0.0.1"
        assert record.upstream_node is not None
        assert record.duration_ms >= 0
        assert len(record.request_id) == 32
    assert gateway.metrics.websocket_sessions._value.get() == 0


async def test_client_gone_closes_its_upstream_connection(tmp_path: Path) -> None:
    async with (
        open_silent_upstream() as silent,
        open_gateway(make_table(tmp_path, [silent.node])) as gateway,
    ):
        client = await Client.connect(gateway.port)
        with trio.fail_after(5):
            while silent.accepted < 1:
                await silent.changed.wait()
        assert silent.closed == 0
        await client.stream.aclose()
        with trio.fail_after(5):
            while silent.closed < 1:
                await silent.changed.wait()
        assert silent.accepted == 1


# ---------------------------------------------------------------- binary mode


async def test_binary_mode_passes_frames_through_with_the_clients_seq(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]], mode="binary")) as gateway:
        client = await Client.connect(gateway.port)
        for seq in (0xFFFFFFFF, 7, 7):  # the client's seqs, whatever they are
            await client.send(frame(0x1003, seq, b'{"a":1}', uid=999))
            reply = await client.receive()
            assert isinstance(reply, bytes)
            flags, command, got_seq, _uid, status, body = unframe(reply)
            assert flags & 0x01
            assert (command, got_seq, status, body) == (0x1003, seq, 0, b'{"a":1}')
        await client.close()


async def test_binary_mode_reads_a_word_among_the_sessions_upstreams_commands(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    # Command words are unique per upstream: 0x1003 is also a command of
    # `other`, declared last, and the session on `im` still sends its echo.
    table = make_table(
        tmp_path,
        [upstream[0]],
        mode="binary",
        upstreams="  other: {nodes: [127.0.0.1:9]}",
        commands="  - {name: echo_other, command: 0x1003, upstream: other, codec: raw}",
    )
    async with open_gateway(table) as gateway:
        client = await Client.connect(gateway.port)
        await client.send(frame(0x1003, 5, b'{"a":1}'))
        reply = await client.receive()
        assert isinstance(reply, bytes)
        assert unframe(reply)[1:] == (0x1003, 5, 1, 0, b'{"a":1}')  # the session's uid 1
        await client.close()


async def test_binary_mode_delivers_pushes_as_frames(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]], mode="binary")) as gateway:
        alice = await Client.connect(gateway.port, "/ws?uid=1&did=alice")
        bob = await Client.connect(gateway.port, "/ws?uid=2&did=bob")
        await bob.send(frame(0x1003, 1, b"{}"))
        assert unframe(await bob.receive())[2] == 1
        # SendMessageRequest{to_uid: 2, text: "hi"}, protobuf packed by hand.
        await alice.send(frame(0x1001, 5, b"\x08\x02\x12\x02hi", uid=1))
        flags, command, seq, _uid, status, _body = unframe(await alice.receive())
        assert (flags & 0x01, command, seq, status) == (1, 0x1001, 5, 0)
        flags, command, _seq, _uid, _status, body = unframe(await bob.receive())
        assert flags & 0x02
        assert command == 0x2001
        assert b"hi" in body
        await alice.close()
        await bob.close()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"hello", "start byte"),
        (frame(0x1003, 1, b"{}")[:-1] + b"\x00", "end byte"),
        (frame(0x1003, 1, b"{}")[:-3], "stream ended"),
        (frame(0x1003, 1, b"{}") * 2, "more than one frame"),
        (b"", "an empty message"),
        (frame(0x7777, 1, b""), "0x7777 is not in the table"),
        (frame(0x2001, 1, b""), "'new_message' cannot be sent"),
        ("text in binary mode", "binary mode takes binary messages"),
    ],
)
async def test_binary_mode_closes_1008_on_an_invalid_frame(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope], message: bytes | str, reason: str
) -> None:
    async with open_gateway(make_table(tmp_path, [upstream[0]], mode="binary")) as gateway:
        client = await Client.connect(gateway.port)
        await client.send(message)
        closed = await client.expect_close()
        assert closed.code == 1008
        assert reason in closed.reason


async def test_binary_mode_timeout_answers_a_text_error(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with open_silent_upstream() as silent:
        table = make_table(tmp_path, [silent.node], mode="binary", timeout="1s")
        async with open_gateway(table) as gateway:
            client = await Client.connect(gateway.port)
            await client.send(frame(0x1003, 77, b"{}"))
            answer = await client.receive_json()
            assert answer["seq"] == 77
            assert answer["error"]["code"] == "upstream_timeout"
            await client.close()


# ---------------------------------------------------------------- limits


async def test_a_client_that_does_not_read_is_closed_1008(gateway: Gateway) -> None:
    client = await Client.connect(gateway.port, receive_buffer=4096)
    body = "x" * 16_000

    async def flood() -> None:
        for seq in range(100_000):
            await client.send({"cmd": "echo", "seq": seq, "body": body})

    with LogWatcher("tlvproxy.websocket") as warnings:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            records = await warnings.wait_for(1)
            nursery.cancel_scope.cancel()
    assert "not reading" in records[0].getMessage()
    messages: list[str | bytes] = []
    with pytest.raises(Closed) as closed:
        await client.drain(messages)
    assert closed.value.code == 1008
    assert "client too slow" in closed.value.reason
    # What was queued was flushed before the close frame.
    assert len(messages) >= OUTGOING_QUEUE
    assert all(json.loads(m)["body"] == body for m in messages)


def count_tasks(name: str = "") -> int:
    """The tasks of this process (those whose name ends with `name`)."""
    stack = [trio.lowlevel.current_root_task()]
    count = 0
    while stack:
        task = stack.pop()
        count += task.name.endswith(name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_a_thousand_sessions_leave_no_task_or_fd_behind(gateway: Gateway) -> None:
    with LogWatcher("tlvproxy.access") as access:
        warm = await Client.connect(gateway.port)
        await warm.close()
        await access.wait_for(1)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()  # sockets earlier tests dropped must not close mid-count
        fds = len(os.listdir("/proc/self/fd"))
        tasks = count_tasks()

        async def session(n: int) -> None:
            client = await Client.connect(gateway.port, f"/ws?uid={n}&did=d{n}")
            assert (await client.call("echo", n, n))["body"] == n
            if n % 2:
                await client.close()
            else:
                await client.stream.aclose()  # gone without a close frame

        for batch in range(20):
            async with trio.open_nursery() as nursery:
                for n in range(batch * 50, batch * 50 + 50):
                    nursery.start_soon(session, n)
        await access.wait_for(1001)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == fds
        assert count_tasks() == tasks
        assert gateway.metrics.websocket_sessions._value.get() == 0


@pytest.mark.parametrize("cls", [WebSocketSession, JsonCall, BinaryCall])
def test_a_session_and_its_requests_keep_no_dict(cls: type) -> None:
    # Every attribute is a slot, so an idle session and a request in flight
    # stay small: a base (a part of the session) without `__slots__ = ()`
    # would give every instance a dict.
    assert cls.__dictoffset__ == 0

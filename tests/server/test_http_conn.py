"""The HTTP/1.1 connection driver over real sockets on 127.0.0.1, with both parsers."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from contextlib import asynccontextmanager, suppress
from functools import partial

import attrs
import pytest
import trio
import trio.testing

from tlvproxy.errors import GatewayError, RateLimited, status_of
from tlvproxy.server.http_answers import ReadyAnswers
from tlvproxy.server.http_conn import (
    Answer,
    DeadlineTimer,
    DrainSignal,
    Request,
    Response,
    serve_http_connection,
)
from tlvproxy.server.read_hub import ReadHub


async def echo(request: Request) -> Response:
    headers = [("X-Method", request.method), ("X-Path", request.path)]
    if request.query_string:
        headers.append(("X-Query", request.query_string))
    return Response(200, headers, request.body)


def error_handler(error: GatewayError, request: Request | None) -> Response:
    body = {"error": {"code": error.code, "message": error.message}}
    headers = [("X-Error", error.code), ("X-Had-Request", "yes" if request else "no")]
    return Response(status_of(error), headers + error.headers(), json.dumps(body).encode())


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """A raw-socket HTTP client: sends bytes, parses answers independently of the server."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def reply(self) -> Reply | None:
        """The next answer, or None at EOF."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                assert self.buffer == b"", f"EOF inside an answer: {self.buffer!r}"
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("ascii").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines:
            name, value = line.split(": ", 1)
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert await self._fill(), "EOF inside a body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(status), headers, body)

    async def closed(self) -> bool:
        """True when the server closed the connection with nothing more to say."""
        return not await self._fill() and self.buffer == b""


# Whether `serving` gives its connections a read hub: every test here runs
# with one and without (the `waits` fixture sets it).
_WAITS = {"hub": False}


@pytest.fixture(autouse=True, params=["own waits", "read hub"])
def waits(request, monkeypatch):
    """Each test with the connections waiting for requests in their own
    tasks, then in a read hub's."""
    monkeypatch.setitem(_WAITS, "hub", request.param == "read hub")
    return request.param


@asynccontextmanager
async def serving(settings, handler=echo, *, tasks=None, ended=None, **kwargs):
    """A real server on 127.0.0.1:0; yields (open_client, connections nursery).
    `tasks` (a set) gets each connection's task; `ended` (a trio.Event) is
    set when a connection ends."""

    async def on_connection(stream):
        if tasks is not None:
            tasks.add(trio.lowlevel.current_task())
        try:
            await serve_http_connection(
                stream, "127.0.0.1", settings, handler, error_handler, **kwargs
            )
        finally:
            if ended is not None:
                ended.set()

    async with trio.open_nursery() as nursery, trio.open_nursery() as connections:
        if _WAITS["hub"] and "read_hub" not in kwargs:
            hub = ReadHub()
            await nursery.start(hub.run)
            kwargs["read_hub"] = hub
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1", handler_nursery=connections),
            on_connection,
            0,
        )
        port = listeners[0].socket.getsockname()[1]

        async def open_client() -> Client:
            return Client(await trio.open_tcp_stream("127.0.0.1", port))

        yield open_client, connections
        nursery.cancel_scope.cancel()
        connections.cancel_scope.cancel()


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    lines = ["POST " + path + " HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_keep_alive_serves_several_requests_on_one_connection(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        for n in range(3):
            await client.send(post(f"/echo/{n}?n={n}", b"body %d" % n))
            reply = await client.reply()
            assert reply is not None
            assert reply.status == 200
            assert reply.body == b"body %d" % n
            assert reply.headers["x-path"] == f"/echo/{n}"
            assert reply.headers["x-query"] == f"n={n}"
            assert "connection" not in reply.headers


async def test_request_fields_reach_the_handler(settings):
    seen = []

    async def record(request: Request) -> Response:
        seen.append(request)
        return Response(204)

    async with serving(settings, record) as (open_client, _):
        client = await open_client()
        await client.send(get("/v1/a%20b/7?x=1&y=%20", "X-Custom:  Value  ", "x-custom: second"))
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 204
        assert "content-length" not in reply.headers
    [request] = seen
    assert request.method == "GET"
    assert request.target == "/v1/a%20b/7?x=1&y=%20"
    assert request.path == "/v1/a b/7"
    assert request.query_string == "x=1&y=%20"
    assert request.headers == (("host", "test"), ("x-custom", "Value"), ("x-custom", "second"))
    assert request.header("X-CUSTOM") == "Value"
    assert request.header("missing") is None
    assert request.http_version == "1.1"
    assert request.remote_addr == "127.0.0.1"
    assert request.body == b""


async def test_pipelined_requests_are_answered_in_order(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/1") + post("/2", b"two") + get("/3"))
        replies = [await client.reply() for _ in range(3)]
        assert [r.headers["x-path"] for r in replies if r] == ["/1", "/2", "/3"]
        assert replies[1] is not None
        assert replies[1].body == b"two"


class LaterAnswers:
    """A Submitter that answers each request from another task, one scheduler
    pass later, as the upstream reader does for REST requests."""

    def __init__(self, nursery: trio.Nursery, body: bytes) -> None:
        self.nursery = nursery
        self.body = body
        self.seen = 0

    def submit(self, request: Request, answer: Answer) -> None:
        self.seen += 1
        self.nursery.start_soon(self._answer, answer)

    async def _answer(self, answer: Answer) -> None:
        await trio.lowlevel.checkpoint()
        answer.set(Response(200, [], self.body))


class HeldAnswers:
    """A Submitter whose answers wait until `release()`; after it, it answers at once."""

    def __init__(self) -> None:
        self.held: list[tuple[Request, Answer]] = []
        self.released = False

    def submit(self, request: Request, answer: Answer) -> None:
        self.held.append((request, answer))
        if self.released:
            self.release()

    def release(self) -> None:
        self.released = True
        while self.held:
            request, answer = self.held.pop(0)
            answer.set(Response(200, [("X-Path", request.path)], b""))


async def test_answers_owed_when_the_client_half_closes_are_still_written(settings):
    """A client may shut down its sending side once its requests are sent:
    what it is owed is answered, with either parser (httptools reads the end
    of the stream while the answers are still owed)."""
    handler = HeldAnswers()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await client.send(get("/1") + get("/2"))
        await client.stream.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        handler.release()
        replies = [await client.reply() for _ in range(2)]
        assert [r.headers["x-path"] for r in replies if r] == ["/1", "/2"]
        assert await client.closed()


def _received_now(client: Client) -> bytes:
    """What the client's socket holds now, without waiting."""
    try:
        return os.read(client.stream.socket.fileno(), 65536)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("running", [True, False])
async def test_answers_other_tasks_set_are_written_after_their_pass(settings, running):
    # Set in one pass by another task (here the test's), the answers of two
    # connections are written together after it by the ReadyAnswers task;
    # without the task running, each at once.
    handler = HeldAnswers()
    ready = ReadyAnswers()
    async with trio.open_nursery() as nursery:
        if running:
            await nursery.start(ready.run)
        async with serving(settings, handler, ready_answers=ready) as (open_client, _):
            clients = [await open_client(), await open_client()]
            for n, client in enumerate(clients):
                await client.send(get(f"/{n}"))
            await trio.testing.wait_all_tasks_blocked()
            assert len(handler.held) == 2
            handler.release()
            held = [_received_now(client) for client in clients]
            if running:
                assert held == [b"", b""]
            else:
                assert all(data.startswith(b"HTTP/1.1 200") for data in held)
                return
            replies = [await client.reply() for client in clients]
            assert [r.headers["x-path"] for r in replies if r] == ["/0", "/1"]
            nursery.cancel_scope.cancel()


async def test_answers_queued_when_the_ready_answers_task_ends_are_written(settings):
    handler = HeldAnswers()
    ready = ReadyAnswers()
    scope = trio.CancelScope()

    async def run_ready(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await ready.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_ready)
        async with serving(settings, handler, ready_answers=ready) as (open_client, _):
            client = await open_client()
            await client.send(get("/1"))
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the task ends at its next turn ...
            handler.release()  # ... with this answer queued: it writes it then
            with trio.fail_after(2):
                reply = await client.reply()
            assert reply is not None
            assert reply.headers["x-path"] == "/1"
            # The task has ended: a later answer is written at once.
            handler.released = False
            await client.send(get("/2"))
            await trio.testing.wait_all_tasks_blocked()
            handler.release()
            assert _received_now(client).startswith(b"HTTP/1.1 200")


async def test_a_bug_writing_one_connection_costs_only_that_connection(settings, caplog):
    handler = HeldAnswers()
    ready = ReadyAnswers()
    async with trio.open_nursery() as nursery:
        await nursery.start(ready.run)
        async with serving(settings, handler, ready_answers=ready) as (open_client, _):
            failing, fine = await open_client(), await open_client()
            await failing.send(get("/bug"))
            await fine.send(get("/fine"))
            await trio.testing.wait_all_tasks_blocked()
            answers = {request.path: answer for request, answer in handler.held}
            answers["/bug"].set(Response(200, None, b""))  # type: ignore[arg-type]  # a bug
            answers["/fine"].set(Response(200, [("X-Path", "/fine")], b""))
            with trio.fail_after(2):
                assert await failing.closed()
                reply = await fine.reply()
            assert reply is not None
            assert reply.headers["x-path"] == "/fine"
            assert "writing an answer failed" in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_stops_being_read(settings):
    """Pipelined requests whose answers the client never reads: the driver
    stops parsing once the unsent answers pass its bound, instead of
    queueing every answer in memory."""
    async with trio.open_nursery() as nursery:
        handler = LaterAnswers(nursery, b"z" * 262_144)
        async with serving(settings, handler) as (open_client, _):
            client = await open_client()
            # One request at a time, each answered before the next arrives, so
            # that no answers are owed: only the bytes unsent can stop it.
            for _ in range(400):  # 100 MiB of answers asked for
                await client.send(get("/big"))
                await trio.testing.wait_all_tasks_blocked(cushion=0.002)
            # What the kernel's socket buffers hold, and the bound; far from 400.
            assert 0 < handler.seen < 150
        nursery.cancel_scope.cancel()


async def test_chunked_body_in_pieces(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(
            b"POST /c HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
        )
        await trio.testing.wait_all_tasks_blocked()
        await client.send(b"lo\r\n6\r\n world\r\n0\r\n\r\n" + get("/after"))
        reply = await client.reply()
        assert reply is not None
        assert (reply.status, reply.body) == (200, b"hello world")
        after = await client.reply()
        assert after is not None
        assert after.headers["x-path"] == "/after"


async def test_expect_100_continue_is_answered_before_the_body(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(
            b"POST /e HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await client.reply()
        assert interim is not None
        assert interim.status == 100
        await client.send(b"data")
        reply = await client.reply()
        assert reply is not None
        assert (reply.status, reply.body) == (200, b"data")


async def test_expect_100_continue_refused_body_gets_413_without_100(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(
            b"POST /e HTTP/1.1\r\nHost: test\r\nContent-Length: 99999\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 413
        assert reply.headers["x-had-request"] == "yes"
        assert await client.closed()


async def test_garbage_gets_400_then_close(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(b"\x16\x03\x01 this is not http\r\n\r\n")
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 400
        assert reply.headers["connection"] == "close"
        assert json.loads(reply.body)["error"]["code"] == "bad_request"
        assert reply.headers["x-had-request"] == "no"
        assert await client.closed()


async def test_garbage_after_a_good_request_answers_both(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/ok") + b"NOT HTTP AT ALL\r\n\r\n")
        first, second = await client.reply(), await client.reply()
        assert first is not None
        assert second is not None
        assert (first.status, second.status) == (200, 400)
        assert await client.closed()


@pytest.mark.parametrize("complete", [True, False])
async def test_oversized_head_gets_431_then_close(settings, complete):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        head = get("/big", "X-Big: " + "b" * 2000)
        await client.send(head if complete else head[:-4])
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 431
        assert json.loads(reply.body)["error"]["code"] == "headers_too_large"
        assert await client.closed()


async def test_head_at_the_limit_is_accepted(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        head = get("/fit", "X-Pad: ")
        head = get("/fit", "X-Pad: " + "p" * (settings.max_header_bytes - len(head)))
        assert len(head) == settings.max_header_bytes
        await client.send(head)
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 200


async def test_declared_body_too_large_is_refused_at_once(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        # Only the head is sent: the answer must not wait for the body.
        await client.send(b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 100000000\r\n\r\n")
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 413
        assert reply.headers["connection"] == "close"
        assert await client.closed()


async def test_chunked_body_too_large_stops_as_soon_as_it_overflows(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(b"POST /big HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
        await client.send(chunk + chunk)  # 8 KiB of a body that never ends
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 413
        assert await client.closed()


async def test_slowloris_gets_408_then_close(settings, autojump_clock):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        started = trio.current_time()

        async def trickle() -> None:
            with suppress(trio.BrokenResourceError):
                for byte in get("/slow"):
                    await client.send(bytes([byte]))
                    await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            reply = await client.reply()
            answered = trio.current_time()
            nursery.cancel_scope.cancel()
        assert reply is not None
        assert reply.status == 408
        assert json.loads(reply.body)["error"]["code"] == "request_timeout"
        assert answered - started == pytest.approx(settings.header_timeout)
        assert await client.closed()


async def test_slow_body_gets_408_with_the_request(settings, autojump_clock):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(b"POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nab")
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 408
        assert reply.headers["x-had-request"] == "yes"
        assert "body" in json.loads(reply.body)["error"]["message"]


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
    settings, autojump_clock
):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/once"))
        assert await client.reply() is not None
        answered = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - answered == pytest.approx(settings.keepalive_timeout)


async def test_silent_new_connection_is_closed_without_an_answer(settings, autojump_clock):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        assert await client.closed()
        assert trio.current_time() == pytest.approx(settings.header_timeout)


async def test_http_1_0_closes_after_the_answer(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/old", version="1.0"))
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 200
        assert reply.headers["connection"] == "close"
        assert await client.closed()


async def test_connection_close_request_is_honoured(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/bye", "Connection: close") + get("/never"))
        reply = await client.reply()
        assert reply is not None
        assert reply.headers["connection"] == "close"
        assert await client.closed()


async def test_handler_exception_answers_500_logs_and_closes(settings, caplog):
    async def broken(request: Request) -> Response:
        raise ZeroDivisionError("boom")

    async with serving(settings, broken) as (open_client, _):
        client = await open_client()
        await client.send(get("/boom") + get("/never"))
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 500
        assert reply.headers["connection"] == "close"
        assert json.loads(reply.body)["error"]["code"] == "internal_error"
        assert await client.closed()
    [record] = [r for r in caplog.records if r.name == "tlvproxy.http"]
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError


async def test_gateway_error_from_handler_is_answered_and_keeps_the_connection(settings):
    async def limited(request: Request) -> Response:
        raise RateLimited("slow down", retry_after=3)

    async with serving(settings, limited) as (open_client, _):
        client = await open_client()
        for _ in range(2):
            await client.send(get("/limited"))
            reply = await client.reply()
            assert reply is not None
            assert (reply.status, reply.headers["retry-after"]) == (429, "3")


@pytest.mark.parametrize(
    "headers",
    [[("Bad Name", "x")], [("X-Ok", "line\r\nInjected: yes")], [("Content-Length", "3")]],
)
async def test_invalid_handler_response_answers_500(settings, headers, caplog):
    async def invalid(request: Request) -> Response:
        return Response(200, headers, b"abc")

    async with serving(settings, invalid) as (open_client, _):
        client = await open_client()
        await client.send(get("/invalid"))
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 500
        assert await client.closed()
    assert any(r.exc_info for r in caplog.records if r.name == "tlvproxy.http")


async def test_draining_closes_idle_connections_at_once(settings, autojump_clock):
    drain = DrainSignal()
    async with serving(settings, drain_signal=drain) as (open_client, _):
        client = await open_client()
        await client.send(get("/before"))
        assert await client.reply() is not None
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        drain.set()
        assert await client.closed()
        assert trio.current_time() == started


async def test_draining_answers_a_new_request_503_and_closes(settings):
    drain = DrainSignal()
    async with serving(settings, drain_signal=drain) as (open_client, _):
        client = await open_client()
        await client.send(get("/before"))
        assert await client.reply() is not None
        request = get("/during")
        await client.send(request[:10])  # the connection is no longer idle
        await trio.testing.wait_all_tasks_blocked()
        drain.set()
        await client.send(request[10:])
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 503
        assert reply.headers["connection"] == "close"
        assert json.loads(reply.body)["error"]["code"] == "shutting_down"
        assert await client.closed()


async def test_request_in_flight_when_draining_starts_finishes_with_close(settings):
    draining = False
    release = trio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return Response(200, [], b"done")

    async with serving(settings, slow, draining=lambda: draining) as (open_client, _):
        client = await open_client()
        await client.send(get("/slow"))
        await trio.testing.wait_all_tasks_blocked()
        draining = True
        release.set()
        reply = await client.reply()
        assert reply is not None
        assert (reply.status, reply.body) == (200, b"done")
        assert reply.headers["connection"] == "close"
        assert await client.closed()


async def test_upgrade_hands_over_the_stream_and_leftover_bytes(settings):
    handed = []

    async def upgrade(request: Request, stream: trio.abc.Stream, leftover: bytes) -> None:
        handed.append((request, leftover))
        await stream.send_all(b"SWITCHED:" + leftover)
        more = await stream.receive_some(100)
        await stream.send_all(b"ECHO:" + more)

    async with serving(settings, upgrade=upgrade) as (open_client, _):
        client = await open_client()
        ws_head = get("/ws", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: k")
        await client.send(get("/first") + ws_head + b"\x81\x02hi")
        first = await client.reply()
        assert first is not None
        assert first.headers["x-path"] == "/first"
        while len(client.buffer) < len(b"SWITCHED:\x81\x02hi"):
            assert await client._fill()
        assert client.buffer == b"SWITCHED:\x81\x02hi"
        client.buffer = b""
        await client.send(b"later")
        while len(client.buffer) < len(b"ECHO:later"):
            assert await client._fill()
        assert client.buffer == b"ECHO:later"
        client.buffer = b""
        assert await client.closed()
    [(request, leftover)] = handed
    assert (request.path, request.header("upgrade"), leftover) == (
        "/ws",
        "websocket",
        b"\x81\x02hi",
    )


async def test_upgrade_without_a_handler_is_answered_then_closed(settings):
    async with serving(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/ws", "Upgrade: websocket", "Connection: Upgrade") + b"\x81\x00")
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 200
        assert reply.headers["connection"] == "close"
        assert await client.closed()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_dropped_connections_leak_nothing(settings):
    async with serving(settings) as (open_client, connections):
        await trio.testing.wait_all_tasks_blocked()
        fds_before = open_fds()
        limiter = trio.CapacityLimiter(100)
        requests = [b"", get("/full"), get("/partial")[:15], post("/body", b"x" * 100)[:-50]]

        async def drop(n: int) -> None:
            async with limiter:
                client = await open_client()
                await client.send(requests[n % len(requests)])
                if n % 8 == 1:
                    await trio.testing.wait_all_tasks_blocked()
                await client.stream.aclose()

        async with trio.open_nursery() as nursery:
            for n in range(1000):
                nursery.start_soon(drop, n)
        # Every connection ends and gives its descriptor back: on a loaded
        # box some take more than one quiet spell to, so this waits for it,
        # up to a bound a leak never meets.
        with trio.fail_after(10):
            while connections.child_tasks or open_fds() != fds_before:
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        client = await open_client()
        await client.send(get("/still-alive"))
        reply = await client.reply()
        assert reply is not None
        assert reply.status == 200


async def test_unexpected_stream_error_is_contained(settings, caplog):
    """A peer that resets mid-answer costs its connection only, quietly."""

    async def big(request: Request) -> Response:
        return Response(200, [], b"z" * 4_000_000)

    caplog.set_level(logging.DEBUG, logger="tlvproxy.http")
    async with serving(settings, big) as (open_client, connections):
        client = await open_client()
        await client.send(get("/big"))
        await trio.testing.wait_all_tasks_blocked()
        client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.stream.aclose()  # RST: the server's send fails
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert len(connections.child_tasks) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class TakesOver:
    """A Submitter that answers `/take` by taking the connection over, as a
    push session's event stream does; other paths are held until `release()`."""

    def __init__(self) -> None:
        self.held = HeldAnswers()
        self.taken: list[tuple[str, bytes]] = []

    def submit(self, request: Request, answer: Answer) -> None:
        if request.path == "/take":
            answer.take_over(self._take)
        else:
            self.held.submit(request, answer)

    async def _take(self, request: Request, stream: trio.abc.Stream, leftover: bytes) -> None:
        self.taken.append((request.path, leftover))
        await stream.send_all(b"taken over\n")


async def test_a_submitter_takes_the_connection_over_after_the_answers_before(settings):
    handler = TakesOver()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await client.send(get("/1") + get("/take") + b"bytes past it")
        await trio.testing.wait_all_tasks_blocked()
        assert handler.taken == []  # /1 is owed first
        handler.held.release()
        reply = await client.reply()
        assert reply is not None
        assert reply.headers["x-path"] == "/1"
        while not client.buffer.endswith(b"\n"):
            assert await client._fill()
        assert client.buffer == b"taken over\n"
        client.buffer = b""
        assert await client.closed()  # the stream closes when the handler returns
    assert handler.taken == [("/take", b"bytes past it")]


@pytest.mark.parametrize("as_in_the_gateway", [False, True])
async def test_a_take_over_the_drain_overtakes_is_answered_503(settings, as_in_the_gateway):
    # In the gateway, one timer serves every connection and the answers other
    # tasks set are written after their pass (ReadyAnswers): the 503 must
    # still be written before the connection closes.
    drain = DrainSignal()
    handler = TakesOver()
    async with trio.open_nursery() as nursery:
        shared: dict[str, object] = {}
        if as_in_the_gateway:
            shared["timer"] = DeadlineTimer()
            shared["ready_answers"] = ReadyAnswers()
            await nursery.start(shared["timer"].run)
            await nursery.start(shared["ready_answers"].run)
        async with serving(settings, handler, drain_signal=drain, **shared) as (open_client, _):
            client = await open_client()
            await client.send(get("/1") + get("/take"))
            await trio.testing.wait_all_tasks_blocked()
            drain.set()  # while /1 is owed
            handler.held.release()
            first = await client.reply()
            assert first is not None
            assert first.headers["x-path"] == "/1"
            if settings.parser == "httptools":
                # /take was read, and is owed an answer: not a stream, once draining.
                second = await client.reply()
                assert second is not None
                assert second.status == 503
                assert json.loads(second.body)["error"]["code"] == "shutting_down"
                assert second.headers["connection"] == "close"
            else:
                # h11 reads /take only once /1 is answered: the drain's last answer.
                assert first.headers["connection"] == "close"
            assert await client.closed()
        nursery.cancel_scope.cancel()
    assert handler.taken == []


async def test_a_connection_starts_from_bytes_read_elsewhere(settings):
    async def on_connection(stream):
        await serve_http_connection(
            stream, "127.0.0.1", settings, echo, error_handler, received=post("/a", b"one")
        )

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), on_connection, 0
        )
        port = listener.socket.getsockname()[1]
        client = Client(await trio.open_tcp_stream("127.0.0.1", port))
        first = await client.reply()  # answered before the client sent a byte
        assert first is not None
        assert (first.headers["x-path"], first.body) == ("/a", b"one")
        await client.send(get("/b"))
        second = await client.reply()
        assert second is not None
        assert second.headers["x-path"] == "/b"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("cls", [Answer, Request])
def test_a_requests_objects_keep_no_dict(cls):
    # One of each is made per request: every attribute is a slot, so that a
    # request costs no dict (docs/architecture.md "The data path").
    assert cls.__dictoffset__ == 0

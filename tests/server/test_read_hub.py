"""The read hub: idle connections' next requests read and handled by one task
(server/read_hub.py, and `on_readable` in server/http_conn.py), over real
sockets on 127.0.0.1, with both parsers. test_http_conn.py runs its whole
suite with a hub and without one; these are the hub's own cases."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from tests.server.test_http_conn import (
    Client,
    HeldAnswers,
    error_handler,
    get,
    post,
)
from tlvproxy.server import http_conn
from tlvproxy.server.http_conn import (
    Answer,
    DrainSignal,
    HttpSettings,
    Request,
    Response,
    serve_http_connection,
)
from tlvproxy.server.read_hub import ReadHub


class AtOnce:
    """A Submitter that answers every request as it is submitted, as the REST
    handler does a 404: the hub's task submits and writes it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def submit(self, request: Request, answer: Answer) -> None:
        self.paths.append(request.path)
        answer.set(Response(200, [("X-Path", request.path)], request.body))


class Steps(trio.abc.Instrument):
    """Counts the steps of the tasks in `watched`."""

    def __init__(self) -> None:
        self.watched: set[trio.lowlevel.Task] = set()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.watched:
            self.steps += 1


@asynccontextmanager
async def serving(settings, handler, *, hub=None, tasks=None, **kwargs):
    """A server whose connections wait in `hub` (a new one, run here, by
    default); yields (open_client, hub, hub's cancel scope)."""
    hub = ReadHub() if hub is None else hub
    hub_scope = trio.CancelScope()

    async def run_hub(task_status: trio.TaskStatus[None]) -> None:
        with hub_scope:
            await hub.run(task_status=task_status)

    async def on_connection(stream):
        if tasks is not None:
            tasks.add(trio.lowlevel.current_task())
        await serve_http_connection(
            stream, "127.0.0.1", settings, handler, error_handler, read_hub=hub, **kwargs
        )

    async with trio.open_nursery() as nursery, trio.open_nursery() as connections:
        await nursery.start(run_hub)
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1", handler_nursery=connections),
            on_connection,
            0,
        )
        port = listeners[0].socket.getsockname()[1]

        async def open_client() -> Client:
            return Client(await trio.open_tcp_stream("127.0.0.1", port))

        yield open_client, hub_scope
        nursery.cancel_scope.cancel()
        connections.cancel_scope.cancel()


async def replies(client: Client, count: int) -> list[str]:
    with trio.fail_after(5):
        answers = [await client.reply() for _ in range(count)]
    assert all(answer is not None and answer.status == 200 for answer in answers)
    return [answer.headers["x-path"] for answer in answers if answer is not None]


async def test_requests_are_handled_without_waking_the_connection_task(settings):
    # The point of the hub: with a parser that pipelines, an idle connection's
    # requests are read, parsed, submitted and answered by the hub's task.
    # h11 answers one request before it parses the next: its task settles each.
    handler = AtOnce()
    steps = Steps()
    async with serving(settings, handler, tasks=steps.watched) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        assert await replies(client, 1) == ["/first"]
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        try:
            for n in range(5):
                await client.send(get(f"/one/{n}"))
                assert await replies(client, 1) == [f"/one/{n}"]
            await client.send(b"".join(post(f"/many/{n}", b"%d" % n) for n in range(5)))
            assert await replies(client, 5) == [f"/many/{n}" for n in range(5)]
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(steps)
    if settings.parser == "httptools":
        assert steps.steps == 0
    else:
        assert steps.steps > 0


async def test_a_request_split_across_reads_is_served(settings):
    # The hub wakes the task for a request under way: it waits for the rest
    # under header_timeout, then parks again.
    handler = AtOnce()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        request = post("/split", b"0123456789") + get("/after")
        for cut in (10, 30, len(request) - 12, len(request) - 3):
            await client.send(request[:cut])
            request = request[cut:]
            await trio.testing.wait_all_tasks_blocked()
        await client.send(request)
        assert await replies(client, 2) == ["/split", "/after"]
        await client.send(get("/next"))
        assert await replies(client, 1) == ["/next"]


async def test_a_request_begun_while_parked_times_out_with_408(settings, autojump_clock):
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        assert await replies(client, 1) == ["/first"]
        await client.send(b"GET /slow HTTP/1.1\r\nHost: te")
        with trio.fail_after(settings.header_timeout + 1):
            answer = await client.reply()
            assert answer is not None
            assert answer.status == 408
            assert await client.closed()


async def test_a_parked_connection_closes_after_keepalive_timeout(settings, autojump_clock):
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        assert await replies(client, 1) == ["/first"]
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(settings.keepalive_timeout, abs=0.5)


async def test_a_malformed_request_read_by_the_hub_gets_400_and_a_close(settings):
    handler = AtOnce()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await client.send(get("/fine") + b"GET /bad HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        assert await replies(client, 1) == ["/fine"]
        with trio.fail_after(5):
            answer = await client.reply()
            assert answer is not None
            assert answer.status == 400
            assert answer.headers["connection"] == "close"
            assert await client.closed()
    assert handler.paths == ["/fine"]


async def test_a_request_that_closes_is_answered_then_the_connection_closes(settings):
    handler = AtOnce()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await client.send(get("/a") + get("/last", "Connection: close") + get("/never"))
        assert await replies(client, 2) == ["/a", "/last"]
        with trio.fail_after(5):
            assert await client.closed()
    assert handler.paths == ["/a", "/last"]


async def test_a_request_larger_than_one_read_is_served():
    # More than one read's 64 KiB at once: the task reads the rest (those
    # bytes get no readiness of their own).
    settings = HttpSettings(
        max_header_bytes=1024,
        max_request_body=300_000,
        header_timeout=5.0,
        keepalive_timeout=20.0,
        parser="httptools",
    )
    body = bytes(range(256)) * 1000
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        assert await replies(client, 1) == ["/first"]
        await client.send(post("/big", body) + get("/after"))
        with trio.fail_after(5):
            answer = await client.reply()
        assert answer is not None
        assert answer.body == body
        assert await replies(client, 1) == ["/after"]


async def test_requests_behind_a_full_read_are_served(monkeypatch):
    # The hub's read fills its buffer (made 4 KiB here) with exactly 4 whole
    # requests; a 5th waits behind them in the socket, and gets no readiness
    # of its own.
    monkeypatch.setattr(http_conn, "_RECEIVE_SIZE", 4096)
    settings = HttpSettings(
        max_header_bytes=1024,
        max_request_body=4096,
        header_timeout=5.0,
        keepalive_timeout=20.0,
        parser="httptools",
    )
    head_size = len(post("/0", b"x" * 500)) - 500
    requests = [post(f"/{n}", b"x" * (1024 - head_size)) for n in range(5)]
    assert {len(request) for request in requests} == {1024}
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        assert await replies(client, 1) == ["/first"]
        await trio.testing.wait_all_tasks_blocked()
        await client.send(b"".join(requests))
        assert await replies(client, 5) == [f"/{n}" for n in range(5)]


async def test_the_end_of_the_stream_closes_a_parked_connection(settings):
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await client.send(get("/a"))
        assert await replies(client, 1) == ["/a"]
        await client.stream.send_eof()
        with trio.fail_after(5):
            assert await client.closed()


async def test_the_drain_signal_closes_parked_connections(settings):
    drain = DrainSignal()
    async with serving(settings, AtOnce(), drain_signal=drain) as (open_client, _):
        clients = [await open_client() for _ in range(3)]
        for client in clients:
            await client.send(get("/a"))
            assert await replies(client, 1) == ["/a"]
        await trio.testing.wait_all_tasks_blocked()
        drain.set()
        with trio.fail_after(5):
            for client in clients:
                assert await client.closed()


async def test_a_request_the_hub_reads_while_draining_gets_503_and_a_close(settings):
    # Draining without the signal (the gateway's own check): the parked task
    # is not woken by it, and the hub hands it the request to refuse.
    draining = False
    handler = AtOnce()
    async with serving(settings, handler, draining=lambda: draining) as (open_client, _):
        client = await open_client()
        await client.send(get("/a"))
        assert await replies(client, 1) == ["/a"]
        await trio.testing.wait_all_tasks_blocked()
        draining = True
        await client.send(get("/late"))
        with trio.fail_after(5):
            answer = await client.reply()
            assert answer is not None
            assert answer.status == 503
            assert answer.headers["connection"] == "close"
            assert await client.closed()
    assert handler.paths == ["/a"]


async def test_bytes_that_come_while_the_task_is_busy_are_not_missed(settings):
    # The task settles 31 answers owed (httptools parses at most 32 ahead);
    # the request sent meanwhile is reported to the hub while the task is not
    # parked: the task must read it before it parks again.
    handler = HeldAnswers()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        await trio.testing.wait_all_tasks_blocked()
        handler.release()
        assert await replies(client, 1) == ["/first"]
        handler.released = False
        await client.send(b"".join(get(f"/{n}") for n in range(31)))
        await trio.testing.wait_all_tasks_blocked()
        await client.send(get("/meanwhile"))
        await trio.testing.wait_all_tasks_blocked()
        handler.release()
        assert await replies(client, 32) == [f"/{n}" for n in range(31)] + ["/meanwhile"]


async def test_when_the_hub_stops_its_connections_wait_on_their_own(settings):
    handler = AtOnce()
    async with serving(settings, handler) as (open_client, hub_scope):
        client = await open_client()
        await client.send(get("/a"))
        assert await replies(client, 1) == ["/a"]
        await trio.testing.wait_all_tasks_blocked()
        hub_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        await client.send(get("/b"))
        assert await replies(client, 1) == ["/b"]
        late = await open_client()
        await late.send(get("/c"))
        assert await replies(late, 1) == ["/c"]

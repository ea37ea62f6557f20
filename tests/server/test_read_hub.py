"""The read hub: idle connections' next requests read and handled by one task
(server/read_hub.py, and `on_readable` in server/http_conn.py), over real
sockets on 127.0.0.1, with both parsers. test_http_conn.py runs its whole
suite with a hub and without one; these are the hub's own cases."""

from __future__ import annotations

import os
import socket
import struct
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.server.test_http_conn import (
    Client,
    HeldAnswers,
    get,
    post,
)
from tests.server.test_http_conn import serving as serving_http
from tlvproxy.server import http_conn
from tlvproxy.server.http_conn import (
    Answer,
    DrainSignal,
    HttpSettings,
    Request,
    Response,
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
async def serving(settings, handler, *, hub=None, **kwargs):
    """test_http_conn.py's server, its connections waiting in `hub` (a new
    one, run here, by default); yields (open_client, the hub's cancel scope)."""
    hub = ReadHub() if hub is None else hub
    hub_scope = trio.CancelScope()

    async def run_hub(task_status: trio.TaskStatus[None]) -> None:
        with hub_scope:
            await hub.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_hub)
        async with serving_http(settings, handler, read_hub=hub, **kwargs) as (open_client, _):
            yield open_client, hub_scope
        nursery.cancel_scope.cancel()


def httptools_settings(max_request_body: int = 4096) -> HttpSettings:
    """The `settings` fixture's, with httptools only."""
    return HttpSettings(
        max_header_bytes=1024,
        max_request_body=max_request_body,
        header_timeout=5.0,
        keepalive_timeout=20.0,
        parser="httptools",
    )


async def first_request(client: Client, handler: AtOnce | HeldAnswers | None = None) -> None:
    """One request answered, then the connection's task parked in the hub;
    a `HeldAnswers` handler holds the answers after it again."""
    await client.send(get("/first"))
    if isinstance(handler, HeldAnswers):
        await trio.testing.wait_all_tasks_blocked()
        handler.release()
    assert await replies(client, 1) == ["/first"]
    if isinstance(handler, HeldAnswers):
        handler.released = False
    await trio.testing.wait_all_tasks_blocked()


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
        await first_request(client)
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
        await first_request(client)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: te")
        with trio.fail_after(settings.header_timeout + 1):
            answer = await client.reply()
            assert answer is not None
            assert answer.status == 408
            assert await client.closed()


async def test_a_parked_connection_closes_after_keepalive_timeout(settings, autojump_clock):
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await first_request(client)
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
    settings = httptools_settings(300_000)
    body = bytes(range(256)) * 1000
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await first_request(client)
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
    settings = httptools_settings()
    head_size = len(post("/0", b"x" * 500)) - 500
    requests = [post(f"/{n}", b"x" * (1024 - head_size)) for n in range(5)]
    assert {len(request) for request in requests} == {1024}
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await first_request(client)
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
        await first_request(client, handler)
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


def send_then_shut(client: Client, data: bytes) -> None:
    """`data` and the end of the client's sending side in one step: the
    server sees one readiness for both."""
    sock = client.stream.socket
    assert os.write(sock.fileno(), data) == len(data)
    sock.shutdown(socket.SHUT_WR)


async def test_a_request_and_the_end_of_the_stream_in_one_readiness(settings):
    # The end of the stream comes with the bytes before it: the answer goes
    # out, then the connection closes at once, not keepalive_timeout later.
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        await first_request(client)
        send_then_shut(client, get("/a"))
        with trio.fail_after(3):
            assert await replies(client, 1) == ["/a"]
            assert await client.closed()


async def test_requests_and_the_end_of_the_stream_while_answers_are_owed(settings):
    handler = HeldAnswers()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await first_request(client, handler)
        send_then_shut(client, get("/1") + get("/2"))
        await trio.testing.wait_all_tasks_blocked()
        handler.release()
        with trio.fail_after(3):
            assert await replies(client, 2) == ["/1", "/2"]
            assert await client.closed()


async def test_the_end_of_the_stream_while_the_task_is_busy():
    # The task settles 31 answers owed; a request and the end of the stream
    # come meanwhile, their readiness seen by the hub: the task reads until
    # nothing is left (the request, then the end) before it parks.
    settings = httptools_settings()
    handler = HeldAnswers()
    async with serving(settings, handler) as (open_client, _):
        client = await open_client()
        await first_request(client, handler)
        await client.send(b"".join(get(f"/{n}") for n in range(32)))
        await trio.testing.wait_all_tasks_blocked()
        send_then_shut(client, get("/late"))
        await trio.testing.wait_all_tasks_blocked()
        handler.release()
        with trio.fail_after(3):
            assert await replies(client, 33) == [f"/{n}" for n in range(32)] + ["/late"]
            assert await client.closed()


async def test_a_request_and_a_reset_in_one_readiness_end_the_connection(settings):
    # A client that sends a request and resets at once holds nothing open:
    # the gateway's end of the connection must not wait keepalive_timeout.
    ended = trio.Event()
    async with serving(settings, AtOnce(), ended=ended) as (open_client, _):
        client = await open_client()
        await first_request(client)
        sock = client.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.write(sock.fileno(), get("/a"))
        sock.close()
        with trio.fail_after(3):
            await ended.wait()


async def test_a_connection_the_kernel_will_not_watch_waits_on_its_own(settings, monkeypatch):
    # epoll_ctl can fail (the kernel's limit on watches): that connection
    # waits for its requests in its own task, and is served all the same.
    def refuse(self, fd, connection):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReadHub, "add", refuse)
    async with serving(settings, AtOnce()) as (open_client, _):
        client = await open_client()
        for path in ("/a", "/b"):
            await client.send(get(path))
            assert await replies(client, 1) == [path]


async def test_a_hub_runs_again_after_it_ended():
    # Stopped, then run again: the connections accepted from then on wait in
    # it, and their requests are handled there.
    settings = httptools_settings()
    hub = ReadHub()
    steps = Steps()
    async with serving(settings, AtOnce(), hub=hub, tasks=steps.watched) as (open_client, scope):
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not hub.running
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            client = await open_client()
            await first_request(client)
            trio.lowlevel.add_instrument(steps)
            try:
                for path in ("/a", "/b"):
                    await client.send(get(path))
                    assert await replies(client, 1) == [path]
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.steps == 0
            nursery.cancel_scope.cancel()


async def test_a_connection_that_outlives_a_hub_run_waits_on_its_own():
    # Accepted during the hub's first run, it is not in the set of the next:
    # it must not park there, where nothing would wake it.
    settings = httptools_settings()
    hub = ReadHub()
    async with serving(settings, AtOnce(), hub=hub) as (open_client, scope):
        client = await open_client()
        await first_request(client)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not hub.running
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            for path in ("/b", "/c", "/d"):
                await client.send(get(path))
                assert await replies(client, 1) == [path]
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

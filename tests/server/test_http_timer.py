"""The connection driver's time limits fired by a shared DeadlineTimer (as app.py runs it).

test_http_conn.py covers the same limits without a timer (trio deadlines);
these run the driver with one, over real sockets, with both parsers.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from test_http_conn import echo, get, serving

from tlvproxy.server.http_conn import DeadlineTimer, DrainSignal, Request, Response


@asynccontextmanager
async def timed(settings, handler=echo, **kwargs):
    """`serving` with a running DeadlineTimer; yields (open_client, timer)."""
    timer = DeadlineTimer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        async with serving(settings, handler, timer=timer, **kwargs) as (open_client, _):
            yield open_client, timer
        nursery.cancel_scope.cancel()


async def test_idle_connection_closes_at_keepalive_timeout(settings, autojump_clock):
    async with timed(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/once"))
        assert (await client.reply()).status == 200
        answered = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - answered == pytest.approx(settings.keepalive_timeout)


async def test_slow_head_gets_408_at_header_timeout(settings, autojump_clock):
    async with timed(settings) as (open_client, _):
        client = await open_client()
        started = trio.current_time()
        await client.send(b"GET /slow HTTP/1.1\r\nHost: te")
        reply = await client.reply()
        assert reply.status == 408
        assert reply.headers["x-had-request"] == "no"
        assert trio.current_time() - started == pytest.approx(settings.header_timeout)
        assert await client.closed()


async def test_slow_body_gets_408_with_its_request(settings, autojump_clock):
    async with timed(settings) as (open_client, _):
        client = await open_client()
        await client.send(b"POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nab")
        reply = await client.reply()
        assert reply.status == 408
        assert reply.headers["x-had-request"] == "yes"


async def test_an_earlier_deadline_wakes_the_timer(settings, autojump_clock):
    # The idle connection sets the timer to wake at keepalive_timeout; a silent
    # new connection must still close at its own, earlier, header_timeout.
    assert settings.header_timeout < settings.keepalive_timeout
    async with timed(settings) as (open_client, _):
        idle = await open_client()
        await idle.send(get("/once"))
        assert (await idle.reply()).status == 200
        answered = trio.current_time()
        await trio.sleep(1)
        silent = await open_client()
        connected = trio.current_time()
        assert await silent.closed()
        assert trio.current_time() - connected == pytest.approx(settings.header_timeout)
        assert await idle.closed()
        assert trio.current_time() - answered == pytest.approx(settings.keepalive_timeout)


async def test_a_slow_handler_is_never_cut_by_the_connection_limits(settings, autojump_clock):
    async def slow(request: Request) -> Response:
        await trio.sleep(settings.keepalive_timeout + settings.header_timeout + 1)
        return Response(200, [], b"late but whole")

    async with timed(settings, slow) as (open_client, _):
        client = await open_client()
        await client.send(get("/slow"))
        reply = await client.reply()
        assert reply.status == 200
        assert reply.body == b"late but whole"


async def test_a_request_arriving_at_the_deadline_is_answered_or_the_connection_closes(
    settings, autojump_clock
):
    # The bytes and the deadline come in the same scheduler pass: either is fine,
    # but a handler must never run under the cancelled connection scope.
    async with timed(settings) as (open_client, _):
        client = await open_client()
        await client.send(get("/first"))
        assert (await client.reply()).status == 200
        await trio.sleep_until(trio.current_time() + settings.keepalive_timeout)
        try:
            await client.send(get("/second"))
            reply = await client.reply()
        except trio.BrokenResourceError:
            return  # closed with the request unread: reset, as any idle close
        assert reply is None or (reply.status, reply.headers["x-path"]) == (200, "/second")


async def test_draining_closes_idle_connections_at_once(settings, autojump_clock):
    drain = DrainSignal()
    async with timed(settings, drain_signal=drain) as (open_client, _):
        client = await open_client()
        await client.send(get("/before"))
        assert (await client.reply()).status == 200
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        drain.set()
        assert await client.closed()
        assert trio.current_time() == started


async def test_deadlines_of_past_waits_do_not_pile_up(settings):
    async with timed(settings) as (open_client, timer):
        client = await open_client()
        for _ in range(1500):
            await client.send(get("/again"))
            assert (await client.reply()).status == 200
        # One entry per wait, stale once it is over: the heap is rebuilt from
        # its live entries past 1024 of them.
        assert len(timer._heap) <= 1025

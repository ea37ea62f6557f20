"""Dedicated upstream sessions (the WebSocket side of the pool, SPEC 5)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from rawtlv import PushLog, RawConn, RawUpstream, Reply, Request, pack

from tlvproxy.config.model import Address, HealthSpec, NodeSpec, UpstreamSpec
from tlvproxy.errors import NoHealthyNode
from tlvproxy.framing import Frame, default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.upstream.connection import ConnectionLost, SendFailed
from tlvproxy.upstream.pool import open_pool


def spec_for(*upstreams: RawUpstream, **options: Any) -> UpstreamSpec:
    nodes = tuple(NodeSpec(address=Address("127.0.0.1", u.port)) for u in upstreams)
    return UpstreamSpec(name="im", nodes=nodes, **options)


async def push_on_request(conn: RawConn, request: Request) -> None:
    if request.body == b"push me":
        await conn.send(pack(0x2001, 0, b"for uid %d" % request.uid, uid=request.uid, flags=2))
    await conn.answer(request)


async def test_a_session_has_its_own_connection_and_its_pushes(start_upstream) -> None:
    upstream = await start_upstream(push_on_request)
    async with open_pool(spec_for(upstream), default_layout(), Metrics()) as pool:
        await pool.request(0x1001, b"pooled")
        pushes = PushLog()
        async with pool.open_session(key=None, receiver=pushes) as session:
            assert session.node == upstream.address
            assert len(upstream.conns) == 2  # a dedicated connection, not a pooled one
            reply = Reply()
            session.submit(reply, 0x1001, b"push me", uid=7)
            assert (await reply.wait()).frame is not None
            assert reply.frame.body == b"push me"
            push = await pushes.next()
            assert (push.command, push.body, push.is_push) == (0x2001, b"for uid 7", True)
            assert upstream.conns[1].requests[0].body == b"push me"
        assert session.closed.is_set()
        assert pool.node_states()[0].connections == 1  # the pooled one stays


async def test_submit_frame_passes_a_client_frame_with_a_fresh_seq(start_upstream) -> None:
    upstream = await start_upstream()
    async with (
        open_pool(spec_for(upstream), default_layout(), Metrics()) as pool,
        pool.open_session(key="alice", receiver=PushLog()) as session,
    ):
        client = Frame(command=0x1003, seq=4242, uid=5, body=b'{"a":1}')
        first, second = Reply(), Reply()
        seqs = [session.submit_frame(first, client), session.submit_frame(second, client)]
        reply, again = (await first.wait()).frame, (await second.wait()).frame
    assert reply is not None
    assert again is not None
    assert (reply.body, reply.uid, reply.command) == (b'{"a":1}', 5, 0x1003)
    sent = [r.seq for r in upstream.requests]
    assert 4242 not in sent
    assert len(set(sent)) == 2
    assert [reply.seq, again.seq] == seqs
    assert set(seqs) == set(sent)


async def test_the_session_learns_when_the_upstream_connection_is_lost(start_upstream) -> None:
    upstream = await start_upstream(push_on_request)
    pushes = PushLog()
    async with (
        open_pool(spec_for(upstream), default_layout(), Metrics()) as pool,
        pool.open_session(key=None, receiver=pushes) as session,
    ):
        hello = Reply()
        session.submit(hello, 0x1001, b"hello")
        assert (await hello.wait()).frame is not None
        await upstream.stop()
        # The receiver hears of the end, `closed` is set and `error` says why (1011).
        await pushes.ended.wait()
        assert pushes.error is session.error
        assert session.closed.is_set()
        assert isinstance(session.error, ConnectionLost)
        assert session.error.ws_close == 1011
        with pytest.raises(SendFailed, match="connection is closed"):
            session.submit(Reply(), 0x1001, b"after")


async def test_a_session_follows_the_hash_ring_and_skips_a_dead_node(start_upstream) -> None:
    upstreams = [await start_upstream() for _ in range(3)]
    spec = spec_for(*upstreams, health=HealthSpec(unhealthy_after=1))
    async with open_pool(spec, default_layout(), Metrics()) as pool:
        homes = {}
        for key in ("alice", "bob", "carol", "dave", "erin", "frank"):
            async with pool.open_session(key=key, receiver=PushLog()) as session:
                homes[key] = session.node
            async with pool.open_session(key=key, receiver=PushLog()) as session:
                assert session.node == homes[key]
        victim = next(u for u in upstreams if u.address in homes.values())
        await victim.stop()
        for key, home in homes.items():
            async with pool.open_session(key=key, receiver=PushLog()) as session:
                if home == victim.address:
                    assert session.node != victim.address
                else:
                    assert session.node == home


async def test_no_session_without_a_healthy_node(start_upstream) -> None:
    upstream = await start_upstream()
    await upstream.stop()
    spec = spec_for(upstream, health=HealthSpec(unhealthy_after=1))
    async with open_pool(spec, default_layout(), Metrics()) as pool:
        with pytest.raises(SendFailed, match="connect failed"):
            async with pool.open_session(key="alice", receiver=PushLog()):
                pass
        with pytest.raises(NoHealthyNode) as caught:
            async with pool.open_session(key="alice", receiver=PushLog()):
                pass
    assert caught.value.ws_close == 1013


async def test_a_session_timeout_counts_for_the_node(start_upstream, autojump_clock) -> None:
    async def ignore(conn: RawConn, request: Request) -> None:
        pass

    upstream = await start_upstream(ignore)
    metrics = Metrics()
    async with (
        open_pool(spec_for(upstream), default_layout(), metrics) as pool,
        pool.open_session(key=None, receiver=PushLog()) as session,
    ):
        reply = Reply(deadline=trio.current_time() + 2)
        session.submit(reply, 0x1001, b"x")
        assert (await reply.wait()).timed_out
        assert pool.node_states()[0].consecutive_failures == 1
    labels = {"upstream": "im", "node": upstream.address, "outcome": "timeout"}
    assert metrics.registry.get_sample_value("tlvproxy_upstream_requests_total", labels) == 1

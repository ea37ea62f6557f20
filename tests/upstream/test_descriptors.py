"""A gateway out of file descriptors is not a failing node (issue 16, finding 6).

Real pools and real sockets; "out of descriptors" is real too: this process's
RLIMIT_NOFILE is lowered, for the time of one block, to its lowest free
descriptor, so that the next socket() fails with EMFILE.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from tlvproxy.config.model import Address, HeartbeatSpec, NodeSpec, UpstreamSpec
from tlvproxy.errors import Overloaded
from tlvproxy.framing import default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.upstream.pool import Pool, open_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from rawtlv import RawConn, RawUpstream, Request


def spec_for(upstream: RawUpstream, **options: Any) -> UpstreamSpec:
    node = NodeSpec(address=Address("127.0.0.1", upstream.port))
    return UpstreamSpec(name="im", nodes=(node,), **options)


@contextlib.asynccontextmanager
async def pool_for(spec: UpstreamSpec, metrics: Metrics) -> AsyncIterator[Pool]:
    async with open_pool(spec, default_layout(), metrics) as pool:
        yield pool


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """No new descriptor for this process within the block (EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def assert_healthy(pool: Pool, metrics: Metrics) -> None:
    (state,) = pool.node_states()
    assert state.healthy
    assert state.consecutive_failures == 0
    assert sample(metrics, "tlvproxy_upstream_node_healthy", upstream="im", node=state.address)


def test_the_block_really_leaves_no_descriptor() -> None:
    with no_descriptor_left(), pytest.raises(OSError, match="Too many open files"):
        os.dup(0)


async def test_a_request_that_cannot_connect_for_want_of_descriptors_is_overloaded(
    start_upstream,
) -> None:
    upstream = await start_upstream()
    metrics = Metrics()
    spec = spec_for(upstream, retries=0)
    async with pool_for(spec, metrics) as pool:
        # More than unhealthy_after (3) connects fail locally: the node stays healthy.
        for _ in range(5):
            with no_descriptor_left(), pytest.raises(Overloaded) as caught:
                await pool.request(0x1001, b"hello")
            assert caught.value.code == "overloaded"
            assert caught.value.http_status == 503
            assert "file descriptor" in caught.value.message
            assert_healthy(pool, metrics)
        # Descriptors back: served at once, no backoff and no probe to wait for.
        reply = await pool.request(0x1001, b"hello")
        assert reply.frame.body == b"hello"


async def test_a_session_that_cannot_connect_for_want_of_descriptors_closes_1013(
    start_upstream,
) -> None:
    upstream = await start_upstream()
    metrics = Metrics()
    async with pool_for(spec_for(upstream), metrics) as pool:
        for _ in range(5):
            with no_descriptor_left(), pytest.raises(Overloaded) as caught:
                async with pool.open_session(key=None, receiver=_NoPushes()):
                    pytest.fail("the session opened")  # pragma: no cover
            assert caught.value.ws_close == 1013
        assert_healthy(pool, metrics)


async def test_heartbeats_that_cannot_connect_for_want_of_descriptors_are_no_failure(
    start_upstream, autojump_clock: trio.testing.MockClock
) -> None:
    heartbeats: list[int] = []

    async def answer(conn: RawConn, request: Request) -> None:
        heartbeats.append(request.command)
        await conn.answer(request)

    upstream: RawUpstream = await start_upstream(answer)
    metrics = Metrics()
    spec = spec_for(upstream, heartbeat=HeartbeatSpec(command=1, interval=1.0))
    async with pool_for(spec, metrics) as pool:
        # No connection yet: each heartbeat tick connects first, and fails.
        with no_descriptor_left():
            await trio.sleep(10.5)
        assert_healthy(pool, metrics)
        await trio.sleep(1.0)
        assert heartbeats, "the heartbeat never reached the node once descriptors were back"
        assert_healthy(pool, metrics)


class _NoPushes:
    def on_push(self, frame: object) -> None:
        raise AssertionError("no push expected")  # pragma: no cover

    def on_end(self, error: object) -> None:
        pass

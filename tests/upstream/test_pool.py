"""The upstream pool against raw TLV servers on real sockets (SPEC 4.5)."""

from __future__ import annotations

from collections import Counter
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from tlvproxy.config.model import (
    Address,
    HealthSpec,
    HeartbeatSpec,
    NodeSpec,
    UpstreamSpec,
)
from tlvproxy.errors import NoHealthyNode, UpstreamProtocolError, UpstreamUnavailable
from tlvproxy.framing import Frame, default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.upstream.connection import ConnectionLost, SendFailed
from tlvproxy.upstream.pool import Pool, open_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from rawtlv import RawConn, RawUpstream, Request

    from tlvproxy.errors import GatewayError

HEARTBEAT = 0x0001


def spec_for(*upstreams: RawUpstream | tuple[RawUpstream, int], **options: Any) -> UpstreamSpec:
    nodes = []
    for item in upstreams:
        upstream, weight = item if isinstance(item, tuple) else (item, 1)
        nodes.append(NodeSpec(address=Address("127.0.0.1", upstream.port), weight=weight))
    return UpstreamSpec(name="im", nodes=tuple(nodes), **options)


@asynccontextmanager
async def pool_for(spec: UpstreamSpec, metrics: Metrics | None = None) -> AsyncIterator[Pool]:
    async with open_pool(spec, default_layout(), metrics or Metrics()) as pool:
        yield pool


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def ignore(conn: RawConn, request: Request) -> None:
    pass


async def malformed_for_bad(conn: RawConn, request: Request) -> None:
    """Echo, except that the request with body b"bad" gets bytes that are no frame."""
    if request.body == b"bad":
        await conn.send(b"\x07" + b"not a frame" * 3)  # 0x07: not the start byte 0x09
    else:
        await conn.answer(request)


async def test_answers_of_one_read_are_counted_by_the_time_their_callers_see_them(
    start_upstream,
) -> None:
    # Answers are counted in ints and published once per read: a caller that
    # has its answer finds it in the metric, whatever else that read held.
    upstream = await start_upstream()
    metrics = Metrics()
    labels = {"upstream": "im", "node": upstream.address, "outcome": "ok"}
    seen: list[float] = []
    async with pool_for(spec_for(upstream), metrics) as pool:

        async def call() -> None:
            await pool.request(0x1001, b"hello")
            seen.append(sample(metrics, "tlvproxy_upstream_requests_total", **labels))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(call)
        assert sample(metrics, "tlvproxy_upstream_requests_total", **labels) == 50
    assert len(seen) == 50
    assert all(count >= n for n, count in enumerate(sorted(seen), start=1))


async def dead_port(start_upstream) -> RawUpstream:
    """An upstream whose port refuses connections."""
    upstream = await start_upstream()
    await upstream.stop()
    return upstream


async def test_request_answers_and_counts_outcomes(start_upstream) -> None:
    async def status_for_bad(conn: RawConn, request: Request) -> None:
        await conn.answer(request, status=3 if request.body == b"bad" else 0)

    upstream = await start_upstream(status_for_bad)
    metrics = Metrics()
    async with pool_for(spec_for(upstream), metrics) as pool:
        reply = await pool.request(0x1001, b"hello", uid=9)
        assert (reply.node, reply.frame.body, reply.frame.uid) == (upstream.address, b"hello", 9)
        assert (await pool.request(0x1001, b"bad")).frame.status == 3
        [state] = pool.node_states()
    assert (state.address, state.healthy, state.in_flight, state.connections) == (
        upstream.address,
        True,
        0,
        1,
    )
    labels = {"upstream": "im", "node": upstream.address}
    assert sample(metrics, "tlvproxy_upstream_requests_total", **labels, outcome="ok") == 1
    assert sample(metrics, "tlvproxy_upstream_requests_total", **labels, outcome="status") == 1
    assert sample(metrics, "tlvproxy_upstream_node_healthy", **labels) == 1


async def test_connections_open_lazily_up_to_the_configured_number(start_upstream) -> None:
    release = trio.Event()

    async def slow_echo(conn: RawConn, request: Request) -> None:
        await release.wait()
        await conn.answer(request)

    upstream = await start_upstream(slow_echo)
    async with pool_for(spec_for(upstream, connections=3)) as pool:
        assert pool.node_states()[0].connections == 0
        async with trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(pool.request, 0x1001, b"x")
            await trio.testing.wait_all_tasks_blocked()
            state = pool.node_states()[0]
            assert (state.connections, state.in_flight) == (3, 60)
            # Least-loaded: the requests are spread over the three connections.
            loads = [len(c.requests) for c in upstream.conns]
            assert sum(loads) == 60
            assert max(loads) - min(loads) <= 2
            release.set()
    assert len(upstream.conns) == 3


async def test_every_connection_at_its_cap_fails_without_sending(start_upstream) -> None:
    upstream = await start_upstream(ignore)
    spec = spec_for(upstream, connections=1, max_in_flight=2)
    async with pool_for(spec) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(pool.request, 0x1001, b"a")
        nursery.start_soon(pool.request, 0x1001, b"b")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(SendFailed, match="every connection has 2 requests in flight"):
            await pool.request(0x1001, b"c")
        nursery.cancel_scope.cancel()
    assert len(upstream.requests) == 2


async def test_a_request_right_after_a_framing_error_goes_on_a_new_connection(
    start_upstream,
) -> None:
    """A request made while a connection broken by a malformed frame is still being
    torn down must not fail: with the node reachable, it goes on a new connection
    (SPEC 4.5). Only the request sent on the broken connection may fail.

    Pins a race: the broken connection stayed among the node's live connections
    until its task finished tearing down, so with `connections: 1` the pool opened
    no new one and failed the request with "every connection has N requests in
    flight". Request B is made in the scheduler pass where A learns of the framing
    error, with no checkpoint in between: always inside that window.
    """
    upstream = await start_upstream(malformed_for_bad)
    metrics = Metrics()
    async with pool_for(spec_for(upstream, connections=1), metrics) as pool:
        with pytest.raises(UpstreamProtocolError, match="malformed frame"):
            await pool.request(0x1001, b"bad")
        reply = await pool.request(0x1001, b"good")
        assert (reply.node, reply.frame.body) == (upstream.address, b"good")
        assert pool.node_states()[0].healthy
    assert [[r.body for r in conn.requests] for conn in upstream.conns] == [[b"bad"], [b"good"]]
    assert sample(metrics, "tlvproxy_frames_rejected_total", reason="bad_start_byte") == 1


async def test_concurrent_requests_during_a_framing_error_teardown_succeed(
    start_upstream,
) -> None:
    """Like the test above, with several requests from other tasks, woken by A's
    failure while the broken connection is torn down: none may fail (SPEC 4.5), and
    they share one new connection (`connections: 1`).
    """
    upstream = await start_upstream(malformed_for_bad)
    a_failed = trio.Event()
    outcomes: list[object] = []

    async def request_a(pool: Pool) -> None:
        try:
            await pool.request(0x1001, b"bad")
        except (UpstreamProtocolError, ConnectionLost) as exc:
            outcomes.append(type(exc).__name__)
        a_failed.set()

    async def request_b(pool: Pool, i: int) -> None:
        await a_failed.wait()
        try:
            outcomes.append((await pool.request(0x1001, b"b%d" % i)).frame.body)
        except UpstreamUnavailable as exc:
            outcomes.append(exc.message)

    async with pool_for(spec_for(upstream, connections=1)) as pool:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(request_b, pool, i)
            nursery.start_soon(request_a, pool)
        assert sorted(map(str, outcomes)) == ["UpstreamProtocolError", "b'b0'", "b'b1'", "b'b2'"]
        assert pool.node_states()[0].healthy
    assert len(upstream.conns) == 2


async def test_round_robin_honours_weights(start_upstream) -> None:
    a = await start_upstream()
    b = await start_upstream()
    c = await start_upstream()
    async with pool_for(spec_for((a, 5), (b, 1), (c, 1))) as pool:
        nodes = [(await pool.request(0x1001, b"x")).node for _ in range(70)]
    assert Counter(nodes) == {a.address: 50, b.address: 10, c.address: 10}
    # Smooth (nginx): the heavy node is interleaved, never seven in a row.
    assert nodes[:7] == [
        a.address,
        a.address,
        b.address,
        a.address,
        c.address,
        a.address,
        a.address,
    ]


async def test_consistent_hash_keeps_keys_and_a_dead_node_moves_only_its_own(
    start_upstream,
) -> None:
    upstreams = [await start_upstream() for _ in range(4)]
    spec = spec_for(*upstreams, balance="consistent_hash", health=HealthSpec(unhealthy_after=1))
    keys = [f"device-{i}" for i in range(200)]
    async with pool_for(spec) as pool:
        before = {key: (await pool.request(0x1001, b"x", key=key)).node for key in keys}
        again = {key: (await pool.request(0x1001, b"x", key=key)).node for key in keys}
        assert again == before
        assert len(set(before.values())) == 4
        victim = upstreams[1]
        await victim.stop()
        after = {key: (await pool.request(0x1001, b"x", key=key)).node for key in keys}
    moved = {key for key in keys if after[key] != before[key]}
    assert moved == {key for key in keys if before[key] == victim.address}
    assert victim.address not in after.values()


async def test_a_node_dying_mid_flight_fails_exactly_its_requests(start_upstream) -> None:
    a = await start_upstream(ignore)  # holds every request until it dies
    b = await start_upstream()
    metrics = Metrics()
    async with pool_for(spec_for(a, b, health=HealthSpec(unhealthy_after=2)), metrics) as pool:
        outcomes: dict[int, str] = {}

        async def one(i: int) -> None:
            try:
                outcomes[i] = (await pool.request(0x1001, b"%d" % i)).node
            except ConnectionLost:
                outcomes[i] = "lost"

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(a.requests) == 5
            await a.stop()
        lost = {i for i, node in outcomes.items() if node == "lost"}
        assert lost == {int(r.body) for r in a.requests}
        assert {outcomes[i] for i in set(outcomes) - lost} == {b.address}
        later = [(await pool.request(0x1001, b"later")).node for _ in range(10)]
        assert later == [b.address] * 10
        assert not pool.node_states()[0].healthy
    labels = {"upstream": "im", "node": a.address}
    assert sample(metrics, "tlvproxy_upstream_requests_total", **labels, outcome="unavailable") >= 5
    assert sample(metrics, "tlvproxy_upstream_node_healthy", **labels) == 0


async def test_a_never_sent_request_is_retried_on_another_node(start_upstream) -> None:
    dead = await dead_port(start_upstream)
    alive = await start_upstream()
    async with pool_for(spec_for(dead, alive, retries=1)) as pool:
        # Smooth round robin starts with the first node: the dead one.
        reply = await pool.request(0x1001, b"x")
    assert reply.node == alive.address
    assert len(alive.requests) == 1


async def test_retries_zero_means_no_retry(start_upstream) -> None:
    dead = await dead_port(start_upstream)
    alive = await start_upstream()
    async with pool_for(spec_for(dead, alive, retries=0)) as pool:
        with pytest.raises(SendFailed, match="connect failed"):
            await pool.request(0x1001, b"x")
    assert alive.requests == []


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_sent_request_is_retried_only_when_idempotent(
    start_upstream, idempotent: bool
) -> None:
    async def hang_up(conn: RawConn, request: Request) -> None:
        await conn.stream.aclose()

    flaky = await start_upstream(hang_up)
    good = await start_upstream()
    async with pool_for(spec_for(flaky, good, retries=1)) as pool:
        if idempotent:
            reply = await pool.request(0x1002, b"x", idempotent=True)
            assert reply.node == good.address
        else:
            with pytest.raises(ConnectionLost, match="lost before the response"):
                await pool.request(0x1001, b"x")
    assert len(flaky.requests) == 1
    assert len(good.requests) == (1 if idempotent else 0)


async def test_no_healthy_node(start_upstream) -> None:
    dead = await dead_port(start_upstream)
    spec = spec_for(dead, health=HealthSpec(unhealthy_after=1))
    async with pool_for(spec) as pool:
        with pytest.raises(SendFailed, match="connect failed"):
            await pool.request(0x1001, b"x")
        with pytest.raises(NoHealthyNode, match="no healthy node") as caught:
            await pool.request(0x1001, b"x")
    assert isinstance(caught.value, UpstreamUnavailable)
    assert caught.value.ws_close == 1013


class Outcome:
    """A pool `Completion` that keeps what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, object]] = []

    def on_reply(self, frame: Frame, node: str) -> None:
        self.told.append(("reply", frame.body))

    def on_error(self, error: GatewayError, node: str | None) -> None:
        self.told.append(("error", error))


async def test_a_closed_pool_fails_what_is_submitted_and_raises_nothing(start_upstream) -> None:
    upstream = await start_upstream()
    async with pool_for(spec_for(upstream, retries=2)) as pool:
        await pool.request(0x1001, b"open")
    # A reload retired the pool (docs/operations.md "Reload"), and a session
    # that kept the old table submits to it.
    outcome = Outcome()
    pool.submit(outcome, 0x1001, b"late", idempotent=True, deadline=trio.current_time() + 1)
    [(kind, error)] = outcome.told
    assert kind == "error"
    assert type(error) is UpstreamUnavailable
    assert error.message == "upstream 'im': the pool is closed"
    with pytest.raises(UpstreamUnavailable, match="the pool is closed"):
        await pool.request(0x1001, b"late")
    assert [request.body for request in upstream.requests] == [b"open"]


async def test_a_request_in_flight_when_its_pool_closes_is_told_without_a_retry(
    start_upstream,
) -> None:
    holds = await start_upstream(ignore)
    other = await start_upstream()
    outcome = Outcome()
    async with pool_for(spec_for(holds, other, retries=1)) as pool:
        # Idempotent: lost with its connection, it would go to `other`.
        pool.submit(outcome, 0x1002, b"x", idempotent=True, deadline=trio.current_time() + 5)
        await trio.testing.wait_all_tasks_blocked()
        assert len(holds.requests) == 1
    [(kind, error)] = outcome.told
    assert (kind, type(error)) == ("error", UpstreamUnavailable)
    assert other.requests == []


async def test_timeouts_count_as_failures_but_other_cancels_do_not(
    start_upstream, autojump_clock
) -> None:
    upstream = await start_upstream(ignore)
    metrics = Metrics()
    spec = spec_for(upstream, health=HealthSpec(unhealthy_after=2))
    async with pool_for(spec, metrics) as pool:
        # Cancelled by hand (a client gone): not the node's fault.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.request, 0x1001, b"x")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert pool.node_states()[0].consecutive_failures == 0
        for expected in (1, 2):
            with trio.move_on_after(3):
                await pool.request(0x1001, b"x")
            assert pool.node_states()[0].consecutive_failures == expected
            assert pool.node_states()[0].in_flight == 0
        assert not pool.node_states()[0].healthy
    labels = {"upstream": "im", "node": upstream.address}
    assert sample(metrics, "tlvproxy_upstream_requests_total", **labels, outcome="timeout") == 2


async def test_heartbeats_mark_a_dead_node_unhealthy_and_a_recovered_one_healthy(
    start_upstream, autojump_clock
) -> None:
    upstream = await start_upstream()
    spec = spec_for(
        upstream,
        heartbeat=HeartbeatSpec(command=HEARTBEAT, interval=1.0),
        health=HealthSpec(unhealthy_after=3, healthy_after=2),
        timeout=0.5,
    )
    metrics = Metrics()
    labels = {"upstream": "im", "node": upstream.address}
    async with pool_for(spec, metrics) as pool:
        await trio.sleep(2.5)  # two ticks: the heartbeat opened a connection and was answered
        beats = [r for r in upstream.requests if r.command == HEARTBEAT]
        assert len(beats) == 2
        assert all(r.body == b"" for r in beats)
        assert pool.node_states()[0].healthy
        await upstream.stop()
        await trio.sleep(2)
        assert pool.node_states()[0].healthy  # two failed reconnects: not yet
        await trio.sleep(1)
        assert not pool.node_states()[0].healthy
        assert sample(metrics, "tlvproxy_upstream_node_healthy", **labels) == 0
        with pytest.raises(NoHealthyNode):
            await pool.request(0x1001, b"x")
        revived = await start_upstream(port=upstream.port)
        await trio.sleep(1)
        assert not pool.node_states()[0].healthy  # one heartbeat answered
        await trio.sleep(1)
        assert pool.node_states()[0].healthy
        assert sample(metrics, "tlvproxy_upstream_node_healthy", **labels) == 1
        assert (await pool.request(0x1001, b"back")).frame.body == b"back"
    assert any(r.command == HEARTBEAT for r in revived.requests)


async def test_a_missed_heartbeat_is_a_failure_and_closes_that_connection(
    start_upstream, autojump_clock
) -> None:
    silent = False

    async def maybe_silent(conn: RawConn, request: Request) -> None:
        if not silent:
            await conn.answer(request)

    upstream = await start_upstream(maybe_silent)
    spec = spec_for(
        upstream,
        heartbeat=HeartbeatSpec(command=HEARTBEAT, interval=1.0),
        health=HealthSpec(unhealthy_after=2, healthy_after=1),
    )
    async with pool_for(spec) as pool:
        # Ticks at t=1, 2, ...; a tick waits up to 1 s (the interval) for its answer.
        await pool.request(0x1001, b"open")
        await trio.sleep(1.5)  # tick at 1 answered
        assert pool.node_states()[0].consecutive_failures == 0
        silent = True
        await trio.sleep(2)  # tick at 2 missed at 3: a failure, its connection closed
        assert pool.node_states()[0].consecutive_failures == 1
        assert pool.node_states()[0].connections == 0
        await trio.sleep(2)  # tick at 4 reconnects and misses again at 5
        assert not pool.node_states()[0].healthy
        silent = False
        await trio.sleep(1)  # tick at 6 reconnects and is answered
        assert pool.node_states()[0].healthy
    assert len(upstream.conns) == 3


async def test_without_heartbeat_an_unhealthy_node_is_probed_back(
    start_upstream, autojump_clock
) -> None:
    upstream = await start_upstream()
    port = upstream.port
    await upstream.stop()
    spec = spec_for(upstream, health=HealthSpec(unhealthy_after=1, healthy_after=2))
    async with pool_for(spec) as pool:
        with pytest.raises(SendFailed):
            await pool.request(0x1001, b"x")
        assert not pool.node_states()[0].healthy
        await trio.sleep(5)  # probes keep failing, with a growing backoff
        assert not pool.node_states()[0].healthy
        await start_upstream(port=port)
        await trio.sleep(30)  # the backoff is capped at 10 s; two probes then succeed
        assert pool.node_states()[0].healthy
        assert (await pool.request(0x1001, b"back")).frame.body == b"back"


async def test_a_burst_of_requests_opens_no_more_than_connections(start_upstream) -> None:
    """Requests of one scheduler pass that each find the open connection busy
    start one more connect between them, not one each: `connections` bounds
    the connections a burst opens."""
    upstream = await start_upstream()
    async with pool_for(spec_for(upstream, connections=2)) as pool:
        await pool.request(0x1001, b"first")
        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(pool.request, 0x1001, b"burst")
        await trio.testing.wait_all_tasks_blocked()
        [state] = pool.node_states()
        assert state.connections == 2
    assert len(upstream.conns) == 2

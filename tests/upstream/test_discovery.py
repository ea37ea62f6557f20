"""Discovered nodes: values read strictly (a malformed one skips its key only),
and a pool whose node set changes between requests without failing any
(docs/configuration.md "discovery")."""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter

import pytest
import trio
import trio.testing

from tlvproxy.config.model import Address, NodeSpec, UpstreamSpec
from tlvproxy.etcd.wire import KeyValue
from tlvproxy.framing import default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.upstream.discovery import MAX_VALUE, read_nodes
from tlvproxy.upstream.pool import open_pool


def kv(key: str, value: bytes | str, revision: int = 1) -> KeyValue:
    data = value.encode() if isinstance(value, str) else value
    return KeyValue(key=f"/svc/{key}".encode(), value=data, mod_revision=revision)


def test_a_value_is_host_port_or_an_address_with_a_weight() -> None:
    nodes = read_nodes(
        [
            kv("a", "127.0.0.1:7001"),
            kv("b", json.dumps({"address": "[::1]:7002", "weight": 3})),
            kv("c", " 10.0.0.3:7003 \n"),
        ]
    )
    assert nodes == [
        NodeSpec(address=Address("127.0.0.1", 7001)),
        NodeSpec(address=Address("::1", 7002), weight=3),
        NodeSpec(address=Address("10.0.0.3", 7003)),
    ]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("{not json", "not JSON"),
        ('{"address": "127.0.0.1:7001", "weight": 0}', "between 1 and 1000"),
        ('{"address": "127.0.0.1:7001", "weight": "heavy"}', "whole number"),
        ('{"address": "127.0.0.1:7001", "admin": true}', "unknown key"),
        ('{"weight": 2}', "expected"),
        ('["127.0.0.1:7001"]', "expected"),
        ("127.0.0.1", "HOST:PORT"),
        ("127.0.0.1:0", "port 0"),
        ("127.0.0.1:99999", "port 99999"),
        ("", "HOST:PORT"),
        (b"\xff\xfe:1", "utf-8"),
        ("1" * (MAX_VALUE + 1), "longer than"),
    ],
)
def test_a_malformed_value_skips_its_key_only(value, why, caplog) -> None:
    caplog.set_level(logging.WARNING, "tlvproxy.upstream")
    nodes = read_nodes([kv("good", "127.0.0.1:7001"), kv("bad", value)])
    assert nodes == [NodeSpec(address=Address("127.0.0.1", 7001))]
    [record] = caplog.records
    assert record.key == "/svc/bad"
    assert why.lower() in record.error.lower()


def test_a_malformed_key_is_logged_once_per_revision(caplog) -> None:
    caplog.set_level(logging.WARNING, "tlvproxy.upstream")
    skipped: set[tuple[bytes, int]] = set()
    read_nodes([kv("bad", "nope")], skipped)
    read_nodes([kv("bad", "nope")], skipped)
    read_nodes([kv("bad", "still nope", revision=2)], skipped)
    assert len(caplog.records) == 2


def test_an_address_under_two_keys_is_one_node() -> None:
    nodes = read_nodes([kv("a", "127.0.0.1:7001"), kv("b", "127.0.0.1:7001")])
    assert nodes == [NodeSpec(address=Address("127.0.0.1", 7001))]


def spec_of(upstream) -> NodeSpec:
    return NodeSpec(address=Address("127.0.0.1", upstream.port))


async def test_the_node_set_follows_without_failing_a_request(start_upstream) -> None:
    release = trio.Event()

    async def slow(conn, request) -> None:
        if request.body == b"slow":
            await release.wait()
        await conn.answer(request)

    a = await start_upstream(slow)
    b = await start_upstream()
    spec = UpstreamSpec(name="im", nodes=(), discovery="/svc", retries=0)
    async with open_pool(spec, default_layout(), Metrics()) as pool:
        with pytest.raises(Exception, match="no healthy node"):
            await pool.request(0x1003, b"x")
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        assert [n.address for n in pool.node_states()] == [a.address]
        # A request in flight on `a` when `a` leaves is answered.
        async with trio.open_nursery() as nursery:
            replies = []

            async def in_flight() -> None:
                replies.append(await pool.request(0x1003, b"slow"))

            nursery.start_soon(in_flight)
            await trio.testing.wait_all_tasks_blocked()
            pool.set_nodes([spec_of(b)])
            await pool.wait_joined()
            assert [n.address for n in pool.node_states()] == [b.address]
            nodes = Counter([(await pool.request(0x1003, b"x")).node for _ in range(10)])
            assert nodes == {b.address: 10}
            release.set()
        assert replies[0].node == a.address
        # Once its last request was answered, `a`'s connections close.
        for _ in range(200):
            if all(_peer_closed(conn.stream) for conn in a.conns):
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("the connections of the node that left stay open")


def _peer_closed(stream: trio.SocketStream) -> bool:
    if stream.socket.fileno() == -1:
        return True
    try:
        return stream.socket._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""  # type: ignore[attr-defined]
    except BlockingIOError:
        return False


async def test_weights_and_joins_apply_between_requests(start_upstream) -> None:
    a = await start_upstream()
    b = await start_upstream()
    spec = UpstreamSpec(name="im", nodes=(), discovery="/svc")
    async with open_pool(spec, default_layout(), Metrics()) as pool:
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        pool.set_nodes([spec_of(a), NodeSpec(address=Address("127.0.0.1", b.port), weight=3)])
        await pool.wait_joined()
        nodes = Counter([(await pool.request(0x1003, b"x")).node for _ in range(40)])
        assert nodes == {a.address: 10, b.address: 30}


async def test_a_node_registered_again_while_leaving_keeps_its_health_gauge(
    start_upstream,
) -> None:
    a = await start_upstream()
    metrics = Metrics()
    spec = UpstreamSpec(name="im", nodes=(), discovery="/svc")
    labels = {"upstream": "im", "node": a.address}
    async with open_pool(spec, default_layout(), metrics) as pool:
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        await pool.request(0x1003, b"x")
        pool.set_nodes([])
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        await trio.sleep(0.2)  # the first one has closed its connection and gone
        assert [n.address for n in pool.node_states()] == [a.address]
        assert metrics.registry.get_sample_value("tlvproxy_upstream_node_healthy", labels) == 1
        pool.set_nodes([])
        await trio.sleep(0.2)
        assert metrics.registry.get_sample_value("tlvproxy_upstream_node_healthy", labels) is None


async def test_a_node_that_left_leaves_no_metrics_behind(start_upstream) -> None:
    # Nodes come and go under discovery (new addresses each time, in a
    # scaled service): the series of those that left must not pile up.
    a = await start_upstream()
    metrics = Metrics()
    spec = UpstreamSpec(name="im", nodes=(), discovery="/svc")
    ok = {"upstream": "im", "node": a.address, "outcome": "ok"}
    async with open_pool(spec, default_layout(), metrics) as pool:
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        await pool.request(0x1003, b"x")
        assert metrics.registry.get_sample_value("tlvproxy_upstream_requests_total", ok) == 1
        pool.set_nodes([])
        await trio.sleep(0.2)
        nodes = {
            sample.labels.get("node")
            for metric in metrics.registry.collect()
            if metric.name.startswith("tlvproxy_upstream")
            for sample in metric.samples
        }
        assert a.address not in nodes


class _Outcome:
    """A pool `Completion` that keeps what it is told."""

    def __init__(self) -> None:
        self.node: str | None = None
        self.error: Exception | None = None
        self.done = trio.Event()

    def on_reply(self, frame: object, node: str) -> None:
        self.node = node
        self.done.set()

    def on_error(self, error: Exception, node: str | None) -> None:
        self.node, self.error = node, error
        self.done.set()


async def test_a_request_on_a_leaving_node_keeps_its_own_longer_deadline(start_upstream) -> None:
    async def slow(conn, request) -> None:
        await trio.sleep(1.5)
        await conn.answer(request)

    a = await start_upstream(slow)
    b = await start_upstream()
    # A command's own timeout (3 s) is longer than the upstream's.
    spec = UpstreamSpec(name="im", nodes=(), discovery="/svc", timeout=0.1, retries=0)
    async with open_pool(spec, default_layout(), Metrics()) as pool:
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        outcome = _Outcome()
        pool.submit(outcome, 0x1003, b"x", deadline=trio.current_time() + 3)
        await trio.testing.wait_all_tasks_blocked()
        pool.set_nodes([spec_of(b)])
        with trio.fail_after(3):
            await outcome.done.wait()
        assert (outcome.node, outcome.error) == (a.address, None)


async def test_requests_waiting_for_a_leaving_node_go_elsewhere_without_a_try(
    start_upstream,
) -> None:
    a = await start_upstream()
    b = await start_upstream()
    spec = UpstreamSpec(
        name="im", nodes=(), discovery="/svc", retries=0, connections=1, connect_timeout=0.5
    )
    async with open_pool(spec, default_layout(), Metrics()) as pool:
        pool.set_nodes([spec_of(a)])
        await pool.wait_joined()
        await a.stop()
        for _ in range(200):
            if not pool.node_states()[0].connections:
                break
            await trio.sleep(0.01)
        # `a`'s port now takes no connection: a connect to it hangs (its
        # backlog is full), and the requests wait for it.
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", a.port))
        hole.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", a.port))
            fillers.append(filler)
        try:
            outcomes = [_Outcome() for _ in range(2)]
            for outcome in outcomes:
                pool.submit(outcome, 0x1003, b"x", deadline=trio.current_time() + 5)
            await trio.testing.wait_all_tasks_blocked()
            pool.set_nodes([spec_of(b)])
            with trio.fail_after(4):
                for outcome in outcomes:
                    await outcome.done.wait()
            assert [(o.node, o.error) for o in outcomes] == [(b.address, None)] * 2
        finally:
            for s in [hole, *fillers]:
                s.close()


async def test_a_round_robin_pool_builds_no_ring_and_joins_build_one_ring_per_batch(
    start_upstream, monkeypatch
) -> None:
    from tlvproxy.upstream import pool as pool_module

    built = []
    real_ring = pool_module.HashRing

    def counted(nodes, **options):
        built.append(len(nodes))
        return real_ring(nodes, **options)

    monkeypatch.setattr(pool_module, "HashRing", counted)
    upstreams = [await start_upstream() for _ in range(8)]
    heavy = [NodeSpec(address=spec_of(u).address, weight=100) for u in upstreams]
    for balance in ("round_robin", "consistent_hash"):
        spec = UpstreamSpec(name="im", nodes=(), discovery="/svc", balance=balance)
        async with open_pool(spec, default_layout(), Metrics()) as pool:
            built.clear()
            pool.set_nodes(heavy)
            await pool.wait_joined()
            await trio.sleep(0.1)
            assert len(pool.node_states()) == 8
            if balance == "round_robin":
                assert built == []
            else:
                assert len(built) <= 2, built  # not one per node joining
                assert built[-1] == 8

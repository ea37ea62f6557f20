"""The pool of one upstream: node choice, pooled connections, retries, health (SPEC 4.5).

Owns: per node, up to `spec.connections` multiplexed connections (opened lazily,
reconnected with capped exponential backoff), health counting and its metrics, the
heartbeat or probe task, the retry policy, and dedicated WebSocket sessions.
Must not: set request deadlines (the caller wraps `request` in a cancel scope,
STYLE 5), decode bodies, or know about HTTP.

Policies decided here:
- A request goes to the least-loaded usable connection of the chosen node. While the
  node has fewer than `connections`, a busy best connection starts another one in the
  background; with none usable the request waits for its own connect
  (`connect_timeout`). When every connection is at `max_in_flight`, the request fails
  at once with `SendFailed` (an UpstreamUnavailable, so 502): a slow node never
  queues unbounded work, and, never sent, the request may be retried elsewhere.
- `consistent_hash` uses the request's key; a request without a key (its key
  expression found nothing) is balanced by weighted round robin.
- A node is skipped while unhealthy, and also while it has no connection and its
  reconnect backoff has not expired. With no node left: `NoHealthyNode`.
- Failures (health.py): a failed connect, a timeout (the caller's cancel scope fired
  at its deadline), a connection broken by the node (reset, EOF with requests in
  flight, malformed frame: counted once per connection), a missed heartbeat.
- Heartbeat (when configured): every `interval`, each connection of the node that
  received nothing during the interval sends the heartbeat command with an empty
  body; a node without connections is connected first. A tick where a heartbeat got
  no answer within min(interval, timeout) is one failure (and that connection is
  closed); a tick where all answered is one probe success.
- Without a heartbeat, an unhealthy node is probed by a TCP connect after each
  backoff delay; `healthy_after` successful probes in a row make it healthy.
- Retries (SPEC 4.5): on another node, at most `retries` times, only after
  `SendFailed`, or after any upstream failure when the request is idempotent. A
  timeout is never retried: the caller's deadline has passed.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from tlvproxy.errors import (
    GatewayError,
    NoHealthyNode,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from tlvproxy.framing import Frame
from tlvproxy.upstream.balance import HashRing, RoundRobin
from tlvproxy.upstream.connection import Connection, ConnectionLost, SendFailed
from tlvproxy.upstream.health import BACKOFF_BASE, Backoff, NodeHealth

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

    from tlvproxy.config.model import NodeSpec, UpstreamSpec
    from tlvproxy.framing import HeaderLayout
    from tlvproxy.metrics import Metrics

log = logging.getLogger("tlvproxy.upstream")


@attrs.frozen(slots=True)
class Reply:
    """A response frame and the node ("host:port") that answered it."""

    frame: Frame
    node: str


@attrs.frozen(slots=True, kw_only=True)
class NodeState:
    """One node as `/admin/config` shows it."""

    address: str
    weight: int
    healthy: bool
    in_flight: int
    connections: int
    consecutive_failures: int


class _Node:
    """One node's mutable state; owned by its pool."""

    def __init__(self, spec: NodeSpec, upstream: UpstreamSpec, metrics: Metrics) -> None:
        self.address = spec.address
        self.name = str(spec.address)
        self.weight = spec.weight
        self.health = NodeHealth(
            unhealthy_after=upstream.health.unhealthy_after,
            healthy_after=upstream.health.healthy_after,
        )
        self.backoff = Backoff()
        self.live: list[Connection] = []
        self.connecting = 0
        self.changed = trio.Event()  # set (and replaced) when live or connecting changes
        self.became_unhealthy = trio.Event()  # replaced when the node recovers
        outcomes = metrics.upstream_requests
        self.count_ok = outcomes.labels(upstream.name, self.name, "ok").inc
        self.count_status = outcomes.labels(upstream.name, self.name, "status").inc
        self.count_timeout = outcomes.labels(upstream.name, self.name, "timeout").inc
        self.count_unavailable = outcomes.labels(upstream.name, self.name, "unavailable").inc
        self.count_protocol_error = outcomes.labels(upstream.name, self.name, "protocol_error").inc
        self.healthy_gauge = metrics.upstream_node_healthy.labels(upstream.name, self.name)
        self.healthy_gauge.set(1)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def available(self, now: float) -> bool:
        return self.health.healthy and (bool(self.live) or self.backoff.ready(now))

    def pick(self) -> Connection | None:
        """The least-loaded usable connection, if it is idle or no other may be opened."""
        best: Connection | None = None
        best_load = 0
        for conn in self.live:
            if not conn.usable:
                continue
            load = conn.in_flight
            if load == 0:
                return conn
            if best is None or load < best_load:
                best, best_load = conn, load
        return best


class Pool:
    """Requests to one upstream. Build it with `open_pool`."""

    def __init__(
        self,
        spec: UpstreamSpec,
        layout: HeaderLayout,
        metrics: Metrics,
        nursery: trio.Nursery,
    ) -> None:
        if not spec.nodes:
            raise ValueError(f"upstream {spec.name!r} has no nodes")
        self.spec = spec
        self.layout = layout
        self._metrics = metrics
        self._nursery = nursery
        self._nodes = [_Node(node, spec, metrics) for node in spec.nodes]
        self._round_robin = RoundRobin([node.weight for node in self._nodes])
        self._ring = HashRing([(node.name, node.weight) for node in self._nodes])
        self._hash_requests = spec.balance == "consistent_hash"
        self._max_in_flight = spec.max_in_flight

    # ------------------------------------------------------------ requests

    async def request(
        self,
        command: int,
        body: bytes,
        *,
        uid: int = 0,
        key: str | None = None,
        idempotent: bool = False,
    ) -> Reply:
        """Send one request to a node of this upstream and return its response.

        No timeout: the caller wraps this in a cancel scope; a cancellation at the
        deadline counts as a timeout of the node. Raises NoHealthyNode,
        UpstreamUnavailable (SendFailed: never sent; ConnectionLost: lost before the
        response), UpstreamProtocolError, or PayloadTooLarge / BadRequest when the
        request does not fit a frame.
        """
        key = key if self._hash_requests else None
        tried: list[_Node] = []
        node = self._first(key)
        while True:
            conn = node.pick()
            if conn is None or (conn.in_flight and len(node.live) < self.spec.connections):
                attempt = self._request_when_connected(node, conn, command, body, uid)
            else:
                attempt = conn.request(command, body, uid)
            try:
                frame = await self._counted(node, attempt)
                return Reply(frame, node.name)
            except (UpstreamUnavailable, UpstreamProtocolError) as exc:
                tried.append(node)
                following = None
                if len(tried) <= self.spec.retries and (isinstance(exc, SendFailed) or idempotent):
                    following = self._next(key, tried)
                if following is None:
                    raise
                node = following

    def node_states(self) -> list[NodeState]:
        """Each node's address, weight, health, requests in flight and open connections."""
        return [
            NodeState(
                address=node.name,
                weight=node.weight,
                healthy=node.health.healthy,
                in_flight=sum(conn.in_flight for conn in node.live),
                connections=len(node.live),
                consecutive_failures=node.health.failures,
            )
            for node in self._nodes
        ]

    def _first(self, key: str | None) -> _Node:
        """The node for a first attempt; raises NoHealthyNode when none is eligible."""
        nodes = self._nodes
        if len(nodes) == 1:
            node = nodes[0]
            if (node.health.healthy and node.live) or node.available(trio.current_time()):
                return node
        else:
            following = self._next(key, [])
            if following is not None:
                return following
        raise NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")

    def _next(self, key: str | None, tried: list[_Node]) -> _Node | None:
        """An eligible node not in `tried`: by the ring when `key` is given, else by
        weighted round robin; None when there is none."""
        now = trio.current_time()
        eligible = [node.available(now) and node not in tried for node in self._nodes]
        if key is None:
            index = self._round_robin.choose(eligible)
        else:
            index = self._ring.choose(key, eligible)
        return None if index is None else self._nodes[index]

    async def _request_when_connected(
        self, node: _Node, best: Connection | None, command: int, body: bytes, uid: int
    ) -> Frame:
        # Slow path of `request`: open connections up to `spec.connections` first.
        conn = await self._acquire(node, best)
        return await conn.request(command, body, uid)

    async def _acquire(self, node: _Node, best: Connection | None) -> Connection:
        while True:
            opening = len(node.live) + node.connecting < self.spec.connections
            ready = node.backoff.ready(trio.current_time())
            if best is not None:
                if opening and ready:
                    self._nursery.start_soon(self._connect_in_background, node)
                return best
            if opening:
                if not ready:
                    raise SendFailed(f"{node.name}: reconnect backoff, no connection open")
                return await self._connect(node)
            if not node.connecting:
                raise SendFailed(
                    f"{node.name}: every connection has {self._max_in_flight} requests in flight"
                )
            await node.changed.wait()
            best = node.pick()

    # ------------------------------------------------------------ connections

    async def _open_stream(self, node: _Node) -> trio.SocketStream:
        """A TCP stream to `node` within connect_timeout; a failure is counted.

        Raises SendFailed when the connect is refused, fails or times out.
        """
        try:
            with trio.move_on_after(self.spec.connect_timeout):
                stream = await trio.open_tcp_stream(node.address.host, node.address.port)
                node.backoff.succeeded()
                return stream
            problem = f"no connection within {self.spec.connect_timeout:g} s"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        node.backoff.failed(trio.current_time())
        self._failure(node)
        raise SendFailed(f"{node.name}: connect failed: {problem}")

    def _new_connection(
        self, node: _Node, stream: trio.SocketStream, pushes: trio.MemorySendChannel[Frame] | None
    ) -> Connection:
        return Connection(
            stream,
            self.layout,
            self._metrics,
            node=node.name,
            max_in_flight=self._max_in_flight,
            pushes=pushes,
        )

    async def _connect(self, node: _Node) -> Connection:
        """A new pooled connection to `node`, running in the pool's nursery."""
        # Counted from the connect until it is live, so concurrent requests never
        # open more than `connections`.
        node.connecting += 1
        try:
            stream = await self._open_stream(node)
            conn = self._new_connection(node, stream, None)
            await self._nursery.start(self._run_connection, node, conn)
        finally:
            node.connecting -= 1
            node.notify()
        return conn

    async def _connect_in_background(self, node: _Node) -> None:
        if not node.backoff.ready(trio.current_time()):
            return
        try:
            await self._connect(node)
        except SendFailed as exc:
            log.warning("upstream connect failed", extra={"node": node.name, "error": exc.message})

    async def _run_connection(
        self, node: _Node, conn: Connection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        node.live.append(conn)
        node.notify()
        try:
            await conn.run(task_status=task_status)
        finally:
            node.live.remove(conn)
            node.notify()
        if conn.broken:
            self._failure(node)

    # ------------------------------------------------------------ health

    def _failure(self, node: _Node) -> None:
        if node.health.record_failure():
            node.healthy_gauge.set(0)
            node.became_unhealthy.set()
            log.warning(
                "upstream node unhealthy",
                extra={"upstream": self.spec.name, "node": node.name},
            )

    def _probe_succeeded(self, node: _Node) -> None:
        if node.health.record_probe_success():
            node.healthy_gauge.set(1)
            node.became_unhealthy = trio.Event()
            log.info(
                "upstream node healthy again",
                extra={"upstream": self.spec.name, "node": node.name},
            )

    async def run_heartbeats(self, node: _Node) -> None:
        """Every interval, heartbeat the idle connections of `node` (see the module doc)."""
        heartbeat = self.spec.heartbeat
        assert heartbeat is not None
        window = min(heartbeat.interval, self.spec.timeout)
        while True:
            await trio.sleep(heartbeat.interval)
            now = trio.current_time()
            idle = [c for c in node.live if now - c.last_received >= heartbeat.interval]
            if not node.live and not node.connecting:
                try:
                    idle = [await self._connect(node)]
                except SendFailed:
                    continue  # counted as a failure by _open_stream
            if not idle:
                continue
            results: list[bool | None] = []
            async with trio.open_nursery() as nursery:
                for conn in idle:
                    nursery.start_soon(self._heartbeat, conn, heartbeat.command, window, results)
            if False in results:
                self._failure(node)
            elif results and all(results):
                self._probe_succeeded(node)

    async def _heartbeat(
        self, conn: Connection, command: int, window: float, results: list[bool | None]
    ) -> None:
        # True: answered; False: missed (the connection is closed); None: the
        # connection broke meanwhile, which _run_connection counts by itself.
        with trio.move_on_after(window):
            try:
                await conn.request(command, b"")
            except (UpstreamUnavailable, UpstreamProtocolError):
                results.append(None)
            else:
                results.append(True)
            return
        conn.close(ConnectionLost(f"{conn.node}: missed heartbeat"))
        results.append(False)

    async def run_probes(self, node: _Node) -> None:
        """Without a heartbeat: probe an unhealthy `node` by connecting, after backoff."""
        while True:
            await node.became_unhealthy.wait()
            while not node.health.healthy:
                now = trio.current_time()
                await trio.sleep(max(node.backoff.not_before - now, BACKOFF_BASE))
                try:
                    stream = await self._open_stream(node)
                except SendFailed:
                    continue  # counted as a failure; the backoff grew
                await trio.aclose_forcefully(stream)
                self._probe_succeeded(node)

    # ------------------------------------------------------------ sessions

    @asynccontextmanager
    async def open_session(
        self, *, key: str | None, push_buffer: int = 64
    ) -> AsyncIterator[Session]:
        """One dedicated new connection, closed when the context exits (SPEC 5).

        The node is the one consistent hashing gives `key` (whatever `balance` says),
        or the round-robin choice without a key; a failed connect moves on to another
        node up to `retries` times. Raises NoHealthyNode or UpstreamUnavailable when
        no connection can be opened.
        """
        tried: list[_Node] = []
        node = self._first(key)
        while True:
            try:
                stream = await self._open_stream(node)
                break
            except SendFailed:
                tried.append(node)
                following = None
                if len(tried) <= self.spec.retries:
                    following = self._next(key, tried)
                if following is None:
                    raise
                node = following
        send, receive = trio.open_memory_channel[Frame](push_buffer)
        conn = self._new_connection(node, stream, send)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_session_connection, node, conn)
            try:
                yield Session(self, node, conn, receive)
            finally:
                conn.close(SendFailed(f"{node.name}: the session ended"))

    async def _run_session_connection(
        self, node: _Node, conn: Connection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await conn.run(task_status=task_status)
        if conn.broken:
            self._failure(node)

    async def _counted(self, node: _Node, attempt: Awaitable[Frame]) -> Frame:
        """`attempt`'s frame, with its outcome counted on `node` (metrics, health)."""
        try:
            frame = await attempt
        except trio.Cancelled as exc:
            # A cancel scope's deadline (the caller's timeout) is a node timeout; any
            # other cancellation (shutdown, a client gone) says nothing about the node.
            if exc.source == "deadline":
                node.count_timeout()
                self._failure(node)
            raise
        except UpstreamUnavailable:
            node.count_unavailable()
            raise
        except UpstreamProtocolError:
            node.count_protocol_error()
            raise
        if frame.status:
            node.count_status()
        else:
            node.count_ok()
        node.health.record_answer()
        return frame


class Session:
    """A dedicated upstream connection for one WebSocket session.

    `pushes` yields the upstream-initiated frames. When the connection ends (the
    node closed or broke it), `pushes` ends (EndOfChannel, or the end of `async
    for`), `closed` is set and `error` says why: a ConnectionLost or
    UpstreamProtocolError (close the client with 1011, SPEC 5).
    """

    def __init__(
        self,
        pool: Pool,
        node: _Node,
        conn: Connection,
        pushes: trio.MemoryReceiveChannel[Frame],
    ) -> None:
        self._pool = pool
        self._node = node
        self._conn = conn
        self.node = node.name
        self.pushes = pushes
        self.closed = conn.closed

    @property
    def error(self) -> GatewayError | None:
        """Why the connection ended, or None while it is open."""
        return self._conn.error

    async def request(self, command: int, body: bytes, *, uid: int = 0) -> Frame:
        """Like `Pool.request` on this session's connection, without retries."""
        return await self._pool._counted(self._node, self._conn.request(command, body, uid))

    async def send_frame(self, frame: Frame) -> Frame:
        """Pass `frame` through with a fresh upstream seq; return the response, whose
        seq is the upstream one (the caller restores its own). Raises like `request`."""
        return await self._pool._counted(self._node, self._conn.send_frame(frame))


@asynccontextmanager
async def open_pool(
    spec: UpstreamSpec, layout: HeaderLayout, metrics: Metrics
) -> AsyncIterator[Pool]:
    """A running pool for `spec`; its connections and tasks end with the context."""
    async with trio.open_nursery() as nursery:
        pool = Pool(spec, layout, metrics, nursery)
        for node in pool._nodes:
            if spec.heartbeat is not None:
                nursery.start_soon(pool.run_heartbeats, node)
            else:
                nursery.start_soon(pool.run_probes, node)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()

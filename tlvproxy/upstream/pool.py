"""The pool of one upstream: node choice, pooled connections, retries, health
(docs/configuration.md "upstreams").

Owns: per node, up to `spec.connections` multiplexed connections (opened lazily,
reconnected with capped exponential backoff), health counting and its metrics, the
heartbeat or probe task, the retry policy, and dedicated WebSocket sessions.
Must not: set request deadlines (the caller wraps `request` in a cancel scope,
docs/reference.md "How a request flows"), decode bodies, or know about HTTP.

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
  A connect that fails because this process has no file descriptor left
  (EMFILE, ENFILE) is the gateway's trouble, not the node's: no failure, no
  backoff, and the request gets `OutOfDescriptors`, 503 `overloaded`
  (docs/operations.md "Connections and file descriptors").
- Heartbeat (when configured): every `interval`, each connection of the node that
  received nothing during the interval sends the heartbeat command with an empty
  body; a node without connections is connected first. A tick where a heartbeat got
  no answer within min(interval, timeout) is one failure (and that connection is
  closed); a tick where all answered is one probe success.
- Without a heartbeat, an unhealthy node is probed by a TCP connect after each
  backoff delay; `healthy_after` successful probes in a row make it healthy.
- Retries (docs/reference.md "Retries"): on another node, at most `retries`
  times, only after `SendFailed`, or after any upstream failure when the request
  is idempotent. A timeout is never retried: the caller's deadline has passed.
"""

from __future__ import annotations

import errno
import logging
import math
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import outcome
import trio

from tlvproxy.config.model import NodeSpec
from tlvproxy.errors import (
    GatewayError,
    NoHealthyNode,
    Overloaded,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tlvproxy.metrics import OUTCOMES
from tlvproxy.timer import DeadlineTimer
from tlvproxy.upstream.balance import HashRing, RoundRobin
from tlvproxy.upstream.connection import (
    Connection,
    ConnectionLost,
    PushReceiver,
    SendFailed,
    Waiter,
)
from tlvproxy.upstream.health import BACKOFF_BASE, Backoff, NodeHealth

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from tlvproxy.config.model import Address, UpstreamSpec
    from tlvproxy.framing import Frame, HeaderLayout
    from tlvproxy.metrics import Metrics

log = logging.getLogger("tlvproxy.upstream")

# How often one request may be put on a new connection of the same node after
# the one it was queued on went down before writing it.
_MAX_RESENDS: Final = 2
# How often a node that left the upstream is checked for its last answers.
_RETIRE_CHECK: Final = 0.05
# Discovered nodes whose first connection opens within this time of each other
# join in one batch: one rebuild of the balancers for all of them.
_JOIN_BATCH: Final = 0.01
# A connect failing with these failed here, for want of a file descriptor.
_LOCAL_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})


class OutOfDescriptors(Overloaded, SendFailed):
    """A connect failed for want of a file descriptor in this process: 503
    `overloaded` (a WebSocket session closes 1013), never counted against the
    node. A SendFailed: the request never left, so it may go elsewhere."""


def _out_of_descriptors(exc: OSError) -> bool:
    # trio.open_tcp_stream raises one OSError for all its attempts, caused by
    # the group of each attempt's own; socket() failing is one of those.
    if exc.errno in _LOCAL_ERRNOS:
        return True
    cause = exc.__cause__
    return isinstance(cause, BaseExceptionGroup) and any(
        isinstance(attempt, OSError) and attempt.errno in _LOCAL_ERRNOS
        for attempt in cause.exceptions
    )


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
        # Removed from the discovered set: no new request, no new connection
        # (docs/configuration.md "discovery").
        self.retired = False
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

    def count_answer(self, frame: Frame) -> None:
        """An answer, whatever its status: counted, and the failure streak ends."""
        if frame.status:
            self.count_status()
        else:
            self.count_ok()
        self.health.record_answer()

    def count_lost(self, error: GatewayError) -> None:
        """No answer, the connection having broken or gone (not a timeout)."""
        if isinstance(error, UpstreamProtocolError):
            self.count_protocol_error()
        else:
            self.count_unavailable()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def available(self, now: float) -> bool:
        return self.health.healthy and (bool(self.live) or self.backoff.ready(now))

    def open_count(self) -> int:
        """Live connections that are still open (not being torn down)."""
        return sum(1 for conn in self.live if conn.error is None)

    def pick(self) -> Connection | None:
        """The least-loaded usable connection, if it is idle or no other may be opened."""
        best: Connection | None = None
        best_load = 0
        # `usable` and `in_flight` spelled out: this runs once per request.
        for conn in self.live:
            load = len(conn._waiters)
            if conn.error is not None or load >= conn.max_in_flight:
                continue
            if load == 0:
                return conn
            if best is None or load < best_load:
                best, best_load = conn, load
        return best


class Completion(Protocol):
    """Who learns the outcome of `Pool.submit`; called once, and must not raise."""

    def on_reply(self, frame: Frame, node: str) -> None:
        """The response frame, and the node ("host:port") that answered."""

    def on_error(self, error: GatewayError, node: str | None) -> None:
        """Why there is no response, and the node last tried (None: none was)."""


class _TaskCompletion:
    """The completion of `Pool.request`: the task awaiting the reply."""

    __slots__ = ("result", "task")

    def __init__(self) -> None:
        # The task once it waits; until then an outcome is kept in `result`
        # (`submit` may settle before returning).
        self.task: trio.lowlevel.Task | None = None
        self.result: outcome.Outcome[Reply] | None = None

    def on_reply(self, frame: Frame, node: str) -> None:
        self._resume(outcome.Value(Reply(frame, node)))

    def on_error(self, error: GatewayError, node: str | None) -> None:
        self._resume(outcome.Error(error))

    def _resume(self, result: outcome.Outcome[Reply]) -> None:
        task = self.task
        if task is None:
            self.result = result
        else:
            self.task = None
            trio.lowlevel.reschedule(task, result)

    async def wait(self) -> Reply:
        if self.result is not None:
            await trio.lowlevel.checkpoint()
            return self.result.unwrap()
        self.task = trio.lowlevel.current_task()
        reply: Reply = await trio.lowlevel.wait_task_rescheduled(self._abort)
        return reply

    def _abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self.task = None  # an outcome after this is kept in `result`, unread
        return trio.lowlevel.Abort.SUCCEEDED


class _Settled:
    """The completion of a settled attempt: it hears nothing more."""

    def on_reply(self, frame: Frame, node: str) -> None:
        raise AssertionError("a settled attempt was answered")  # pragma: no cover

    def on_error(self, error: GatewayError, node: str | None) -> None:
        raise AssertionError("a settled attempt failed")  # pragma: no cover


_SETTLED: Final = _Settled()


class _Attempt:
    """One request of `Pool.submit` on its way: the connection's `Waiter`.

    It counts each outcome on its node (metrics, health) and applies the retry
    policy before its completion hears of it.
    """

    __slots__ = (
        "body",
        "command",
        "completion",
        "conn",
        "deadline",
        "idempotent",
        "key",
        "node",
        "pool",
        "resent",
        "seq",
        "settled",
        "tried",
        "uid",
    )

    def __init__(
        self,
        pool: Pool,
        completion: Completion,
        command: int,
        body: bytes,
        uid: int,
        key: str | None,
        idempotent: bool,
        deadline: float,
    ) -> None:
        self.pool = pool
        self.completion = completion
        self.command = command
        self.body = body
        self.uid = uid
        self.key = key
        self.idempotent = idempotent
        self.deadline = deadline
        self.node: _Node | None = None
        self.conn: Connection | None = None
        self.seq = 0
        self.tried: list[_Node] = []
        self.resent = 0
        self.settled = False

    def put_on(self, conn: Connection) -> None:
        """Submit to `conn` (a usable connection of `self.node`)."""
        try:
            self.seq = conn.submit(self, self.command, self.body, self.uid)
        except SendFailed as exc:
            self.failed(exc)
            return
        except GatewayError as exc:  # PayloadTooLarge, BadRequest: no node would take it
            self._settle(exc)
            return
        self.conn = conn

    def withdraw(self) -> None:
        """The caller gave up: free the seq, report nothing."""
        self.settled = True
        if self.conn is not None:
            self.conn.withdraw(self.seq, self)

    # The Waiter side: called by the connection.

    def on_response(self, frame: Frame) -> None:
        node = self.node
        assert node is not None  # set before the request was put on a connection
        node.count_answer(frame)
        self.settled = True
        completion = self.completion
        self._release()
        completion.on_reply(frame, node.name)

    def on_error(self, error: GatewayError) -> None:
        node = self.node
        assert node is not None
        self.conn = None
        node.count_lost(error)
        if isinstance(error, SendFailed) and node.retired:
            self.elsewhere()  # never written, and its node left: not a try
            return
        if isinstance(error, SendFailed) and self.resent < _MAX_RESENDS:
            # Never written: the connection went down under it. Another
            # connection of the same node takes it, a new one if need be
            # (docs/reference.md "When an upstream connection goes down").
            self.resent += 1
            self.pool._send(self, node)
            return
        self.failed(error)

    def on_timeout(self) -> None:
        self.conn = None
        self.timed_out()

    # Outcomes.

    def timed_out(self) -> None:
        """The deadline passed: a timeout of the node (health), never retried."""
        node = self.node
        if node is not None:
            self.pool._timed_out(node)
        self._settle(
            UpstreamTimeout(f"upstream {self.pool.spec.name!r}: no answer before the deadline")
        )

    def failed(self, error: GatewayError) -> None:
        """Retry on another node when the policy allows, else report (docs/reference.md
        "Retries")."""
        node = self.node
        assert node is not None
        tried = self.tried
        tried.append(node)
        following = None
        pool = self.pool
        if len(tried) <= pool.spec.retries and (isinstance(error, SendFailed) or self.idempotent):
            following = pool._next(self.key if pool._hash_requests else None, tried)
        if following is None:
            self._settle(error)
            return
        pool._send(self, following)

    def elsewhere(self) -> None:
        """Send again to another node: `self.node` left the upstream before
        the request was written (docs/configuration.md "discovery"). Not a
        try of the retry policy: nothing was sent."""
        pool = self.pool
        following = pool._next(self.key if pool._hash_requests else None, self.tried)
        if following is None:
            self._settle(NoHealthyNode(f"upstream {pool.spec.name!r}: no healthy node"))
            return
        pool._send(self, following)

    def _settle(self, error: GatewayError) -> None:
        if self.settled:
            return
        self.settled = True
        completion = self.completion
        self._release()
        completion.on_error(error, None if self.node is None else self.node.name)

    def _release(self) -> None:
        # Settled: a stale entry in a deadline heap may keep this attempt a
        # while; it must not keep the request and its answer (less garbage for
        # the collector to trace).
        self.completion = _SETTLED
        self.body = b""


class Pool:
    """Requests to one upstream. Build it with `open_pool`."""

    def __init__(
        self,
        spec: UpstreamSpec,
        layout: HeaderLayout,
        metrics: Metrics,
        nursery: trio.Nursery,
        timer: DeadlineTimer,
    ) -> None:
        if not spec.nodes and spec.discovery is None:
            raise ValueError(f"upstream {spec.name!r} has no nodes")
        self.spec = spec
        self.layout = layout
        self._metrics = metrics
        self._nursery = nursery
        self._timer = timer
        self._nodes: list[_Node] = []
        self._round_robin: RoundRobin | None = None
        self._ring: HashRing | None = None
        self._hash_requests = spec.balance == "consistent_hash"
        self._max_in_flight = spec.max_in_flight
        # Each node's heartbeat or probe task, to stop it when the node leaves.
        self._watchers: dict[_Node, trio.CancelScope] = {}
        # Discovered nodes connecting before they join (by address).
        self._joining: dict[Address, _Node] = {}
        self._joined = trio.Event()  # set while nothing is joining
        self._connected: list[_Node] = []  # joining, connected, to be admitted
        self._joined.set()
        self._set_members([_Node(node, spec, metrics) for node in spec.nodes])

    def _set_members(self, members: list[_Node]) -> None:
        """Make `members` the nodes requests go to; the balancers follow (the
        ring holds every member, healthy or not)."""
        self._nodes = members
        self._round_robin = self._ring = None
        if members:
            self._round_robin = RoundRobin([node.weight for node in members])
            # A consistent_hash upstream walks the ring on every request; any
            # other builds it only for a WebSocket session with a key (`_next`).
            if self._hash_requests:
                self._ring = HashRing([(node.name, node.weight) for node in members])

    # ------------------------------------------------------------ discovery

    def set_nodes(self, specs: Sequence[NodeSpec]) -> None:
        """Follow a new set of discovered nodes (docs/configuration.md "discovery").

        A new node joins once a connection to it is open; a node gone takes
        no new request at once, and its connections close when their
        requests are answered; a node whose weight changed keeps its
        connections and health. Nothing here fails a request."""
        wanted = {spec.address: spec for spec in specs}
        members: list[_Node] = []
        changed = False
        for node in self._nodes:
            spec = wanted.get(node.address)
            if spec is None:
                changed = True
                # At once: no request sent from now on may open a connection to it.
                node.retired = True
                self._nursery.start_soon(self._retire_node, node)
                continue
            if spec.weight != node.weight:
                node.weight = spec.weight
                changed = True
            members.append(node)
        for address, node in list(self._joining.items()):
            if address not in wanted:
                del self._joining[address]
                node.retired = True
                self._nursery.start_soon(self._retire_node, node)
        present = {node.address for node in members} | set(self._joining)
        for address, spec in wanted.items():
            if address not in present:
                node = _Node(spec, self.spec, self._metrics)
                self._joining[address] = node
                self._joined = trio.Event()
                self._nursery.start_soon(self._join, node)
        if not self._joining:
            self._joined.set()
        if changed:
            self._set_members(members)

    def node_specs(self) -> tuple[NodeSpec, ...]:
        """The nodes followed: the members and those still joining."""
        found = [NodeSpec(address=node.address, weight=node.weight) for node in self._nodes]
        found += [
            NodeSpec(address=node.address, weight=node.weight) for node in self._joining.values()
        ]
        return tuple(found)

    async def wait_joined(self) -> None:
        """Wait until every node being discovered has joined (or left)."""
        await self._joined.wait()

    async def _join(self, node: _Node) -> None:
        """Connect to `node` until it works, then make it a member; the
        reconnect backoff paces the attempts."""
        while self._joining.get(node.address) is node:
            try:
                await self._connect(node)
            except SendFailed as exc:
                log.warning(
                    "a discovered node cannot be reached yet",
                    extra={"upstream": self.spec.name, "node": node.name, "error": exc.message},
                )
                await trio.sleep(max(node.backoff.not_before - trio.current_time(), BACKOFF_BASE))
                continue
            if self._joining.get(node.address) is not node:
                return  # left meanwhile: _retire_node closes what was opened
            # Nodes that connect together join together: the balancers (a
            # ring may be large) are rebuilt once for the batch.
            self._connected.append(node)
            if len(self._connected) == 1:
                self._nursery.start_soon(self._admit_connected)
            return

    async def _admit_connected(self) -> None:
        """Make the nodes connected in the last _JOIN_BATCH members, at once."""
        await trio.sleep(_JOIN_BATCH)
        connected, self._connected = self._connected, []
        joined = []
        for node in connected:
            if self._joining.get(node.address) is node:  # else it left meanwhile
                del self._joining[node.address]
                joined.append(node)
        if joined:
            self._set_members([*self._nodes, *joined])
        if not self._joining:
            self._joined.set()
        for node in joined:
            self._nursery.start_soon(self._watch_health, node)
            log.info("node joined", extra={"upstream": self.spec.name, "node": node.name})

    async def _retire_node(self, node: _Node) -> None:
        """Close `node`'s connections as their requests are answered: each
        once it has none in flight, or once the latest deadline of those it
        carries has passed (a command's own `timeout` may be longer than the
        upstream's; requests without a deadline get the upstream's)."""
        watcher = self._watchers.pop(node, None)
        if watcher is not None:
            watcher.cancel()
        log.info("node left", extra={"upstream": self.spec.name, "node": node.name})
        at_least = trio.current_time() + self.spec.timeout + 1
        gone = SendFailed(f"{node.name}: the node left the upstream")
        while node.live or node.connecting:
            now = trio.current_time()
            for conn in list(node.live):
                if not conn.in_flight or now >= max(at_least, conn.last_deadline + 1):
                    conn.close(gone)
            # A node that left is checked on a short period until its last
            # requests are answered: rare, and bounded by the timeout.
            await trio.sleep(_RETIRE_CHECK)
        back = node.address in self._joining or any(n.address == node.address for n in self._nodes)
        if not back:  # registered again meanwhile: the gauge is the new node's
            # Zero first: with workers, the summed metrics keep a removed sample.
            node.healthy_gauge.set(0)
            self._metrics.upstream_node_healthy.remove(self.spec.name, node.name)
            # Its request counts go too: under discovery, addresses come and go,
            # and their series would pile up (docs/operations.md "Discovery").
            for outcome in OUTCOMES:
                self._metrics.upstream_requests.remove(self.spec.name, node.name, outcome)

    async def _watch_health(self, node: _Node) -> None:
        """Run `node`'s heartbeats (or its probes) until it leaves."""
        if node.retired:
            return  # it left before this task started
        with trio.CancelScope() as scope:
            self._watchers[node] = scope
            if self.spec.heartbeat is not None:
                await self.run_heartbeats(node)
            else:
                await self.run_probes(node)

    # ------------------------------------------------------------ requests

    def submit(
        self,
        completion: Completion,
        command: int,
        body: bytes,
        *,
        uid: int = 0,
        key: str | None = None,
        idempotent: bool = False,
        deadline: float = math.inf,
    ) -> None:
        """Send one request to a node of this upstream; `completion` gets the
        outcome, exactly once, possibly before this returns.

        Its `on_reply` gets the response frame; its `on_error` gets
        UpstreamTimeout (`deadline` passed), NoHealthyNode, UpstreamUnavailable
        (SendFailed: never sent; ConnectionLost: lost before the response),
        UpstreamProtocolError, or PayloadTooLarge / BadRequest when the request
        does not fit a frame.
        """
        attempt = _Attempt(self, completion, command, body, uid, key, idempotent, deadline)
        node = self._first(key if self._hash_requests else None)
        if node is None:
            error = NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")
            completion.on_error(error, None)
            return
        self._send(attempt, node)

    async def request(
        self,
        command: int,
        body: bytes,
        *,
        uid: int = 0,
        key: str | None = None,
        idempotent: bool = False,
    ) -> Reply:
        """`submit`, awaited: the reply, or the error raised.

        No timeout: the caller's cancel scope owns the time; a cancellation at
        its deadline counts as a timeout of the node, and frees the request's seq.
        """
        completion = _TaskCompletion()
        deadline = trio.current_effective_deadline()
        attempt = _Attempt(self, completion, command, body, uid, key, idempotent, math.inf)
        node = self._first(key if self._hash_requests else None)
        if node is None:
            raise NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")
        self._send(attempt, node)
        try:
            return await completion.wait()
        except trio.Cancelled:
            if not attempt.settled and trio.current_time() >= deadline:
                attempt.timed_out()
            raise
        finally:
            attempt.withdraw()

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

    def _first(self, key: str | None) -> _Node | None:
        """The node for a first attempt; None when none is eligible."""
        nodes = self._nodes
        if not nodes:
            return None
        if len(nodes) == 1:
            node = nodes[0]
            if (node.health.healthy and node.live) or node.available(trio.current_time()):
                return node
            return None
        return self._next(key, [])

    def _next(self, key: str | None, tried: list[_Node]) -> _Node | None:
        """An eligible node not in `tried`: by the ring when `key` is given, else by
        weighted round robin; None when there is none."""
        nodes, round_robin, ring = self._nodes, self._round_robin, self._ring
        if round_robin is None:
            return None
        if key is not None and ring is None:
            ring = self._ring = HashRing([(node.name, node.weight) for node in nodes])
        now = trio.current_time()
        eligible = [node.available(now) and node not in tried for node in nodes]
        if key is None or ring is None:
            index = round_robin.choose(eligible)
        else:
            index = ring.choose(key, eligible)
        return None if index is None else nodes[index]

    def _send(self, attempt: _Attempt, node: _Node) -> None:
        """Put `attempt` on a connection of `node`, opening one when needed."""
        attempt.node = node
        conn = node.pick()
        if conn is None or (conn.in_flight and len(node.live) < self.spec.connections):
            # Only the connections still open count (docs/reference.md "When an
            # upstream connection goes down"): one being torn down after an error
            # must not stop a new one from opening.
            opening = node.open_count() + node.connecting < self.spec.connections
            if opening and node.backoff.ready(trio.current_time()):
                if conn is None:
                    self._nursery.start_soon(self._send_when_connected, attempt, node)
                    return
                # Counted now, not when the task runs: every request of this
                # pass would otherwise start a connect of its own.
                node.connecting += 1
                self._nursery.start_soon(self._connect_in_background, node)
            elif conn is None:
                if node.connecting:
                    self._nursery.start_soon(self._send_when_connected, attempt, node)
                    return
                if opening:
                    problem = f"{node.name}: reconnect backoff, no connection open"
                else:
                    problem = (
                        f"{node.name}: every connection has {self._max_in_flight} "
                        "requests in flight"
                    )
                attempt.failed(SendFailed(problem))
                return
        attempt.put_on(conn)

    async def _send_when_connected(self, attempt: _Attempt, node: _Node) -> None:
        # The slow path of `_send`: wait for a connection of `node` (its own
        # connect, or one under way), within the request's deadline.
        with trio.move_on_at(attempt.deadline):
            try:
                conn = await self._acquire(node)
            except SendFailed as exc:
                if node.retired:
                    attempt.elsewhere()  # it left while the request waited for it
                else:
                    attempt.failed(exc)
                return
            if not attempt.settled:
                attempt.put_on(conn)
            return
        attempt.timed_out()

    async def _acquire(self, node: _Node) -> Connection:
        while True:
            if node.retired:
                raise SendFailed(f"{node.name}: the node left the upstream")
            conn = node.pick()
            if conn is not None:
                return conn
            if node.open_count() + node.connecting < self.spec.connections:
                if not node.backoff.ready(trio.current_time()):
                    raise SendFailed(f"{node.name}: reconnect backoff, no connection open")
                return await self._connect(node)
            if not node.connecting:
                raise SendFailed(
                    f"{node.name}: every connection has {self._max_in_flight} requests in flight"
                )
            await node.changed.wait()

    # ------------------------------------------------------------ connections

    async def _open_stream(self, node: _Node) -> trio.SocketStream:
        """A TCP stream to `node` within connect_timeout; a failure is counted.

        Raises SendFailed when the connect is refused, fails or times out;
        OutOfDescriptors, not counted, when this process has no descriptor left.
        """
        try:
            with trio.move_on_after(self.spec.connect_timeout):
                stream = await trio.open_tcp_stream(node.address.host, node.address.port)
                node.backoff.succeeded()
                return stream
            problem = f"no connection within {self.spec.connect_timeout:g} s"
        except OSError as exc:
            if _out_of_descriptors(exc):
                raise OutOfDescriptors(
                    f"upstream {self.spec.name!r}: the gateway has no file descriptor "
                    f"left to connect to {node.name}; try again later"
                ) from None
            problem = exc.strerror or str(exc)
        node.backoff.failed(trio.current_time())
        self._failure(node)
        raise SendFailed(f"{node.name}: connect failed: {problem}")

    def _new_connection(
        self, node: _Node, stream: trio.SocketStream, receiver: PushReceiver | None
    ) -> Connection:
        return Connection(
            stream,
            self.layout,
            self._metrics,
            node=node.name,
            max_in_flight=self._max_in_flight,
            receiver=receiver,
            timer=self._timer,
        )

    async def _connect(self, node: _Node, *, counted: bool = False) -> Connection:
        """A new pooled connection to `node`, running in the pool's nursery;
        `counted` when the caller has already counted it in `node.connecting`."""
        # Counted from the decision to connect until it is live, so concurrent
        # requests never open more than `connections`.
        if not counted:
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
        # `_send` counted this connect in `node.connecting` and checked the backoff.
        try:
            await self._connect(node, counted=True)
        except OutOfDescriptors as exc:
            # Not the node's doing, and possibly once per request while it
            # lasts: the requests' 503 answers tell it, not a line each here.
            log.debug("upstream connect failed", extra={"node": node.name, "error": exc.message})
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
                    continue  # counted by _open_stream, unless out of descriptors
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
        self, *, key: str | None, receiver: PushReceiver
    ) -> AsyncIterator[Session]:
        """One dedicated new connection, closed when the context exits (docs/websocket.md
        "Sessions").

        The node is the one consistent hashing gives `key` (whatever `balance` says),
        or the round-robin choice without a key; a failed connect moves on to another
        node up to `retries` times. Raises NoHealthyNode or UpstreamUnavailable when
        no connection can be opened.

        Pushes go to `receiver`, from the connection's reader, and so does the
        news of the connection's end.
        """
        tried: list[_Node] = []
        node = self._first(key)
        if node is None:
            raise NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")
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
        conn = self._new_connection(node, stream, receiver)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_session_connection, node, conn)
            session = Session(self, node, conn, nursery=nursery)
            try:
                yield session
            finally:
                session._ended = True
                conn.close(SendFailed(f"{node.name}: the session ended"))

    async def _run_session_connection(
        self, node: _Node, conn: Connection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await conn.run(task_status=task_status)
        if conn.broken:
            self._failure(node)

    def _timed_out(self, node: _Node) -> None:
        # A request's deadline passed: counted, and a failure of the node.
        node.count_timeout()
        self._failure(node)


class Session:
    """A dedicated upstream connection for one WebSocket session.

    Upstream-initiated frames go to the session's `PushReceiver`. When the
    connection ends (the node closed or broke it), the receiver's `on_end` is
    called, `closed` is set and `error` says why: a ConnectionLost or
    UpstreamProtocolError (close the client with 1011, docs/websocket.md "Close codes").
    """

    __slots__ = ("_conn", "_ended", "_node", "_nursery", "_pool", "closed", "node")

    def __init__(
        self,
        pool: Pool,
        node: _Node,
        conn: Connection,
        *,
        nursery: trio.Nursery,
    ) -> None:
        self._pool = pool
        self._node = node
        self._conn = conn
        self._nursery = nursery
        self.node = node.name
        self.closed = conn.closed
        self._ended = False  # the session closed the connection: nothing to count

    def start_soon(self, async_fn: Callable[[], Awaitable[object]]) -> None:
        """Start a task of the session's own in the nursery its connection runs
        in: the session's context waits for it to end on exit, after closing
        the connection. (A nursery of the caller's would cost each session one.)"""
        self._nursery.start_soon(async_fn)

    def submit(self, waiter: Waiter, command: int, body: bytes, *, uid: int = 0) -> int:
        """Queue one request on this session's connection, without retries; its
        seq. `waiter` hears the outcome (`Connection.submit`) after it is counted
        on the node, as pooled requests are counted. Raises like `Connection.submit`."""
        return self._conn.submit(_SessionCall(self, waiter), command, body, uid)

    def submit_frame(self, waiter: Waiter, frame: Frame) -> int:
        """`submit` for a frame passed through with a fresh upstream seq (the one
        returned, which the response carries)."""
        return self._conn.submit_frame(_SessionCall(self, waiter), frame)

    @property
    def error(self) -> GatewayError | None:
        """Why the connection ended, or None while it is open."""
        return self._conn.error


class _SessionCall:
    """A session request's `Waiter` on the connection: it counts the outcome on
    the node (metrics, health), as a pooled request's is, then tells `waiter`."""

    __slots__ = ("deadline", "session", "waiter")

    def __init__(self, session: Session, waiter: Waiter) -> None:
        self.session = session
        self.waiter = waiter
        self.deadline = waiter.deadline

    def on_response(self, frame: Frame) -> None:
        self.session._node.count_answer(frame)
        self.waiter.on_response(frame)

    def on_error(self, error: GatewayError) -> None:
        session = self.session
        # The session's own close says nothing about the node.
        if not session._ended:
            session._node.count_lost(error)
        self.waiter.on_error(error)

    def on_timeout(self) -> None:
        session = self.session
        session._pool._timed_out(session._node)
        self.waiter.on_timeout()


@asynccontextmanager
async def open_pool(
    spec: UpstreamSpec,
    layout: HeaderLayout,
    metrics: Metrics,
    timer: DeadlineTimer | None = None,
) -> AsyncIterator[Pool]:
    """A running pool for `spec`; its connections and tasks end with the context.

    Request deadlines fire from `timer` (a running `DeadlineTimer`, shared by a
    worker's pools), or from a timer of the pool's own.
    """
    async with trio.open_nursery() as nursery:
        if timer is None:
            timer = DeadlineTimer()
            await nursery.start(timer.run)
        pool = Pool(spec, layout, metrics, nursery, timer)
        for node in pool._nodes:
            nursery.start_soon(pool._watch_health, node)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()

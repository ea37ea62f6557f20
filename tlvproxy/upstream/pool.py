"""The pool of one upstream: node choice, pooled connections, retries, health
(docs/configuration.md "upstreams").

Owns: the nodes requests go to (discovery joins and retirements, the balancers),
per node up to `spec.connections` multiplexed connections (opened lazily,
reconnected with capped exponential backoff), sending a request and sending it
again, and opening dedicated session connections. Beside it: node.py (one
node's state and health), attempt.py (a request on its way, the retry policy),
watch.py (heartbeats and probes), session.py (a session's connection).
Must not: choose request deadlines (the caller passes `submit` one, which the
connection keeps in its deadline heap and the worker's DeadlineTimer fires;
`request` takes the caller's cancel scope's: docs/reference.md "Timeouts"),
decode bodies, or know about HTTP.

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
- Failures (health.py): a failed connect, a timeout (the request's deadline
  passed), a connection broken by the node (reset, EOF with requests in
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
- A closed pool (its `open_pool` context ended: a reload retired it, or the
  worker stops) sends nothing: a request submitted to it, or retried on it,
  fails at once with UpstreamUnavailable, through its completion like any
  other outcome (docs/operations.md "Reload").
"""

from __future__ import annotations

import errno
import logging
import math
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from tlvproxy.config.model import NodeSpec
from tlvproxy.errors import NoHealthyNode, Overloaded, UpstreamUnavailable
from tlvproxy.metrics import OUTCOMES
from tlvproxy.timer import DeadlineTimer
from tlvproxy.upstream.attempt import Attempt, Completion, Reply, TaskCompletion
from tlvproxy.upstream.balance import HashRing, RoundRobin
from tlvproxy.upstream.connection import Connection, PushReceiver, Sender, SendFailed
from tlvproxy.upstream.health import BACKOFF_BASE
from tlvproxy.upstream.node import Node, NodeState
from tlvproxy.upstream.session import Session
from tlvproxy.upstream.watch import run_heartbeats, run_probes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from tlvproxy.config.model import Address, UpstreamSpec
    from tlvproxy.framing import HeaderLayout
    from tlvproxy.metrics import Metrics

__all__ = ["Completion", "NodeState", "OutOfDescriptors", "Pool", "Reply", "Session", "open_pool"]

log = logging.getLogger("tlvproxy.upstream")

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


class Pool:
    """Requests to one upstream. Build it with `open_pool`."""

    def __init__(
        self,
        spec: UpstreamSpec,
        layout: HeaderLayout,
        metrics: Metrics,
        nursery: trio.Nursery,
        timer: DeadlineTimer,
        sender: Sender,
    ) -> None:
        if not spec.nodes and spec.discovery is None:
            raise ValueError(f"upstream {spec.name!r} has no nodes")
        self.spec = spec
        self.layout = layout
        self._metrics = metrics
        self._nursery = nursery
        self._timer = timer
        self._sender = sender
        self._nodes: list[Node] = []
        self._round_robin: RoundRobin | None = None
        self._ring: HashRing | None = None
        self.hash_requests = spec.balance == "consistent_hash"
        self._max_in_flight = spec.max_in_flight
        # Each node's heartbeat or probe task, to stop it when the node leaves.
        self._watchers: dict[Node, trio.CancelScope] = {}
        # Discovered nodes connecting before they join (by address).
        self._joining: dict[Address, Node] = {}
        self._joined = trio.Event()  # set while nothing is joining
        self._connected: list[Node] = []  # joining, connected, to be admitted
        self._joined.set()
        self.closed = False  # set when `open_pool`'s context ends: nothing more is sent
        self._set_members([Node(node, spec, metrics) for node in spec.nodes])

    def _set_members(self, members: list[Node]) -> None:
        """Make `members` the nodes requests go to; the balancers follow (the
        ring holds every member, healthy or not)."""
        self._nodes = members
        self._round_robin = self._ring = None
        if members:
            self._round_robin = RoundRobin([node.weight for node in members])
            # A consistent_hash upstream walks the ring on every request; any
            # other builds it only for a WebSocket session with a key (`_next`).
            if self.hash_requests:
                self._ring = HashRing([(node.name, node.weight) for node in members])

    # ------------------------------------------------------------ discovery

    def set_nodes(self, specs: Sequence[NodeSpec]) -> None:
        """Follow a new set of discovered nodes (docs/configuration.md "discovery").

        A new node joins once a connection to it is open; a node gone takes
        no new request at once, and its connections close when their
        requests are answered; a node whose weight changed keeps its
        connections and health. Nothing here fails a request."""
        wanted = {spec.address: spec for spec in specs}
        members: list[Node] = []
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
                node = Node(spec, self.spec, self._metrics)
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

    async def _join(self, node: Node) -> None:
        """Connect to `node` until it works, then make it a member; the
        reconnect backoff paces the attempts."""
        while self._joining.get(node.address) is node:
            try:
                await self.connect(node)
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

    async def _retire_node(self, node: Node) -> None:
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

    async def _watch_health(self, node: Node) -> None:
        """Run `node`'s heartbeats (or its probes) until it leaves."""
        if node.retired:
            return  # it left before this task started
        with trio.CancelScope() as scope:
            self._watchers[node] = scope
            if self.spec.heartbeat is not None:
                await run_heartbeats(self, node)
            else:
                await run_probes(self, node)

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
        (SendFailed: never sent; ConnectionLost: lost before the response; the
        pool is closed), UpstreamProtocolError, or PayloadTooLarge / BadRequest
        when the request does not fit a frame. Never raises.
        """
        attempt = Attempt(self, completion, command, body, uid, key, idempotent, deadline)
        node = self._first(key if self.hash_requests else None)
        if node is None:
            error = NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")
            completion.on_error(error, None)
            return
        self.send(attempt, node)

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
        completion = TaskCompletion()
        deadline = trio.current_effective_deadline()
        attempt = Attempt(self, completion, command, body, uid, key, idempotent, math.inf)
        node = self._first(key if self.hash_requests else None)
        if node is None:
            raise NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")
        self.send(attempt, node)
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

    def _first(self, key: str | None) -> Node | None:
        """The node for a first attempt; None when none is eligible."""
        nodes = self._nodes
        if not nodes:
            return None
        if len(nodes) == 1:
            node = nodes[0]
            if (node.health.healthy and node.live) or node.available(trio.current_time()):
                return node
            return None
        return self.next_node(key, [])

    def next_node(self, key: str | None, tried: list[Node]) -> Node | None:
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

    def send(self, attempt: Attempt, node: Node) -> None:
        """Put `attempt` on a connection of `node`, opening one when needed."""
        attempt.node = node
        if self.closed:
            # Its nursery takes no task, and its connections are gone: a
            # session that kept a retired pool's table ends up here
            # (docs/operations.md "Reload").
            attempt.abandon(UpstreamUnavailable(f"upstream {self.spec.name!r}: the pool is closed"))
            return
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

    async def _send_when_connected(self, attempt: Attempt, node: Node) -> None:
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

    async def _acquire(self, node: Node) -> Connection:
        while True:
            if node.retired:
                raise SendFailed(f"{node.name}: the node left the upstream")
            conn = node.pick()
            if conn is not None:
                return conn
            if node.open_count() + node.connecting < self.spec.connections:
                if not node.backoff.ready(trio.current_time()):
                    raise SendFailed(f"{node.name}: reconnect backoff, no connection open")
                return await self.connect(node)
            if not node.connecting:
                raise SendFailed(
                    f"{node.name}: every connection has {self._max_in_flight} requests in flight"
                )
            await node.changed.wait()

    # ------------------------------------------------------------ connections

    async def open_stream(self, node: Node) -> trio.SocketStream:
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
        node.failed()
        raise SendFailed(f"{node.name}: connect failed: {problem}")

    def _new_connection(
        self, node: Node, stream: trio.SocketStream, receiver: PushReceiver | None
    ) -> Connection:
        return Connection(
            stream,
            self.layout,
            self._metrics,
            node=node.name,
            max_in_flight=self._max_in_flight,
            receiver=receiver,
            timer=self._timer,
            sender=self._sender,
            after_read=node.publish_counts,
        )

    async def connect(self, node: Node, *, counted: bool = False) -> Connection:
        """A new pooled connection to `node`, running in the pool's nursery;
        `counted` when the caller has already counted it in `node.connecting`."""
        # Counted from the decision to connect until it is live, so concurrent
        # requests never open more than `connections`.
        if not counted:
            node.connecting += 1
        try:
            stream = await self.open_stream(node)
            conn = self._new_connection(node, stream, None)
            await self._nursery.start(self._run_connection, node, conn)
        finally:
            node.connecting -= 1
            node.notify()
        return conn

    async def _connect_in_background(self, node: Node) -> None:
        # `_send` counted this connect in `node.connecting` and checked the backoff.
        try:
            await self.connect(node, counted=True)
        except OutOfDescriptors as exc:
            # Not the node's doing, and possibly once per request while it
            # lasts: the requests' 503 answers tell it, not a line each here.
            log.debug("upstream connect failed", extra={"node": node.name, "error": exc.message})
        except SendFailed as exc:
            log.warning("upstream connect failed", extra={"node": node.name, "error": exc.message})

    async def _run_connection(
        self, node: Node, conn: Connection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        node.live.append(conn)
        node.notify()
        try:
            await conn.run(task_status=task_status)
        finally:
            node.live.remove(conn)
            node.notify()
        if conn.broken:
            node.failed()

    # ------------------------------------------------------------ health

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
        tried: list[Node] = []
        node = self._first(key)
        if node is None:
            raise NoHealthyNode(f"upstream {self.spec.name!r}: no healthy node")
        while True:
            try:
                stream = await self.open_stream(node)
                break
            except SendFailed:
                tried.append(node)
                following = None
                if len(tried) <= self.spec.retries:
                    following = self.next_node(key, tried)
                if following is None:
                    raise
                node = following
        conn = self._new_connection(node, stream, receiver)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._run_session_connection, node, conn)
            session = Session(node, conn, nursery=nursery, timed_out=self.timed_out)
            try:
                yield session
            finally:
                session._ended = True
                conn.close(SendFailed(f"{node.name}: the session ended"))

    def timed_out(self, node: Node) -> None:
        # A request's deadline passed: counted, and a failure of the node.
        node.count_timeout()
        node.failed()

    async def _run_session_connection(
        self, node: Node, conn: Connection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await conn.run(task_status=task_status)
        if conn.broken:
            node.failed()


@asynccontextmanager
async def open_pool(
    spec: UpstreamSpec,
    layout: HeaderLayout,
    metrics: Metrics,
    timer: DeadlineTimer | None = None,
    sender: Sender | None = None,
) -> AsyncIterator[Pool]:
    """A running pool for `spec`; its connections and tasks end with the context.

    Request deadlines fire from `timer` (a running `DeadlineTimer`, shared by a
    worker's pools), or from a timer of the pool's own; queued frames leave
    from `sender` (a running `Sender`, the worker's), or from one of the pool's
    own. A session's connection outlives the pool only with the worker's: it
    needs both after the pool closes (a reload retires it).
    """
    async with trio.open_nursery() as nursery:
        if timer is None:
            timer = DeadlineTimer()
            await nursery.start(timer.run)
        if sender is None:
            sender = Sender()
            await nursery.start(sender.run)
        pool = Pool(spec, layout, metrics, nursery, timer, sender)
        for node in pool._nodes:
            nursery.start_soon(pool._watch_health, node)
        try:
            yield pool
        finally:
            # Before the cancel: a request failed by a closing connection must
            # not be sent again on a nursery that no longer runs its tasks.
            pool.closed = True
            nursery.cancel_scope.cancel()

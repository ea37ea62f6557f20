"""One node of an upstream as its pool sees it: connections, health, counts.

Owns: `Node` (the node's live connections, connects under way, backoff,
health and its transitions, the metrics series of its answers), `NodeState`
(what `/admin/config` shows of it).
Must not: open connections or choose nodes: the pool does (pool.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from tlvproxy.errors import UpstreamProtocolError
from tlvproxy.upstream.health import Backoff, NodeHealth

if TYPE_CHECKING:
    from tlvproxy.config.model import NodeSpec, UpstreamSpec
    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.upstream.connection import Connection

log = logging.getLogger("tlvproxy.upstream")


@attrs.frozen(slots=True, kw_only=True)
class NodeState:
    """One node as `/admin/config` shows it."""

    address: str
    weight: int
    healthy: bool
    in_flight: int
    connections: int
    consecutive_failures: int


class Node:
    """One node's mutable state; owned by its pool."""

    def __init__(self, spec: NodeSpec, upstream: UpstreamSpec, metrics: Metrics) -> None:
        self.upstream = upstream.name
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
        # Answers not yet in the metric (`count_answer`).
        self.answered_ok = 0
        self.answered_status = 0
        self.count_ok = outcomes.labels(upstream.name, self.name, "ok").inc
        self.count_status = outcomes.labels(upstream.name, self.name, "status").inc
        self.count_timeout = outcomes.labels(upstream.name, self.name, "timeout").inc
        self.count_unavailable = outcomes.labels(upstream.name, self.name, "unavailable").inc
        self.count_protocol_error = outcomes.labels(upstream.name, self.name, "protocol_error").inc
        self.healthy_gauge = metrics.upstream_node_healthy.labels(upstream.name, self.name)
        self.healthy_gauge.set(1)

    def count_answer(self, frame: Frame) -> None:
        """An answer, whatever its status: counted, and the failure streak ends.

        Counted in plain ints, added to the metric by `publish_counts` when
        the connection's read that brought it is dispatched: with several
        workers each `inc` is a locked write to the worker's metrics file,
        one per read rather than one per answer."""
        if frame.status:
            self.answered_status += 1
        else:
            self.answered_ok += 1
        self.health.record_answer()

    def publish_counts(self) -> None:
        """Add the answers counted since the last call to the metric."""
        if self.answered_ok:
            self.count_ok(self.answered_ok)
            self.answered_ok = 0
        if self.answered_status:
            self.count_status(self.answered_status)
            self.answered_status = 0

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

    def failed(self) -> None:
        """A failure of the node (health.py): counted; at `unhealthy_after` in a
        row it turns unhealthy."""
        node = self
        if node.health.record_failure():
            node.healthy_gauge.set(0)
            node.became_unhealthy.set()
            log.warning(
                "upstream node unhealthy",
                extra={"upstream": node.upstream, "node": node.name},
            )

    def probe_succeeded(self) -> None:
        """A heartbeat answered or a probe connected: at `healthy_after` in a
        row an unhealthy node is healthy again."""
        node = self
        if node.health.record_probe_success():
            node.healthy_gauge.set(1)
            node.became_unhealthy = trio.Event()
            log.info(
                "upstream node healthy again",
                extra={"upstream": node.upstream, "node": node.name},
            )

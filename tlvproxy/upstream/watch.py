"""A node's health tasks: heartbeats, or probes of an unhealthy node
(docs/configuration.md "upstreams", health).

Owns: `run_heartbeats` (every interval, the idle connections of a node send
the heartbeat command; a miss is a failure, all answered a probe success) and
`run_probes` (without a heartbeat: an unhealthy node is probed by a TCP
connect after each backoff delay).
Must not: choose nodes for requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from tlvproxy.errors import UpstreamProtocolError, UpstreamUnavailable
from tlvproxy.upstream.connection import ConnectionLost, SendFailed
from tlvproxy.upstream.health import BACKOFF_BASE

if TYPE_CHECKING:
    from tlvproxy.config.model import UpstreamSpec
    from tlvproxy.upstream.connection import Connection
    from tlvproxy.upstream.node import Node


class Connector(Protocol):
    """What the health tasks need of their pool."""

    spec: UpstreamSpec

    async def connect(self, node: Node) -> Connection:
        """A new pooled connection to `node`; raises SendFailed."""

    async def open_stream(self, node: Node) -> trio.SocketStream:
        """A TCP stream to `node`, a failure counted; raises SendFailed."""


async def run_heartbeats(pool: Connector, node: Node) -> None:
    """Every interval, heartbeat the idle connections of `node` (see the module doc)."""
    heartbeat = pool.spec.heartbeat
    assert heartbeat is not None
    window = min(heartbeat.interval, pool.spec.timeout)
    while True:
        await trio.sleep(heartbeat.interval)
        now = trio.current_time()
        idle = [c for c in node.live if now - c.last_received >= heartbeat.interval]
        if not node.live and not node.connecting:
            try:
                idle = [await pool.connect(node)]
            except SendFailed:
                continue  # counted by _open_stream, unless out of descriptors
        if not idle:
            continue
        results: list[bool | None] = []
        async with trio.open_nursery() as nursery:
            for conn in idle:
                nursery.start_soon(_heartbeat, conn, heartbeat.command, window, results)
        if False in results:
            node.failed()
        elif results and all(results):
            node.probe_succeeded()


async def _heartbeat(
    conn: Connection, command: int, window: float, results: list[bool | None]
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


async def run_probes(pool: Connector, node: Node) -> None:
    """Without a heartbeat: probe an unhealthy `node` by connecting, after backoff."""
    while True:
        await node.became_unhealthy.wait()
        while not node.health.healthy:
            now = trio.current_time()
            await trio.sleep(max(node.backoff.not_before - now, BACKOFF_BASE))
            try:
                stream = await pool.open_stream(node)
            except SendFailed:
                continue  # counted as a failure; the backoff grew
            await trio.aclose_forcefully(stream)
            node.probe_succeeded()

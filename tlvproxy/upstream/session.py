"""A dedicated upstream connection for one client session (docs/websocket.md
"Sessions").

Owns: `Session`, which queues a session's requests on its own connection
without retries, and counts their outcomes on the node as pooled requests
are counted. `Pool.open_session` opens one.
Must not: choose the node or open the connection: the pool does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import trio

    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame
    from tlvproxy.upstream.connection import Connection, Waiter
    from tlvproxy.upstream.node import Node


class Session:
    """A dedicated upstream connection for one WebSocket session.

    Upstream-initiated frames go to the session's `PushReceiver`. When the
    connection ends (the node closed or broke it), the receiver's `on_end` is
    called, `closed` is set and `error` says why: a ConnectionLost or
    UpstreamProtocolError (close the client with 1011, docs/websocket.md "Close codes").
    """

    __slots__ = ("_conn", "_ended", "_node", "_nursery", "_timed_out", "closed", "node")

    def __init__(
        self,
        node: Node,
        conn: Connection,
        *,
        nursery: trio.Nursery,
        timed_out: Callable[[Node], None],
    ) -> None:
        self._timed_out = timed_out
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
        session._timed_out(session._node)
        self.waiter.on_timeout()

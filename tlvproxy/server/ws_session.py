"""One WebSocket session <-> one dedicated upstream connection (docs/websocket.md).

Owns: an accepted session's state and life: the 101 answer, the dedicated
upstream connection it holds open, the pushes that connection brings, what
ends the session and the closing handshake (the close codes), the drain's
1001 (`ws_drain.WebSocketSessions`) and the per-session access record. Its
parts, one concept each, are its bases: reading the client (ws_reading.py),
its messages' way upstream (ws_requests.py; the way back: ws_calls.py) and
writing to the client (ws_writing.py).
Must not: check the handshake (websocket.py does), parse HTTP (the driver
did), pick nodes or frame requests (the pool does), hold protocol logic of
json mode (`ws_json.py` does), or the policy and rendering every json-mode
session shares, WebSocket or push session (`session_core.py` does).

Requests are state, not tasks (docs/reference.md "How a request
flows"). The session reads the client in batches: it parses the messages
of each read and submits each request to the dedicated upstream connection as
a waiter (`ws_calls`) whose deadline is the command's timeout. On plain TCP
the worker's read hub calls it when bytes come, so that its own task stays
parked unless it must wait (ws_reading.py). The connection's
reader completes it (or the worker's deadline timer, with a per-message
`upstream_timeout`, or the connection's end, with a 1011 close): it renders
the response and writes it to the client with a non-blocking send. Pushes go
the same way, rendered and written by the same reader (`on_push`). Only bytes
the client's socket does not take at once are left to a flush task, started
for the occasion; messages queued meanwhile wait behind them, in order. An idle
session thus costs one task here, plus the upstream connection's reader and
writer, and a worker's drain reaches its sessions through one registry rather
than a task each.

wsproto judges the frames the reader does not read itself (ws_reading.py),
and data messages are written without it (ws_writing.py), so wsproto sends
only pongs and the close frame, which move its state; no data may follow
either side's close. Backpressure bounds what a session holds, reading
(`MAX_IN_FLIGHT`) and writing (`OUTGOING_QUEUE`).

Close codes (docs/websocket.md "Close codes"): 1001 drain, 1008 policy (a WAF
deny, an invalid binary frame, a text message in binary mode, and a client that
does not read: see ws_writing.py), 1009 message over `max_message` or of over
`MAX_FRAGMENTS` fragments, 1011 upstream connection lost or broken, 1013 no
healthy node. A session idle for `idle_timeout` closes with 1000 (nothing went
wrong; it just ended). A client's own close is answered with its code. What
is queued is flushed and the close frame sent within `CLOSE_TIMEOUT`, after
which the TCP connection is dropped.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection

from tlvproxy.errors import UpstreamUnavailable
from tlvproxy.framing import encode_frame
from tlvproxy.logs import ACCESS_LOGGER
from tlvproxy.server import session_core
from tlvproxy.server.ws_reading import READ_SIZE, SessionReading
from tlvproxy.server.ws_requests import SessionRequests
from tlvproxy.server.ws_wire import ABNORMAL, BINARY, GOING_AWAY, INTERNAL, TEXT, accept_head
from tlvproxy.server.ws_wire import frame as wire_frame
from tlvproxy.server.ws_writing import SessionWriting

if TYPE_CHECKING:
    from collections.abc import Callable

    from tlvproxy.config.model import WebSocketSpec
    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.http_conn import Request
    from tlvproxy.server.read_hub import ReadHub
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.view import RequestContext
    from tlvproxy.server.ws_drain import WebSocketSessions
    from tlvproxy.server.ws_reading import ReadingSession
    from tlvproxy.server.ws_requests import RequestsSession
    from tlvproxy.server.ws_writing import WritingSession
    from tlvproxy.stores.limits import Pending
    from tlvproxy.upstream.pool import Session

# Bound on the closing handshake: flushing, the close frame, the client's reply.
CLOSE_TIMEOUT: Final = 5.0

log = logging.getLogger("tlvproxy.websocket")
_access = logging.getLogger(ACCESS_LOGGER)


class WebSocketSession(SessionReading, SessionRequests, SessionWriting):
    """One accepted session; `run()` is its whole life, in the HTTP connection's task.

    It is also its dedicated connection's `PushReceiver`: `on_push` and
    `on_end` run in that connection's reader, like the `ws_calls` requests.
    Its parts (the bases) hold no state: every attribute is a slot here.
    """

    __slots__ = (
        "_active_at",
        "_binary",
        "_byte_parts",
        "_client_gone",
        "_close_by",
        "_close_sent",
        "_context",
        "_count_in",
        "_count_out",
        "_expires",
        "_fd",
        "_flush_scope",
        "_flushing",
        "_fragmented",
        "_fragments",
        "_held",
        "_hub",
        "_in_flight",
        "_inbox",
        "_inbox_at",
        "_metrics",
        "_out",
        "_pong",
        "_queued",
        "_reading",
        "_received_at",
        "_request",
        "_request_id",
        "_runtime",
        "_serving",
        "_sessions",
        "_size",
        "_slot_freed",
        "_spec",
        "_stream",
        "_table",
        "_text_parts",
        "_uid",
        "_upstream",
        "_verdict",
        "_ws",
        "close_code",
        "close_reason",
        "messages_in",
        "messages_out",
        "missed",
        "node",
        "parked",
    )

    def __init__(
        self,
        *,
        request: Request,
        request_id: str,
        stream: trio.abc.Stream,
        leftover: bytes,
        runtime: TableRuntime,
        spec: WebSocketSpec,
        metrics: Metrics,
        sessions: WebSocketSessions,
        context: RequestContext,
        uid: int | None,
        expires: float = math.inf,
        read_hub: ReadHub | None = None,
    ) -> None:
        self._request = request
        self._request_id = request_id
        self._stream = stream
        # The socket's descriptor, for reads and writes that never wait; -1 for
        # other streams (TLS), whose bytes go through receive_some and the flush task.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._runtime = runtime
        self._table = runtime.table
        self._spec = spec
        self._binary = spec.mode == "binary"
        self._metrics = metrics
        self._count_in = metrics.websocket_messages.labels("in")
        self._count_out = metrics.websocket_messages.labels("out")
        self._sessions = sessions
        self._context = context
        self._uid = uid
        self._expires = expires  # when the credentials expire, on trio's clock
        # The client's bytes not handled yet (whole frames are, as they come),
        # from `_inbox_at` on; wsproto sees only the frames of `_on_frames` that
        # are not plain messages, and is made for the first such frame.
        self._inbox: bytes | bytearray = leftover
        self._inbox_at = 0
        self._ws: Connection | None = None
        self._fragmented = False  # wsproto holds part of a fragmented message
        self._upstream: Session | None = None
        # Reading. `_reading`, the cancel scope of the idle period under way, is
        # also cancelled when the session starts closing.
        self._reading: trio.CancelScope | None = None
        # The worker's read hub, which waits for the client's bytes while the
        # session serves (plain TCP only); its task stays `parked` there,
        # unless it must await something, and reads itself after it `missed`
        # a readiness (see ws_reading.py).
        self._hub = read_hub if self._fd >= 0 else None
        self.parked: trio.lowlevel.Task | None = None
        self.missed = True
        self._received_at = trio.current_time()  # when the last bytes came
        self._active_at = self._received_at  # when the last message or ping came
        self._text_parts: list[str] | None = None  # the fragments of a message under way
        self._byte_parts: list[bytes] | None = None
        self._size = 0
        self._fragments = 0
        self._held: str | bytes | None = None  # a message waiting for a request slot
        # A message whose rate limits wait for Redis: their verdict, the
        # message's seq, and what sends it once admitted. Reading stops
        # meanwhile, so that messages reach the upstream in their order.
        self._verdict: tuple[Pending, int, Callable[[], None]] | None = None
        self._in_flight = 0
        self._slot_freed: trio.Event | None = None
        # Writing: what the socket did not take at once waits in `_out` for the
        # flush task, started (while `_serving`) in the upstream session's
        # nursery; `_queued` messages wait behind it.
        self._serving = False
        self._out = bytearray()
        self._queued = 0
        # The pong of the latest ping, waiting behind a blocked write: one at
        # most, never counted as a message (RFC 6455 5.5.3).
        self._pong: bytes | None = None
        self._flushing = False
        self._flush_scope: trio.CancelScope | None = None
        self._close_by = math.inf  # the flush task's deadline once closing starts
        self._client_gone = False
        self._close_sent = False
        self.node: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.messages_in = 0
        self.messages_out = 0

    # ------------------------------------------------------------ life cycle

    async def run(self) -> None:
        """The session's whole life; then the stream is closed and the access
        record written."""
        self._metrics.websocket_sessions.inc()
        try:
            try:
                await self._stream.send_all(accept_head(self._request, self._request_id))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._begin_close(ABNORMAL, "client gone before the handshake completed")
                return
            pool = self._runtime.pools[self._spec.upstream]
            key = session_core.hash_key(self._spec, self._context)
            self._sessions._add(self)
            try:
                if not self._closing():  # else the gateway drains already
                    # Inline, not a method: one coroutine frame less per session.
                    async with pool.open_session(key=key, receiver=self) as upstream:
                        self.node = upstream.node
                        self._upstream = upstream
                        self._serving = True
                        self._watch_reads()
                        try:
                            await self._read_loop()
                        finally:
                            self._serving = False
                            if self._hub is not None:
                                self._hub.remove(self._fd, self)
                            if self.close_code is None:
                                # Cancelled from outside (the drain's deadline passed)
                                # or a bug: no closing handshake, no flush task left.
                                self._begin_close(ABNORMAL, "session cancelled")
            except UpstreamUnavailable as exc:
                # Opening failed: NoHealthyNode closes 1013, anything else 1011
                # (docs/websocket.md "Close codes").
                self._begin_close(exc.ws_close or INTERNAL, exc.message)
            finally:
                self._upstream = None
                self._sessions._remove(self)
            await self._finish()
        finally:
            self._metrics.websocket_sessions.dec()
            await trio.aclose_forcefully(self._stream)
            self._log_access()

    def _log_access(self) -> None:
        request = self._request
        identity = self._context.identity
        _access.info(
            "websocket session",
            extra={
                **({} if identity is None else identity.log_fields()),
                "request_id": self._request_id,
                "client_ip": self._context.remote_addr,
                "method": request.method,
                "path": request.path,
                "status": 101,
                "upstream_node": self.node,
                "uid": self._uid,
                "close_code": self.close_code,
                "close_reason": self.close_reason,
                "messages_in": self.messages_in,
                "messages_out": self.messages_out,
                "duration_ms": round((trio.current_time() - request.received_at) * 1000, 3),
            },
        )

    def go_away(self) -> None:
        """The gateway drains: close with 1001 (`WebSocketSessions.drain`)."""
        self._begin_close(GOING_AWAY, "gateway shutting down")

    def _begin_close(self, code: int, reason: str) -> None:
        """Start closing with `code` (the first caller's code wins); never waits."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            if self._reading is not None:
                self._reading.cancel()
            # What is queued, then the close frame, must be written by then.
            self._close_by = trio.current_time() + CLOSE_TIMEOUT
            if self._flush_scope is not None:
                self._flush_scope.deadline = self._close_by
            self._pong = None  # nothing may follow the close frame
            if code != ABNORMAL:
                self._send_close_frame()
        if code == ABNORMAL:
            self._client_gone = True
            if self._flush_scope is not None:
                self._flush_scope.cancel()

    def _closing(self) -> bool:
        # A call, where mypy would keep `close_code` narrowed across the calls
        # that set it.
        return self.close_code is not None

    def _wsproto(self) -> Connection:
        conn = self._ws
        if conn is None:
            conn = self._ws = Connection(ConnectionType.SERVER)
        return conn

    def _send_close_frame(self) -> None:
        code = self.close_code
        if self._client_gone or code is None:
            return
        conn = self._wsproto()
        if conn.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        data = conn.send(CloseConnection(code=code, reason=self.close_reason))
        self._close_sent = True
        self._write(bytes(data))

    async def _finish(self) -> None:
        """What could not be written yet, then the client's close frame, bounded."""
        if self._client_gone:
            return
        conn = self._wsproto()
        if self._inbox_at < len(self._inbox) and conn.state is ConnectionState.LOCAL_CLOSING:
            # Whole frames were handled; what is left starts at a frame's start.
            conn.receive_data(bytes(self._inbox[self._inbox_at :]))
        self._inbox = b""
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                if self._out:
                    data, self._out = self._out, bytearray()
                    await self._stream.send_all(data)
                while self._close_sent:
                    # RFC 6455 7.1.1: wait for the client's close frame before dropping
                    # TCP, so the close frame is not lost to a reset; data is discarded.
                    for _ in conn.events():
                        pass
                    if conn.state is not ConnectionState.LOCAL_CLOSING:
                        return
                    received = await self._stream.receive_some(READ_SIZE)
                    if not received:
                        return
                    conn.receive_data(bytes(received))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._client_gone = True

    # ------------------------------------------------------------ the upstream's side

    def on_push(self, frame: Frame) -> None:
        """A push, from the dedicated connection's reader: rendered and sent."""
        if self.close_code is not None:
            return
        try:
            if self._binary:
                data = wire_frame(BINARY, encode_frame(self._table.framing, frame))
            else:
                text = session_core.render_push(
                    self._table, self._metrics, self._spec.upstream, frame
                )
                if text is None:
                    return
                data = wire_frame(TEXT, text)
        except Exception:  # runs in the upstream reader: a bug costs one push, not the reader
            log.exception("rendering a push failed", extra={"command": frame.command})
            return
        self._send(data)

    def on_end(self, error: GatewayError) -> None:
        """The dedicated connection ended; unless the session ended it, 1011."""
        self._begin_close(INTERNAL, "upstream connection lost")


if TYPE_CHECKING:

    def _parts_fit(
        session: WebSocketSession,
    ) -> tuple[ReadingSession, RequestsSession, WritingSession]:
        """The session is what each of its parts needs: mypy compares a part's
        Protocol with the session only where the part's methods are called on
        a session, and some are called only by other parts."""
        return session, session, session

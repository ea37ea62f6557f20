"""Writing to a WebSocket session's client (docs/websocket.md "Backpressure").

Owns: the `SessionWriting` part of a session: each message frame written with
a non-blocking send, after everything written before it; the bytes the
client's socket does not take at once, left to a flush task started for the
occasion, with the messages queued meanwhile waiting behind them, in order;
the bound on those (`OUTGOING_QUEUE`); and the one pong that may wait too.
Must not: read the client, render a message (the caller gives whole frames)
or close the session for any other reason than a client that does not read
or is gone (the session's `_begin_close` closes).

Data messages are framed with `ws_wire.frame` (a server's frames are
unmasked, and no extension is ever negotiated), so wsproto writes only pongs
and the close frame. While a write to the client is blocked, at most
`OUTGOING_QUEUE` messages wait behind it: past that the client is not reading
what it asked for, so the session closes with 1008 ("client too slow") and a
warning is logged, instead of buffering without bound. Pongs are not such
messages: while a write is blocked, only the latest ping's pong waits, in a
slot of its own.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Final, Protocol

import trio

from tlvproxy.server import ws_json
from tlvproxy.server.ws_wire import ABNORMAL, POLICY, TEXT
from tlvproxy.server.ws_wire import frame as wire_frame

if TYPE_CHECKING:
    from prometheus_client import Counter

    from tlvproxy.errors import GatewayError
    from tlvproxy.upstream.pool import Session

# Messages waiting behind a blocked write; more means the client does not read.
OUTGOING_QUEUE: Final = 64

log = logging.getLogger("tlvproxy.websocket")


class WritingSession(Protocol):
    """What writing needs of its session, the `self` of `SessionWriting`'s
    methods (ws_session.py, which imports this module, checks that its
    session is one)."""

    _stream: trio.abc.Stream
    _fd: int
    _upstream: Session | None
    _serving: bool
    _out: bytearray
    _queued: int
    _pong: bytes | None
    _flushing: bool
    _flush_scope: trio.CancelScope | None
    _close_by: float
    _client_gone: bool
    _count_out: Counter
    node: str | None
    close_code: int | None
    messages_out: int

    def _begin_close(self, code: int, reason: str) -> None: ...

    def _send(self, data: bytes) -> None: ...

    def _write(self, data: bytes) -> None: ...

    async def _flush(self) -> None: ...


class SessionWriting:
    """A session's writes to its client; part of `ws_session.WebSocketSession`,
    whose slots hold the state (so that a session keeps no `__dict__`)."""

    __slots__ = ()

    # What these methods set, declared for the type checker: the slots are
    # the session's.
    _out: bytearray
    _queued: int
    _pong: bytes | None
    _flushing: bool
    _flush_scope: trio.CancelScope | None
    _client_gone: bool

    def _send(self: WritingSession, data: bytes) -> None:
        """Send one whole message frame after everything sent before it; never waits."""
        if self.close_code is not None:
            return  # the close frame is on its way: nothing may follow it
        if self._flushing:
            if self._queued >= OUTGOING_QUEUE:
                log.warning(
                    "websocket client not reading: closing the session",
                    extra={"queued": OUTGOING_QUEUE, "upstream_node": self.node},
                )
                self._begin_close(POLICY, f"client too slow: {OUTGOING_QUEUE} messages unread")
                return
            self._queued += 1
        self.messages_out += 1
        self._count_out.inc()
        self._write(data)

    def _send_pong(self: WritingSession, data: bytes) -> None:
        """Answer a ping; never waits, and is not a message the client must read.

        While a write is blocked the pong waits in `_pong`, replacing the one of
        an earlier ping (RFC 6455 5.5.3 lets the latest ping's pong answer them
        all): a burst of pings costs one pong's bytes, and is not counted
        against OUTGOING_QUEUE (docs/websocket.md "Backpressure").
        """
        if self.close_code is not None:
            return
        if self._flushing:
            self._pong = data
            return
        self._write(data)

    def _send_error(self: WritingSession, error: GatewayError, seq: int | str | None) -> None:
        self._send(wire_frame(TEXT, ws_json.render_error(error, seq)))

    def _write(self: WritingSession, data: bytes) -> None:
        """Write `data` now if the socket takes it, else leave it to the flush task."""
        if self._client_gone:
            return
        serving = self._serving
        if not self._flushing and not self._out and self._fd >= 0 and serving:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._begin_close(ABNORMAL, "client connection lost")
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._out += data
        if not self._flushing and serving:
            assert self._upstream is not None  # set while serving
            self._flushing = True
            self._upstream.start_soon(self._flush)

    async def _flush(self: WritingSession) -> None:
        """Write `_out` until it stays empty (the client reads again), or give up."""
        scope = self._flush_scope = trio.CancelScope(deadline=self._close_by)
        try:
            with scope:
                while (self._out or self._pong is not None) and not self._client_gone:
                    if self._pong is not None:
                        # After the whole frames queued: `_out` ends at a frame's end.
                        self._out += self._pong
                        self._pong = None
                    # Everything queued meanwhile goes out in one write.
                    batch, self._out = self._out, bytearray()
                    self._queued = 0
                    await self._stream.send_all(batch)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._begin_close(ABNORMAL, "client connection lost")
        finally:
            self._flushing = False
            self._flush_scope = None
        if scope.cancelled_caught:
            # CLOSE_TIMEOUT passed while closing: the client takes nothing, not
            # even the close frame.
            self._client_gone = True

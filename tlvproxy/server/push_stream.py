"""One server-sent event stream of a push session (docs/push-sessions.md
"Server-sent events").

Owns: the client connection a `GET .../events` took over, from the stream's
head to its end: the pushes kept after the resume point (after an
`event: gap` when some are gone), each new push written as it comes, a
comment after KEEP_ALIVE of silence, `event: close`, and what ends the
stream (another stream or poll, the session's end, the client leaving or not
reading, its credentials expiring).
Must not: keep pushes (the session does), parse HTTP, or outlive its
connection: the stream ends, the connection closes.

The stream runs in its connection's task, which sleeps on the client's socket
(so that a client that leaves is seen at once) until a deadline: the next
comment, or when the credentials expire. A push is written by whoever
delivers it (the upstream connection's reader) with a non-blocking send;
only bytes the socket does not take at once wake the task to flush them.
The client is not reading when more than MAX_UNSENT such bytes wait (on top
of the kept pushes a stream starts with), or when it takes none of them for
STALL_TIMEOUT: the stream ends without another word, and the client
resumes with `Last-Event-ID`. Whatever the task waits in (the socket, or a
flush), its cancel scope is the stream's: ending the stream bounds the wait
by CLOSE_TIMEOUT, and losing the client cancels it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import TYPE_CHECKING, Final

import trio

from tlvproxy.server import push_wire

if TYPE_CHECKING:
    from tlvproxy.server.push_sessions import PushSession

# The longest a stream stays silent: proxies close connections idle longer
# (nginx's proxy_read_timeout is 60 s by default).
KEEP_ALIVE_INTERVAL: Final = 15.0
# Bytes waiting for a client that does not read; past it the stream ends.
MAX_UNSENT: Final = 1024 * 1024
# The longest bytes wait with the client taking none of them; then the stream ends.
STALL_TIMEOUT: Final = 15.0
# Bound on writing what is left once the stream ends.
CLOSE_TIMEOUT: Final = 5.0
_READ_SIZE: Final = 65536

log = logging.getLogger("tlvproxy.sessions")


class EventStream:
    """A session's `Listener` writing server-sent events on one connection."""

    __slots__ = (
        "_close_by",
        "_count",
        "_ended",
        "_expires",
        "_fd",
        "_first",
        "_gone",
        "_out",
        "_scope",
        "_session",
        "_stream",
        "_waiting",
        "_written_at",
        "deadline",
    )

    def __init__(self, session: PushSession, stream: trio.abc.Stream, expires: float) -> None:
        self._session = session
        self._stream = stream
        # The socket's descriptor for writes that never wait; -1 for other
        # streams (TLS), whose bytes go through send_all in the stream's task.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._expires = expires  # when the credentials that opened it expire
        self._count = session.metrics.push_messages.labels("out", "sse")
        self._out = bytearray()
        self._first = 0  # bytes of the first write (the kept pushes) not counted as unread
        self._ended = False  # no more events: what is in `_out` is the last
        self._gone = False  # nothing can be written any more
        self._close_by = math.inf
        # The scope of the task's wait, on the socket or in a flush: `end`
        # and `_lost` reach the task through it.
        self._scope: trio.CancelScope | None = None
        self._waiting = False  # the wait is on the socket: a write wakes it to flush
        self._written_at = trio.current_time()
        self.deadline = math.inf  # a stream has no deadline the session keeps

    async def run(self, head: bytes, after: int) -> None:
        """Write the head and the pushes kept after `after`, then every push
        until the stream ends."""
        session = self._session
        gap, pushes = session.kept_after(after)
        parts = [head]
        if gap is not None:
            parts.append(push_wire.gap_event(*gap))
        parts.extend(push_wire.push_event(push_id, text) for push_id, text in pushes)
        first = b"".join(parts)
        # What the session kept (push_kept.MAX_BUFFERED_BYTES at most) may
        # wait on top of MAX_UNSENT.
        self._first = len(first)
        self._write(first)
        if pushes:
            session.messages_out += len(pushes)
            self._count.inc(len(pushes))
        if session.closed is not None:
            self.end(session.closed)  # closed since the request came: say so
        else:
            session.attach(self)
        try:
            await self._serve()
        finally:
            session.detach(self)

    # ------------------------------------------------------------ the session's calls

    def deliver(self, push_id: int, text: bytes) -> None:
        if self._ended:
            return
        self._session.messages_out += 1
        self._count.inc()
        self._write(push_wire.push_event(push_id, text))

    def end(self, reason: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._close_by = trio.current_time() + CLOSE_TIMEOUT
        if reason is not None:
            self._write(push_wire.close_event(reason))
        scope = self._scope
        if scope is not None:
            if self._waiting:
                scope.cancel()  # the task writes the last event, if any, and ends
            else:
                # A flush under way: what is left has CLOSE_TIMEOUT.
                scope.deadline = min(scope.deadline, self._close_by)

    # ------------------------------------------------------------ writing

    def _write(self, data: bytes) -> None:
        """Write `data` now if the socket takes it, else leave it to the task."""
        if self._gone:
            return
        if not self._out and self._fd >= 0:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost()
                return
            if sent == len(data):
                self._written_at = trio.current_time()
                return
            data = data[sent:]
        self._out += data
        if len(self._out) > MAX_UNSENT + self._first:
            self._not_reading()
            return
        if self._waiting:
            assert self._scope is not None  # set while waiting
            self._scope.cancel()  # the task flushes

    def _not_reading(self) -> None:
        log.warning(
            "event stream client not reading: ending the stream",
            extra={"unsent": len(self._out), "upstream_node": self._session.node},
        )
        self._lost()

    def _lost(self) -> None:
        """Nothing more can be written: the task stops whatever it waits for,
        what was not written is dropped, and the session lets go of the stream."""
        self._gone = True
        self._ended = True
        self._out = bytearray()
        if self._scope is not None:
            self._scope.cancel()
        self._session.detach(self)

    async def _flush(self) -> None:
        """Write `_out`; the stream is lost when the client takes nothing of it
        for STALL_TIMEOUT, once it ended and CLOSE_TIMEOUT passed, when its
        credentials expire, or when `_lost` cancels the flush."""
        fd = self._fd
        with trio.CancelScope() as self._scope:
            scope = self._scope
            progress = trio.current_time()
            try:
                while self._out:
                    # Recomputed after each write: `end` may lower it meanwhile.
                    scope.deadline = min(progress + STALL_TIMEOUT, self._close_by, self._expires)
                    if fd >= 0:
                        try:
                            sent = os.write(fd, self._out)
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(fd)
                            continue
                        del self._out[:sent]
                    else:
                        data = bytes(self._out)
                        self._out.clear()
                        await self._stream.send_all(data)
                    progress = self._written_at = trio.current_time()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost()
            finally:
                self._scope = None
        if scope.cancelled_caught and not self._gone:
            if not self._ended and trio.current_time() < self._expires:
                self._not_reading()  # STALL_TIMEOUT passed
            else:
                self._lost()

    # ------------------------------------------------------------ the task

    async def _serve(self) -> None:
        fd = self._fd
        while not self._gone:
            if self._out:
                await self._flush()
                continue
            if self._ended:
                return
            deadline = min(self._written_at + KEEP_ALIVE_INTERVAL, self._expires)
            readable = False
            with trio.CancelScope(deadline=deadline) as self._scope:
                self._waiting = True
                try:
                    if fd >= 0:
                        await trio.lowlevel.wait_readable(fd)
                        readable = True
                    else:
                        await trio.sleep_forever()
                finally:
                    self._waiting = False
                    self._scope = None
            if readable and not self._client_still_there():
                return
            now = trio.current_time()
            if now >= self._expires:
                # Its credentials expired: the client opens another stream
                # with new ones and resumes (docs/push-sessions.md).
                self._ended = True
            elif (
                not self._out and not self._ended and now >= self._written_at + KEEP_ALIVE_INTERVAL
            ):
                self._write(push_wire.KEEP_ALIVE)

    def _client_still_there(self) -> bool:
        """Read what the client sent (nothing is expected: it is dropped);
        False once it has closed or reset the connection."""
        with contextlib.suppress(BlockingIOError):
            try:
                data = os.read(self._fd, _READ_SIZE)
            except OSError:
                data = b""
            if not data:
                self._gone = True
                self._ended = True
                return False
        return True

"""Reading a WebSocket session's client (docs/websocket.md).

Owns: the `SessionReading` part of a session: its one task's loop, which
waits for the client's bytes within the idle period (`idle_timeout`) and the
life of its credentials; the frame reader and its bounds (`max_message`,
`MAX_FRAGMENTS`, a control frame's size); pings answered; and when reading
stops: while `MAX_IN_FLIGHT` requests wait for their answer, or while a
message waits for its rate limits' verdict.
Must not: handle a message (the session's `_on_message`, ws_requests.py) or
write to the client other than a pong (ws_writing.py writes).

wsproto: a plain message (one final, masked text or binary frame) is read
with `ws_wire` (`_on_frames`); every other frame (control frames, fragments,
anything wrong) goes, whole, to a wsproto connection made for the first such
frame, which judges it. An idle session has no wsproto connection at all.

Backpressure: at most `MAX_IN_FLIGHT` requests of a session wait for their
answer; with that many the reader stops reading, so TCP pushes back on the
client.

The read hub (read_hub.py): on plain TCP, the session's socket is in the
worker's hub while it serves, and its task, instead of waiting for the socket
itself, parks there. The hub's task calls `on_readable` when bytes come: it
reads them and handles their messages as the loop would, and wakes the task
only for what the task must do itself: wait for a verdict or a request slot,
or read again (a full read, the end of the stream); a close cancels the
task's wait. Why: a task woken
per message costs a trio wake-up and an epoll_ctl per read, where the hub
pays one wake-up per scheduler pass for all the sessions that got bytes in it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Final, Protocol

import outcome
import trio
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, Pong

from tlvproxy.server.read_hub import ReadHub
from tlvproxy.server.ws_wire import (
    BINARY,
    FIN,
    MAX_CONTROL_PAYLOAD,
    NORMAL,
    POLICY,
    TOO_BIG,
    frame_head,
    unmask,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import Counter
    from wsproto.connection import Connection

    from tlvproxy.config.model import WebSocketSpec
    from tlvproxy.stores.limits import Pending

# Requests of one session in flight at once; past it the reader stops reading.
MAX_IN_FLIGHT: Final = 32
# Fragments of one message (docs/websocket.md "Close codes"); more closes the session
# with 1009.
MAX_FRAGMENTS: Final = 1024
# Bytes asked of the client's socket in one read.
READ_SIZE: Final = 65536


class ReadingSession(Protocol):
    """What reading needs of its session, the `self` of `SessionReading`'s
    methods (ws_session.py, which imports this module, checks that its
    session is one)."""

    _stream: trio.abc.Stream
    _fd: int
    _spec: WebSocketSpec
    _expires: float
    _inbox: bytes | bytearray
    _inbox_at: int
    _fragmented: bool
    _reading: trio.CancelScope | None
    _received_at: float
    _active_at: float
    _text_parts: list[str] | None
    _byte_parts: list[bytes] | None
    _size: int
    _fragments: int
    _held: str | bytes | None
    _verdict: tuple[Pending, int, Callable[[], None]] | None
    _in_flight: int
    _slot_freed: trio.Event | None
    _count_in: Counter
    _hub: ReadHub | None
    parked: trio.lowlevel.Task | None
    missed: bool
    close_code: int | None
    messages_in: int

    def _closing(self) -> bool: ...

    def _begin_close(self, code: int, reason: str) -> None: ...

    def _wsproto(self) -> Connection: ...

    def _send_pong(self, data: bytes) -> None: ...

    def _on_message(self, message: str | bytes) -> None: ...

    async def _await_verdict(self) -> None: ...

    def on_readable(self, ended: bool) -> None: ...

    async def _hub_read(self) -> bytes | None: ...

    def _receive(self, data: bytes) -> None: ...

    def _on_frames(self) -> bool: ...

    def _on_events(self) -> bool: ...

    def _take(self, message: str | bytes) -> bool: ...


class SessionReading:
    """A session's reads from its client; part of `ws_session.WebSocketSession`,
    whose slots hold the state (so that a session keeps no `__dict__`)."""

    __slots__ = ()

    # What these methods set, declared for the type checker: the slots are
    # the session's.
    _inbox: bytes | bytearray
    _inbox_at: int
    _fragmented: bool
    _reading: trio.CancelScope | None
    _received_at: float
    _active_at: float
    _text_parts: list[str] | None
    _byte_parts: list[bytes] | None
    _size: int
    _fragments: int
    _held: str | bytes | None
    _slot_freed: trio.Event | None
    _hub: ReadHub | None
    missed: bool

    def _watch_reads(self: ReadingSession) -> None:
        """Put the client's socket in the read hub, if there is one and it runs."""
        hub = self._hub
        if hub is None or not hub.running:
            self._hub = None
            return
        try:
            hub.add(self._fd, self)
        except OSError:
            self._hub = None  # the kernel refused: the task waits on its own

    def on_readable(self: ReadingSession, ended: bool) -> None:
        """The read hub's call: bytes came while the task is parked (`ended`:
        the stream ended after them). Their messages are handled here; the
        task is woken with bytes it must handle itself (a full read, which may
        have more behind it, or the end), or with None when it must look again
        (a held message, a verdict). A close cancels the task's wait instead."""
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return  # the bytes of an earlier readiness, read already
        except OSError:
            data = b""  # reset by the client: as good as EOF
        hub = self._hub
        assert hub is not None  # only its hub calls this
        if ended or not data or len(data) == READ_SIZE:
            hub.wake(self, outcome.Value(data))
            return
        self._received_at = trio.current_time()
        self._receive(data)
        look_again = self._on_frames() or self._held is not None or self._verdict is not None
        # (A close cancels the parked wait: there is no task to wake then.)
        if look_again and self.parked is not None:
            hub.wake(self, outcome.Value(None))

    async def _hub_read(self: ReadingSession) -> bytes | None:
        """The client's next bytes (b"" at the end of the stream), or None when
        `on_readable` handled them or the task must look again."""
        if self.missed:
            # A readiness may have come while the task was not parked, or bytes
            # be left behind a full read: the socket is read until it says it is
            # empty, since neither those bytes nor the end of the stream behind
            # them get a readiness of their own. A read that finds bytes yields
            # (shielded: they are the caller's), as the wait it stands for
            # would: a client whose bytes are always there (a flood of pings,
            # which takes no request slot) must not hold the worker.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                self.missed = False
            except OSError:
                return b""
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        woken = await ReadHub.park(self)
        assert woken is None or isinstance(woken, bytes)  # what on_readable wakes it with
        return woken

    def _receive(self: ReadingSession, data: bytes) -> None:
        """`data`, which is not the end of the stream, joins the bytes to handle."""
        inbox = self._inbox
        if self._inbox_at == len(inbox):
            self._inbox = data
        else:
            # Part of a frame is waiting: join in one growing buffer.
            if not isinstance(inbox, bytearray) or self._inbox_at:
                inbox = bytearray(inbox[self._inbox_at :])
            inbox += data
            self._inbox = inbox
        self._inbox_at = 0

    async def _read_loop(self: ReadingSession) -> None:
        """Take the client's messages until the session starts closing."""
        idle_timeout = self._spec.idle_timeout
        fd = self._fd
        while self.close_code is None:
            # One cancel scope per idle period, not per read (entering one costs
            # about as much as a small message): when its deadline passes, the
            # session may have been active meanwhile, and another period starts.
            # `_begin_close` cancels it.
            deadline = min(self._active_at + idle_timeout, self._expires)
            with trio.CancelScope(deadline=deadline) as self._reading:
                while True:
                    if self._verdict is not None:
                        await self._await_verdict()
                        if self._closing():
                            return
                    held = self._held
                    if held is not None:
                        # With MAX_IN_FLIGHT requests waiting, reading stops. The
                        # message stays held if the wait ends with the idle period.
                        while self._in_flight >= MAX_IN_FLIGHT:
                            self._slot_freed = freed = trio.Event()
                            await freed.wait()
                        self._held = None
                        self._received_at = trio.current_time()
                        self._on_message(held)
                        if self._verdict is not None:
                            continue
                    # Closing, or a message held or waiting: _on_frames says which.
                    if self._on_frames():
                        return
                    if self._held is not None or self._verdict is not None:
                        continue
                    hub = self._hub
                    if hub is not None and hub.watches(fd, self):
                        woken = await self._hub_read()
                        if woken is None:
                            continue
                        data = woken
                    elif fd >= 0:
                        # Wait, then read: the bytes before were all handled, so a
                        # read first would mostly fail. The wait is the checkpoint.
                        await trio.lowlevel.wait_readable(fd)
                        try:
                            data = os.read(fd, READ_SIZE)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""  # reset by the client: as good as EOF
                    else:
                        try:
                            data = bytes(await self._stream.receive_some(READ_SIZE))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                    self._received_at = trio.current_time()
                    if not data:
                        # wsproto takes None for EOF where the stream gives b""
                        # (its convention); it answers with a 1006 CloseConnection.
                        self._wsproto().receive_data(None)
                        self._on_events()
                        return
                    self._receive(data)
            now = trio.current_time()
            if self.close_code is None and now >= self._expires:
                self._begin_close(POLICY, "the session's credentials expired")
            elif self.close_code is None and now >= self._active_at + idle_timeout:
                self._begin_close(NORMAL, f"idle for {idle_timeout:g} s")

    def _on_frames(self: ReadingSession) -> bool:
        """Handle the whole frames received; True once the session is closing.

        A plain message, one final masked text or binary frame while no
        fragmented message is under way, is read here (RFC 6455 5.2, 5.3);
        every other frame goes, whole, to wsproto, which judges control frames,
        fragments and protocol errors. Stops at a whole message while
        MAX_IN_FLIGHT requests wait: it is held.
        """
        if self._closing():
            return True
        buf = self._inbox
        pos = self._inbox_at
        max_message = self._spec.max_message
        try:
            while (head := frame_head(buf, pos)) is not None:
                first, plain, start, end = head
                opcode = first & 0x0F
                if opcode <= BINARY:
                    if self._size + end - start > max_message:
                        # At once, before the payload (docs/websocket.md "Close codes").
                        self._begin_close(
                            TOO_BIG, f"message over max_message ({max_message} bytes)"
                        )
                        return True
                elif end - start > MAX_CONTROL_PAYLOAD:
                    # Not a frame to wait for: wsproto refuses it from its head.
                    self._wsproto().receive_data(bytes(buf[pos:]))
                    pos = len(buf)
                    return self._on_events()
                if end > len(buf):
                    break  # the rest of the frame is on its way
                message: str | bytes | None = None
                # A final text or binary frame, no extension bit, plain (masked
                # as a client's must be, its length in the fewest bytes), while
                # no fragmented message is under way.
                if first & 0xF0 == FIN and plain and 0 < opcode <= BINARY and not self._fragmented:
                    payload = unmask(buf[start - 4 : start], buf[start:end])
                    if opcode == BINARY:
                        message = payload
                    else:
                        with contextlib.suppress(UnicodeDecodeError):  # wsproto closes 1007
                            message = payload.decode()
                if message is None:
                    self._wsproto().receive_data(bytes(buf[pos:end]))
                    pos = end
                    if self._on_events():
                        return True
                    if self._held is not None or self._verdict is not None:
                        return False
                else:
                    pos = end
                    if self._take(message):
                        return self._closing()
            return False
        finally:
            self._inbox_at = pos

    def _on_events(self: ReadingSession) -> bool:
        """Handle wsproto's events (of one whole frame); True once the session is closing."""
        conn = self._wsproto()
        for event in conn.events():
            if isinstance(event, Message):
                data = event.data
                self._fragments += 1
                if self._fragments > MAX_FRAGMENTS:
                    self._begin_close(TOO_BIG, f"message of over {MAX_FRAGMENTS} fragments")
                    return True
                self._fragmented = not event.message_finished
                message: str | bytes
                if isinstance(data, str):
                    self._size += len(data) if data.isascii() else len(data.encode())
                    texts = self._text_parts
                    if self._fragmented:
                        if texts is None:
                            texts = self._text_parts = []
                        texts.append(data)
                        continue
                    if texts is not None:
                        texts.append(data)
                        data = "".join(texts)
                        self._text_parts = None
                    message = data
                else:
                    self._size += len(data)
                    chunks = self._byte_parts
                    if self._fragmented:
                        if chunks is None:
                            chunks = self._byte_parts = []
                        chunks.append(bytes(data))
                        continue
                    if chunks is not None:
                        chunks.append(bytes(data))
                        data = b"".join(chunks)
                        self._byte_parts = None
                    message = bytes(data)
                if self._take(message):
                    return self._closing()
            elif isinstance(event, Ping):
                self._active_at = self._received_at
                if conn.state is ConnectionState.OPEN:
                    self._send_pong(bytes(conn.send(Pong(payload=event.payload))))
            elif isinstance(event, CloseConnection):
                # The client's close (answered with its code), its vanishing
                # (1006), or wsproto's verdict on a protocol error (1002, 1007).
                self._begin_close(event.code, event.reason or "")
                return True
        return self._closing()

    def _take(self: ReadingSession, message: str | bytes) -> bool:
        """One whole message from the client; True when reading must stop (the
        session is closing, or the message is held)."""
        self._size = 0
        self._fragments = 0
        self._active_at = self._received_at
        self.messages_in += 1
        self._count_in.inc()
        if self._in_flight >= MAX_IN_FLIGHT:
            self._held = message
            return True
        self._on_message(message)
        return self._verdict is not None or self._closing()

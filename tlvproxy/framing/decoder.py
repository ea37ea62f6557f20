"""The incremental TLV decoder and the encoder (docs/protocol.md "The decoder
and its errors").

Owns: `FrameDecoder`, `iter_frames`, `encode_frame` and `RequestEncoder`, on a
layout's compiled functions (tlvproxy/framing/layout.py).
Must not: do I/O, await, read a clock or import trio; callers move the bytes.

The decoder has the shape of `h11.Connection`: `receive_data(chunk)` only
buffers (b"" means EOF), `next_event()` returns a `Frame`, `NEED_DATA` or
`ConnectionClosed`, or raises a `FramingError`. After an error it stays broken:
it never resynchronises on a stream whose framing we no longer trust. It keeps
each chunk as the `bytes` it was given and slices bodies straight out of it;
only a frame that straddles chunks is copied together.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Final

from tlvproxy.framing.frame import (
    END_BYTE,
    NEED_DATA,
    START_BYTE,
    BadEndByte,
    BadStartByte,
    BodyTooLarge,
    ConnectionClosed,
    DecoderBroken,
    Frame,
    FramingError,
    LengthTooSmall,
    NeedData,
    TruncatedFrame,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from tlvproxy.framing.layout import HeaderLayout

# Chunks smaller than this that arrive behind a partial frame are appended to one
# bytearray rather than queued one by one: a peer trickling single bytes must not
# make the decoder hold a Python object per byte.
_SMALL_CHUNK: Final = 4096


# ---------------------------------------------------------------- encoding


def encode_frame(layout: HeaderLayout, frame: Frame) -> bytes:
    """The wire bytes of `frame`.

    Raises ValueError if the body is over max_body, `extra` has the wrong number
    of values, or a value does not fit its field.
    """
    return layout._pack_wire(
        frame.command, frame.seq, frame.uid, frame.flags, frame.status, frame.body, frame.extra
    )


class RequestEncoder:
    """The fast path for the frames the gateway sends most: requests.

    `encode` returns the wire bytes and raises ValueError like `encode_frame`.
    """

    __slots__ = ("_pack_wire",)

    def __init__(self, layout: HeaderLayout) -> None:
        self._pack_wire = layout._pack_wire

    def encode(self, command: int, seq: int, uid: int, body: bytes, flags: int = 0) -> bytes:
        return self._pack_wire(command, seq, uid, flags, 0, body, ())


# ---------------------------------------------------------------- decoding


class FrameDecoder:
    """Incremental, bounded TLV decoder (docs/protocol.md "The decoder and its errors").

    Fed a chunk at a time and drained with `next_event` after each, it holds at
    most one maximal frame plus one chunk. Its work is linear in the bytes fed,
    whatever the chunking: a frame inside a chunk is sliced out of it, and a frame
    that straddles chunks is joined once, when all of it has arrived.
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_error",
        "_frame_size",
        "_layout",
        "_pending",
        "_pending_size",
        "_pos",
        "_received",
        "_scan",
    )

    def __init__(self, layout: HeaderLayout) -> None:
        self._layout = layout
        self._scan = layout._scan
        # The chunk being parsed, always `bytes` so bodies slice out with one copy,
        # and the parse position in it.
        self._buf = b""
        self._pos = 0
        # Chunks that arrived while _buf still held part of a frame; each element
        # is bytes or, for runs of small chunks, a bytearray collecting them.
        self._pending: collections.deque[bytes | bytearray] = collections.deque()
        self._pending_size = 0
        self._received = 0  # bytes fed in all, so stream offsets need no bookkeeping
        self._frame_size = 0  # size of the frame at _pos once its header is parsed
        self._closed = False
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame."""
        return len(self._buf) - self._pos + self._pending_size

    def receive_data(self, data: bytes) -> None:
        """Buffer `data`; b"" means the peer closed the stream (EOF).

        Raises DecoderBroken after a FramingError, RuntimeError for data after EOF.
        """
        if self._error is not None:
            raise DecoderBroken(self._error)
        if not data:
            self._closed = True
            return
        if self._closed:
            raise RuntimeError("data received after EOF")
        self._received += len(data)
        if self._pos == len(self._buf) and not self._pending:
            # bytes(x) is x itself for bytes, a private copy of a mutable buffer.
            self._buf = bytes(data)
            self._pos = 0
            return
        pending = self._pending
        self._pending_size += len(data)
        if len(data) >= _SMALL_CHUNK:
            pending.append(bytes(data))
        elif pending and isinstance(pending[-1], bytearray):
            pending[-1] += data
        else:
            pending.append(bytearray(data))

    def next_event(self) -> Frame | NeedData | ConnectionClosed:
        """The next complete `Frame`, `NEED_DATA`, or `ConnectionClosed` after a clean EOF.

        Raises a FramingError subclass (BadStartByte, BadEndByte, BodyTooLarge,
        LengthTooSmall, TruncatedFrame) naming the stream offset; from then on
        every call raises DecoderBroken.
        """
        return self._scan(self)

    def _slow(self) -> Frame | NeedData | ConnectionClosed:
        # Everything the layout's compiled scan does not handle: the end of the
        # chunk, frames that straddle chunks, EOF and every error.
        if self._error is not None:
            raise DecoderBroken(self._error)
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available == 0:
            if self._pending:
                self._promote(0)
                return self._scan(self)
            return ConnectionClosed() if self._closed else NEED_DATA
        start = self._received - self._pending_size - available
        if buf[pos] != START_BYTE:
            raise self._fail(BadStartByte(f"start byte 0x{buf[pos]:02x}, expected 0x09", start))
        layout = self._layout
        size = self._frame_size
        if not size:
            header = self._peek(1 + layout.header.size)
            if header is None:
                return self._need_more(start)
            size = self._check_length(header, start)
            # Kept so that a frame trickling in is not re-parsed for every chunk.
            self._frame_size = size
        if available >= size:
            wire = buf[pos : pos + size]
            self._pos = pos + size
        elif available + self._pending_size >= size:
            wire = self._take(size)
        else:
            return self._need_more(start)
        if wire[-1] != END_BYTE:
            raise self._fail(
                BadEndByte(f"end byte 0x{wire[-1]:02x}, expected 0x0a", start + size - 1)
            )
        self._frame_size = 0
        return layout._from_wire(wire)

    def _check_length(self, header: bytes, start: int) -> int:
        # The frame's size, once its header is in: a length over max_body is refused
        # before any of the body is waited for, as h11 refuses an oversized head.
        layout = self._layout
        length: int = layout.header.unpack_from(header, 1)[layout._index["length"]]
        at = start + 1 + layout._length_offset
        overhead = layout.frame_overhead
        body = length
        if layout.length_counts == "frame":
            if length < overhead:
                raise self._fail(
                    LengthTooSmall(
                        f"frame length {length} is below the {overhead}-byte minimum", at
                    )
                )
            body = length - overhead
        if body > layout.max_body:
            raise self._fail(
                BodyTooLarge(f"body length {body} is over max_body {layout.max_body}", at)
            )
        return body + overhead

    def _peek(self, size: int) -> bytes | None:
        """The next `size` bytes, or None if fewer have arrived; consumes nothing."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= size:
            return buf[pos : pos + size]
        if len(buf) - pos + self._pending_size < size:
            return None
        parts: list[bytes | bytearray] = [buf[pos:]]
        missing = size - len(parts[0])
        for chunk in self._pending:
            parts.append(chunk[:missing])
            missing -= len(parts[-1])
            if not missing:
                break
        return b"".join(parts)

    def _take(self, size: int) -> bytes:
        """Consume the next `size` bytes, which reach into the pending chunks."""
        parts: list[bytes | bytearray] = [self._buf[self._pos :]]
        missing = size - len(parts[0])
        pending = self._pending
        while missing:
            chunk = pending[0]
            if len(chunk) > missing:
                parts.append(chunk[:missing])
                self._promote(missing)
                break
            parts.append(pending.popleft())
            self._pending_size -= len(chunk)
            missing -= len(chunk)
        else:
            self._buf, self._pos = b"", 0
        return b"".join(parts)

    def _promote(self, skip: int) -> None:
        # The first pending chunk becomes the one being parsed, from `skip` on.
        chunk = self._pending.popleft()
        self._pending_size -= len(chunk)
        if isinstance(chunk, bytes):
            self._buf, self._pos = chunk, skip
        else:
            # A bytearray collected small chunks: copy only what is left of it.
            del chunk[:skip]
            self._buf, self._pos = bytes(chunk), 0

    def _need_more(self, start: int) -> NeedData:
        if self._closed:
            raise self._fail(
                TruncatedFrame(
                    f"the stream ended {self._received - start} bytes into a frame",
                    self._received,
                )
            )
        return NEED_DATA

    def _fail(self, error: FramingError) -> FramingError:
        # Dead for good (docs/protocol.md "The decoder and its errors"): drop the
        # buffered bytes, keep the error to repeat.
        self._error = error
        self._buf, self._pos = b"", 0
        self._pending.clear()
        self._pending_size = 0
        return error


def iter_frames(layout: HeaderLayout, chunks: Iterable[bytes]) -> list[Frame]:
    """Every frame in `chunks`, then EOF; raises FramingError like the decoder."""
    decoder = FrameDecoder(layout)
    frames: list[Frame] = []
    for chunk in [*chunks, b""]:
        decoder.receive_data(chunk)
        while isinstance(event := decoder.next_event(), Frame):
            frames.append(event)
    return frames

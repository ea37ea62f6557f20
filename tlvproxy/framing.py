"""The sans-I/O TLV codec: `0x09 | header | body | 0x0A` (SPEC 1).

Owns: header layouts (`HeaderLayout`), the `Frame` value, the incremental
`FrameDecoder` and `encode_frame`.
Must not: do I/O, await, read a clock or import trio; callers move the bytes.

The decoder has the shape of `h11.Connection`: `receive_data(chunk)` only
buffers (b"" means EOF), `next_event()` returns a `Frame`, `NEED_DATA` or
`ConnectionClosed`, or raises a `FramingError`. After an error it stays broken:
the SPEC forbids resynchronising on a stream whose framing we no longer trust.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Final, Literal

import attrs

START_BYTE: Final = 0x09
END_BYTE: Final = 0x0A
DEFAULT_MAX_BODY: Final = 1024 * 1024

FLAG_RESPONSE: Final = 0x01
FLAG_PUSH: Final = 0x02

FieldType = Literal["u8", "u16", "u32", "u64"]
_STRUCT_CODES: Final[dict[str, str]] = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}
_FIELD_BITS: Final[dict[str, int]] = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}
# Fields the gateway fills itself; every other field is sent as its `value` or 0.
_STANDARD: Final = ("command", "seq", "uid", "flags", "status")
_REQUIRED: Final = ("command", "seq", "length")


class NeedData(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA


@attrs.frozen(slots=True)
class ConnectionClosed:
    """The peer closed the stream cleanly, between two frames."""


# ---------------------------------------------------------------- errors


class FramingError(Exception):
    """A byte stream that is not valid TLV; `reason` is the metric label.

    `offset` is the position in the stream (counted from the first byte ever fed)
    of the byte that made the stream invalid.
    """

    reason: str = "malformed"

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at stream offset {offset}")
        self.offset = offset


class BadStartByte(FramingError):
    reason = "bad_start_byte"


class BadEndByte(FramingError):
    reason = "bad_end_byte"


class BodyTooLarge(FramingError):
    reason = "body_too_large"


class LengthTooSmall(FramingError):
    reason = "length_too_small"


class TruncatedFrame(FramingError):
    reason = "truncated_frame"


class DecoderBroken(FramingError):
    """A call on a decoder that has already raised: it never resynchronises."""

    reason = "decoder_broken"


# ---------------------------------------------------------------- layouts


@attrs.frozen(slots=True, kw_only=True)
class HeaderField:
    name: str
    type: FieldType
    value: int | None = None

    @property
    def max_value(self) -> int:
        return (1 << _FIELD_BITS[self.type]) - 1


@attrs.frozen(slots=True, kw_only=True)
class Frame:
    """One TLV frame: the header fields the gateway knows, and the body.

    `extra` holds the values of the layout's other fields (version, reserved or
    custom ones) in layout order; an empty tuple means "send their `value` or 0".
    """

    command: int
    seq: int
    uid: int = 0
    flags: int = 0
    status: int = 0
    body: bytes = b""
    extra: tuple[int, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_push(self) -> bool:
        return bool(self.flags & FLAG_PUSH)


def _build_frame(
    command: int,
    seq: int,
    uid: int,
    flags: int,
    status: int,
    body: bytes,
    extra: tuple[int, ...],
) -> Frame:
    # attrs' frozen __init__ sets each slot through object.__setattr__; the
    # decoder builds a million frames a second, so it fills the slots directly.
    frame = object.__new__(Frame)
    _set = object.__setattr__
    _set(frame, "command", command)
    _set(frame, "seq", seq)
    _set(frame, "uid", uid)
    _set(frame, "flags", flags)
    _set(frame, "status", status)
    _set(frame, "body", body)
    _set(frame, "extra", extra)
    return frame


class LayoutError(ValueError):
    """A `framing` section that cannot describe a header."""


@attrs.frozen(slots=True, kw_only=True)
class HeaderLayout:
    """A header layout (SPEC 3 `framing`), compiled once to a `struct.Struct`.

    Raises LayoutError when a required field is missing, a name repeats, a type
    is unknown, a fixed value does not fit its field or max_body is negative.
    """

    fields: tuple[HeaderField, ...]
    byte_order: Literal["big", "little"] = "big"
    length_counts: Literal["body", "frame"] = "body"
    max_body: int = DEFAULT_MAX_BODY

    # Derived once, in __attrs_post_init__.
    header: struct.Struct = attrs.field(init=False, eq=False, repr=False)
    frame_overhead: int = attrs.field(init=False, eq=False, repr=False)
    extra_names: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    _index: dict[str, int] = attrs.field(init=False, eq=False, repr=False)
    _extra_index: tuple[int, ...] = attrs.field(init=False, eq=False, repr=False)
    _extra_defaults: tuple[int, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        names = [f.name for f in self.fields]
        problems = [f"duplicate header field {n!r}" for n in sorted(set(names)) if names.count(n) > 1]
        problems += [f"the header needs a {n!r} field" for n in _REQUIRED if n not in names]
        for f in self.fields:
            if f.type not in _STRUCT_CODES:
                problems.append(f"field {f.name!r}: unknown type {f.type!r} (u8, u16, u32, u64)")
            elif f.value is not None and not 0 <= f.value <= f.max_value:
                problems.append(f"field {f.name!r}: value {f.value} does not fit {f.type}")
        if self.byte_order not in ("big", "little"):
            problems.append(f"byte_order must be big or little, not {self.byte_order!r}")
        if self.length_counts not in ("body", "frame"):
            problems.append(f"length_counts must be body or frame, not {self.length_counts!r}")
        if self.max_body < 0:
            problems.append("max_body cannot be negative")
        if problems:
            raise LayoutError("; ".join(problems))
        prefix = ">" if self.byte_order == "big" else "<"
        header = struct.Struct(prefix + "".join(_STRUCT_CODES[f.type] for f in self.fields))
        index = {name: i for i, name in enumerate(names)}
        extra = tuple(i for i, n in enumerate(names) if n not in _STANDARD and n != "length")
        _set = object.__setattr__
        _set(self, "header", header)
        _set(self, "frame_overhead", header.size + 2)
        _set(self, "extra_names", tuple(names[i] for i in extra))
        _set(self, "_index", index)
        _set(self, "_extra_index", extra)
        _set(self, "_extra_defaults", tuple(self.fields[i].value or 0 for i in extra))

    def has(self, name: str) -> bool:
        """Whether the layout has a field of that name (flags, status and uid are optional)."""
        return name in self._index

    @property
    def header_size(self) -> int:
        return self.header.size

    @property
    def max_frame(self) -> int:
        """The size of the largest frame the decoder accepts."""
        return self.max_body + self.frame_overhead

    def field_max(self, name: str) -> int:
        """The largest value the named field can hold (seq wraps there)."""
        return self.fields[self._index[name]].max_value


def default_layout(max_body: int = DEFAULT_MAX_BODY) -> HeaderLayout:
    """The SPEC 1 default header: version, flags, command, seq, uid, length, status, reserved."""
    return HeaderLayout(
        fields=(
            HeaderField(name="version", type="u8", value=1),
            HeaderField(name="flags", type="u8"),
            HeaderField(name="command", type="u16"),
            HeaderField(name="seq", type="u32"),
            HeaderField(name="uid", type="u32"),
            HeaderField(name="length", type="u32"),
            HeaderField(name="status", type="u16"),
            HeaderField(name="reserved", type="u16"),
        ),
        max_body=max_body,
    )


# ---------------------------------------------------------------- encoding


def _header_values(layout: HeaderLayout, frame: Frame) -> list[int]:
    extra = frame.extra or layout._extra_defaults
    if len(extra) != len(layout._extra_index):
        raise ValueError(
            f"frame carries {len(extra)} extra header values, "
            f"the layout has {len(layout._extra_index)}"
        )
    length = len(frame.body) + (layout.frame_overhead if layout.length_counts == "frame" else 0)
    values = [0] * len(layout.fields)
    for position, value in zip(layout._extra_index, extra, strict=True):
        values[position] = value
    index = layout._index
    values[index["command"]] = frame.command
    values[index["seq"]] = frame.seq
    values[index["length"]] = length
    for name in ("uid", "flags", "status"):
        if name in index:
            values[index[name]] = getattr(frame, name)
    return values


def encode_frame(layout: HeaderLayout, frame: Frame) -> bytes:
    """The wire bytes of `frame`. Raises ValueError if a field does not fit the layout."""
    if len(frame.body) > layout.max_body:
        raise ValueError(f"body of {len(frame.body)} bytes is over max_body {layout.max_body}")
    try:
        header = layout.header.pack(*_header_values(layout, frame))
    except struct.error as exc:
        raise ValueError(f"a header value does not fit the layout: {exc}") from None
    return b"\x09" + header + frame.body + b"\x0a"


class RequestEncoder:
    """The fast path for the frames the gateway sends most: requests.

    Precomputes everything but command, seq, uid and body; `encode` returns the
    wire bytes. Raises ValueError like `encode_frame`.
    """

    __slots__ = ("_layout", "_pack", "_positions", "_template")

    def __init__(self, layout: HeaderLayout) -> None:
        self._layout = layout
        self._pack = layout.header.pack
        template = _header_values(
            layout, Frame(command=0, seq=0, uid=0, flags=0, status=0, extra=())
        )
        self._template = template
        idx = layout._index
        self._positions = (idx["command"], idx["seq"], idx.get("uid"), idx["length"])

    def encode(self, command: int, seq: int, uid: int, body: bytes, flags: int = 0) -> bytes:
        layout = self._layout
        if len(body) > layout.max_body:
            raise ValueError(f"body of {len(body)} bytes is over max_body {layout.max_body}")
        values = self._template.copy()
        p_command, p_seq, p_uid, p_length = self._positions
        values[p_command] = command
        values[p_seq] = seq
        if p_uid is not None:
            values[p_uid] = uid
        if flags and "flags" in layout._index:
            values[layout._index["flags"]] = flags
        values[p_length] = len(body) + (
            layout.frame_overhead if layout.length_counts == "frame" else 0
        )
        try:
            return b"\x09" + self._pack(*values) + body + b"\x0a"
        except struct.error as exc:
            raise ValueError(f"a header value does not fit the layout: {exc}") from None


# ---------------------------------------------------------------- decoding


class FrameDecoder:
    """Incremental, bounded TLV decoder (SPEC 1).

    Holds at most one maximal frame plus the chunk being fed. Its work is linear
    in the bytes fed, whatever the chunking: consumed bytes are dropped once per
    `receive_data`, never by re-slicing the buffer per frame.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_consumed",
        "_error",
        "_layout",
        "_pos",
        "_unpack_from",
        "_getters",
    )

    def __init__(self, layout: HeaderLayout) -> None:
        self._layout = layout
        self._unpack_from = layout.header.unpack_from
        self._buffer = bytearray()
        self._pos = 0  # parse position inside _buffer
        self._consumed = 0  # stream offset of _buffer[0]
        self._closed = False
        self._error: FramingError | None = None
        idx = layout._index
        self._getters = (
            idx["command"],
            idx["seq"],
            idx.get("uid"),
            idx.get("flags"),
            idx.get("status"),
            idx["length"],
            layout._extra_index,
        )

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame."""
        return len(self._buffer) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Buffer `data`; b"" means the peer closed the stream (EOF)."""
        if self._error is not None:
            raise DecoderBroken("the decoder already failed", self._error.offset)
        if not data:
            self._closed = True
            return
        if self._closed:
            raise RuntimeError("data received after EOF")
        if self._pos:
            del self._buffer[: self._pos]
            self._consumed += self._pos
            self._pos = 0
        self._buffer += data

    def next_event(self) -> Frame | NeedData | ConnectionClosed:
        """The next complete `Frame`, `NEED_DATA`, or `ConnectionClosed` after a clean EOF.

        Raises a FramingError subclass (BadStartByte, BadEndByte, BodyTooLarge,
        LengthTooSmall, TruncatedFrame) naming the stream offset; from then on
        every call raises DecoderBroken.
        """
        if self._error is not None:
            raise DecoderBroken("the decoder already failed", self._error.offset)
        buffer = self._buffer
        pos = self._pos
        available = len(buffer) - pos
        layout = self._layout
        header_end = pos + 1 + layout.header.size
        if available == 0:
            return ConnectionClosed() if self._closed else NEED_DATA
        if buffer[pos] != START_BYTE:
            raise self._fail(BadStartByte, f"start byte 0x{buffer[pos]:02x}, expected 0x09", pos)
        if len(buffer) < header_end:
            return self._need_more()
        values = self._unpack_from(buffer, pos + 1)
        g_command, g_seq, g_uid, g_flags, g_status, g_length, g_extra = self._getters
        length = values[g_length]
        if layout.length_counts == "frame":
            if length < layout.frame_overhead:
                raise self._fail(
                    LengthTooSmall,
                    f"frame length {length} is below the {layout.frame_overhead}-byte minimum",
                    pos + 1,
                )
            length -= layout.frame_overhead
        if length > layout.max_body:
            raise self._fail(
                BodyTooLarge, f"body length {length} is over max_body {layout.max_body}", pos + 1
            )
        body_end = header_end + length
        if len(buffer) <= body_end:
            return self._need_more()
        if buffer[body_end] != END_BYTE:
            raise self._fail(BadEndByte, f"end byte 0x{buffer[body_end]:02x}, expected 0x0a", body_end)
        self._pos = body_end + 1
        return _build_frame(
            values[g_command],
            values[g_seq],
            0 if g_uid is None else values[g_uid],
            0 if g_flags is None else values[g_flags],
            0 if g_status is None else values[g_status],
            bytes(buffer[header_end:body_end]),
            tuple(values[i] for i in g_extra) if g_extra else (),
        )

    def _need_more(self) -> NeedData:
        if self._closed:
            raise self._fail(TruncatedFrame, "the stream ended inside a frame", len(self._buffer))
        return NEED_DATA

    def _fail(self, kind: type[FramingError], message: str, at: int) -> FramingError:
        # `at` is a position in the buffer; the caller gets a stream offset.
        self._error = kind(message, self._consumed + at)
        return self._error


def iter_frames(layout: HeaderLayout, chunks: Iterable[bytes]) -> list[Frame]:
    """Every frame in `chunks`, then EOF; raises FramingError like the decoder."""
    decoder = FrameDecoder(layout)
    frames: list[Frame] = []
    for chunk in [*chunks, b""]:
        decoder.receive_data(chunk)
        while True:
            event = decoder.next_event()
            if isinstance(event, Frame):
                frames.append(event)
            else:
                break
    return frames

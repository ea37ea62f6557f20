"""The sans-I/O TLV codec: `0x09 | header | body | 0x0A` (docs/protocol.md "Frames").

Owns: header layouts (`HeaderLayout`), the `Frame` value, the incremental
`FrameDecoder` and `encode_frame`.
Must not: do I/O, await, read a clock or import trio; callers move the bytes.

The decoder has the shape of `h11.Connection`: `receive_data(chunk)` only
buffers (b"" means EOF), `next_event()` returns a `Frame`, `NEED_DATA` or
`ConnectionClosed`, or raises a `FramingError`. After an error it stays broken:
it never resynchronises on a stream whose framing we no longer trust
(docs/protocol.md "The decoder and its errors").

Every upstream byte goes through the decoder, so it is built for speed: each
layout compiles, once, a decoding function specialised to its fields (as attrs
and namedtuple generate their `__init__`), and the decoder keeps each chunk as
the `bytes` it was given and slices bodies straight out of it. Only a frame that
straddles chunks is copied together.
"""

from __future__ import annotations

import collections
import enum
import struct
from collections.abc import Callable, Iterable
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
# Fields the gateway fills itself (docs/protocol.md "Custom header layouts"); any other
# field is sent as its `value` or 0.
_FRAME_FIELDS: Final = ("command", "seq", "uid", "flags", "status")
_REQUIRED: Final = ("command", "seq", "length")
# Chunks smaller than this that arrive behind a partial frame are appended to one
# bytearray rather than queued one by one: a peer trickling single bytes must not
# make the decoder hold a Python object per byte.
_SMALL_CHUNK: Final = 4096


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
    """A frame did not begin with 0x09; `offset` is that byte's."""

    reason = "bad_start_byte"


class BadEndByte(FramingError):
    """The byte after a body was not 0x0a; `offset` is that byte's."""

    reason = "bad_end_byte"


class BodyTooLarge(FramingError):
    """A header declared a body over max_body; `offset` is the length field's."""

    reason = "body_too_large"


class LengthTooSmall(FramingError):
    """With length_counts=frame, a length below start + header + end; `offset` is the
    length field's."""

    reason = "length_too_small"


class TruncatedFrame(FramingError):
    """The stream ended inside a frame; `offset` is the end of the stream."""

    reason = "truncated_frame"


class DecoderBroken(FramingError):
    """A call on a decoder that has already raised: it never resynchronises.

    `offset` is the failed error's; `cause` is that error.
    """

    reason = "decoder_broken"

    def __init__(self, cause: FramingError) -> None:
        super().__init__(f"the decoder already failed ({cause})", cause.offset)
        self.cause = cause


# ---------------------------------------------------------------- values


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
    A field the layout lacks (uid, flags, status) decodes as 0 and is not sent.
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


class LayoutError(ValueError):
    """A `framing` section that cannot describe a header."""


def _field_tuple(fields: Iterable[HeaderField]) -> tuple[HeaderField, ...]:
    # A list from a caller would make the layout unhashable; tables compare layouts.
    return tuple(fields)


# The decoder's per-layout functions: `scan(decoder)` is `next_event`, and
# `from_wire(frame_bytes)` decodes one complete, checked frame.
_Scan = Callable[["FrameDecoder"], "Frame | NeedData | ConnectionClosed"]
_PackWire = Callable[[int, int, int, int, int, bytes, tuple[int, ...]], bytes]


@attrs.frozen(slots=True, kw_only=True)
class HeaderLayout:
    """A header layout (docs/configuration.md "framing"), compiled once when it is built.

    Raises LayoutError when a required field is missing, a name repeats, a type
    is unknown, a field the gateway fills has a fixed value, a fixed value does
    not fit its field, the length field cannot count the smallest frame, or
    max_body is negative.
    """

    fields: tuple[HeaderField, ...] = attrs.field(converter=_field_tuple)
    byte_order: Literal["big", "little"] = "big"
    length_counts: Literal["body", "frame"] = "body"
    max_body: int = DEFAULT_MAX_BODY

    # Derived once, in __attrs_post_init__.
    header: struct.Struct = attrs.field(init=False, eq=False, repr=False)
    frame_overhead: int = attrs.field(init=False, eq=False, repr=False)
    extra_names: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    _index: dict[str, int] = attrs.field(init=False, eq=False, repr=False)
    _length_offset: int = attrs.field(init=False, eq=False, repr=False)
    _scan: _Scan = attrs.field(init=False, eq=False, repr=False)
    _from_wire: Callable[[bytes], Frame] = attrs.field(init=False, eq=False, repr=False)
    _pack_wire: _PackWire = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise LayoutError("; ".join(problems))
        prefix = ">" if self.byte_order == "big" else "<"
        codes = "".join(_STRUCT_CODES[f.type] for f in self.fields)
        names = [f.name for f in self.fields]
        length_at = names.index("length")
        _set = object.__setattr__
        _set(self, "header", struct.Struct(prefix + codes))
        _set(self, "frame_overhead", self.header.size + 2)
        _set(self, "extra_names", tuple(n for n in names if n not in (*_FRAME_FIELDS, "length")))
        _set(self, "_index", {name: i for i, name in enumerate(names)})
        _set(self, "_length_offset", struct.calcsize(prefix + codes[:length_at]))
        _compile(self)

    def _problems(self) -> list[str]:
        names = [f.name for f in self.fields]
        problems = [
            f"duplicate header field {n!r}" for n in sorted(set(names)) if names.count(n) > 1
        ]
        problems += [f"the header needs a {n!r} field" for n in _REQUIRED if n not in names]
        for f in self.fields:
            if f.type not in _STRUCT_CODES:
                problems.append(f"field {f.name!r}: unknown type {f.type!r} (u8, u16, u32, u64)")
            elif f.value is not None and f.name in (*_FRAME_FIELDS, "length"):
                problems.append(f"field {f.name!r} is filled by the gateway and takes no value")
            elif f.value is not None and not 0 <= f.value <= f.max_value:
                problems.append(f"field {f.name!r}: value {f.value} does not fit {f.type}")
        if self.byte_order not in ("big", "little"):
            problems.append(f"byte_order must be big or little, not {self.byte_order!r}")
        if self.length_counts not in ("body", "frame"):
            problems.append(f"length_counts must be body or frame, not {self.length_counts!r}")
        if self.max_body < 0:
            problems.append(f"max_body cannot be negative, got {self.max_body}")
        if not problems and self.length_counts == "frame":
            length = next(f for f in self.fields if f.name == "length")
            smallest = 2 + sum(_FIELD_BITS[f.type] for f in self.fields) // 8
            if smallest > length.max_value:
                problems.append(
                    f"a {length.type} length cannot count even an empty {smallest}-byte frame"
                )
        return problems

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
        """The largest value the named field can hold (seq wraps there).

        Raises KeyError if the layout has no such field.
        """
        return self.fields[self._index[name]].max_value


def default_layout(max_body: int = DEFAULT_MAX_BODY) -> HeaderLayout:
    """The default header: version, flags, command, seq, uid, length, status, reserved
    (docs/protocol.md "The default header")."""
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


# ---------------------------------------------------------------- compiling a layout

# Only integers, reprs of integer tuples and generated names are formatted into
# these templates, never a string from the table.
_DECODE_SOURCE: Final = """\
def scan(self):
    buf = self._buf
    pos = self._pos
    header_end = pos + {header_end}
    if header_end <= len(buf) and buf[pos] == {start}:
        {values} = unpack_from(buf, pos + 1)
        if {length_ok}:
            body_end = header_end + {body_length}
            if body_end < len(buf) and buf[body_end] == {end}:
                self._pos = body_end + 1
                {build_frame}
                return frame
    return self._slow()


def from_wire(buf):
    {values} = unpack_from(buf, 1)
    header_end = {header_end}
    body_end = len(buf) - 1
    {build_frame}
    return frame


def pack_wire(command, seq, uid, flags, status, body, extra):
    if len(body) > {max_body}:
        raise ValueError(f"body of {{len(body)}} bytes is over max_body {max_body}")
    {take_extra}
    try:
        head = pack({start}, {pack_args})
    except struct_error as exc:
        raise ValueError(f"a header value does not fit the layout: {{exc}}") from None
    return b"".join((head, body, {end_bytes!r}))
"""


def _extra_count_message(extra: tuple[int, ...], expected: int) -> str:
    return f"the frame carries {len(extra)} extra header values, the layout has {expected}"


def _compile(layout: HeaderLayout) -> None:
    """Generate the layout's decode and encode functions (see the module docstring)."""
    names = [f.name for f in layout.fields]
    values = [f"v{i}" for i in range(len(names))]
    extras = [i for i, n in enumerate(names) if n not in (*_FRAME_FIELDS, "length")]
    length = values[names.index("length")]
    overhead = layout.header.size + 2

    def field(name: str) -> str:
        return values[names.index(name)] if name in names else "0"

    if layout.length_counts == "body":
        length_ok, body_length, wire_length = f"{length} <= {layout.max_body}", length, "len(body)"
    else:
        length_ok = f"{overhead} <= {length} <= {layout.max_body + overhead}"
        body_length = f"{length} - {overhead}"
        wire_length = f"len(body) + {overhead}"
    # One line of statements, so that it fits any indentation of the template.
    build_frame = "; ".join(
        [
            "frame = new(Frame)",
            *(f"set_{name}(frame, {field(name)})" for name in _FRAME_FIELDS),
            "set_body(frame, buf[header_end:body_end])",
            f"set_extra(frame, ({''.join(values[i] + ', ' for i in extras)}))",
        ]
    )
    if extras:
        defaults = tuple(layout.fields[i].value or 0 for i in extras)
        take_extra = (
            f"if not extra:\n        extra = {defaults!r}\n"
            f"    elif len(extra) != {len(extras)}:\n"
            f"        raise ValueError(extra_count_message(extra, {len(extras)}))\n"
            f"    {''.join(f'e{k}, ' for k in range(len(extras)))}= extra"
        )
    else:
        take_extra = "if extra:\n        raise ValueError(extra_count_message(extra, 0))"
    pack_args = [
        wire_length if name == "length" else f"e{extras.index(i)}" if i in extras else name
        for i, name in enumerate(names)
    ]
    source = _DECODE_SOURCE.format(
        header_end=1 + layout.header.size,
        start=START_BYTE,
        end=END_BYTE,
        end_bytes=bytes([END_BYTE]),
        values=", ".join(values),
        length_ok=length_ok,
        body_length=body_length,
        build_frame=build_frame,
        max_body=layout.max_body,
        take_extra=take_extra,
        pack_args=", ".join(pack_args),
    )
    namespace: dict[str, object] = {
        "unpack_from": layout.header.unpack_from,
        # The start byte is packed with the header: one concatenation less per frame.
        "pack": struct.Struct(layout.header.format[0] + "B" + layout.header.format[1:]).pack,
        "struct_error": struct.error,
        "extra_count_message": _extra_count_message,
        "new": object.__new__,
        "Frame": Frame,
        **{f"set_{a.name}": getattr(Frame, a.name).__set__ for a in attrs.fields(Frame)},
    }
    exec(compile(source, f"<tlvproxy.framing: {layout.header.format}>", "exec"), namespace)
    _set = object.__setattr__
    _set(layout, "_scan", namespace["scan"])
    _set(layout, "_from_wire", namespace["from_wire"])
    _set(layout, "_pack_wire", namespace["pack_wire"])


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

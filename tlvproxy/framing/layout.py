"""Header layouts: the fields of a TLV header, compiled once into the decoding
and encoding functions of that layout (docs/configuration.md "framing",
docs/protocol.md "Custom header layouts").

Owns: `HeaderField`, `HeaderLayout` (validated when built: `LayoutError`),
`default_layout`, and the generated per-layout functions the decoder
(tlvproxy/framing/decoder.py) and encoder call: `scan`, `from_wire`, `pack_wire`.
Must not: do I/O or import trio.

Every upstream byte goes through those functions, so each layout compiles, once,
a decoding function specialised to its fields (as attrs and namedtuple generate
their `__init__`); only integers and generated names are formatted into its source.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from tlvproxy.framing.frame import DEFAULT_MAX_BODY, END_BYTE, START_BYTE, Frame

if TYPE_CHECKING:
    from tlvproxy.framing.frame import ConnectionClosed, NeedData

FieldType = Literal["u8", "u16", "u32", "u64"]
_STRUCT_CODES: Final[dict[str, str]] = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}
_FIELD_BITS: Final[dict[str, int]] = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}
# Fields the gateway fills itself (docs/protocol.md "Custom header layouts"); any other
# field is sent as its `value` or 0.
_FRAME_FIELDS: Final = ("command", "seq", "uid", "flags", "status")
_REQUIRED: Final = ("command", "seq", "length")


@attrs.frozen(slots=True, kw_only=True)
class HeaderField:
    name: str
    type: FieldType
    value: int | None = None

    @property
    def max_value(self) -> int:
        return (1 << _FIELD_BITS[self.type]) - 1


class LayoutError(ValueError):
    """A `framing` section that cannot describe a header."""


def _field_tuple(fields: Iterable[HeaderField]) -> tuple[HeaderField, ...]:
    # A list from a caller would make the layout unhashable; tables compare layouts.
    return tuple(fields)


# The decoder's per-layout functions: `scan(decoder)` is `next_event` of a
# FrameDecoder (decoder.py, which imports this module: typed Any here), and
# `from_wire(frame_bytes)` decodes one complete, checked frame.
_Scan = Callable[[Any], "Frame | NeedData | ConnectionClosed"]
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

"""Writers: a protobuf message -> its proto3 JSON value, specialised per
message type (docs/configuration.md "json").

Owns: for one set of `json` options, a writer per message type, equal to
`json_format.MessageToDict` with the matching flags, built from the
descriptors so that an answer runs straight-line code instead of walking
them. Writers for nested messages are built on first use and then kept.
Must not: do I/O.

A message type's writer is one generated function (protojson.GeneratedSource):
a field's read, test and conversion are a line of it, where a closure per
field cost a call each (2.8 -> 1.7 us for an 11-field message). A 64-bit
integer's string and a double's check are written in line, and a nested
message's writer is called straight once it is built. A map field keeps its
closure.
"""

from __future__ import annotations

import base64
import math
import struct
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast

from tlvproxy.schema.protojson import (
    WELL_KNOWN,
    GeneratedSource,
    T,
    is_map,
    json_format_writer,
)

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor, FieldDescriptor
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message import Message

    from tlvproxy.config.model import JsonOptions
    from tlvproxy.schema.protojson import Convert, Step, Writer

_INT64_KINDS: Final = (T.CPPTYPE_INT64, T.CPPTYPE_UINT64)
_SPECIAL_FLOAT_NAMES: Final = {math.inf: "Infinity", -math.inf: "-Infinity"}
_FLOAT32: Final = struct.Struct("<f")


def _special_float(value: float) -> str:
    return "NaN" if value != value else _SPECIAL_FLOAT_NAMES[value]


def _double_json(value: float) -> float | str:
    # value - value is 0.0 exactly when value is finite.
    return value if value - value == 0.0 else _special_float(value)


def _float_json(value: float) -> float | str:
    """A float32 as json_format prints it: the shortest decimal that rounds back
    to the same float32 (its ToShortestFloat), NaN and infinities as strings."""
    if value - value != 0.0:
        return _special_float(value)
    precision = 6
    rounded = float(f"{value:.{precision}g}")
    while _FLOAT32.unpack(_FLOAT32.pack(rounded))[0] != value:
        precision += 1
        rounded = float(f"{value:.{precision}g}")
    return rounded


def _bytes_json(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _map_key_json(key: object) -> str:
    if key is True:
        return "true"
    if key is False:
        return "false"
    return str(key)


def _float_present(value: float) -> bool:
    # proto3 keeps -0.0 (a non-zero bit pattern), and json_format prints it.
    return bool(value) or math.copysign(1.0, value) < 0


class Writers:
    """The writers of one schema under one set of `json` options: `writer`
    returns the one of a message type, building and keeping it (and, on first
    use, those of its nested types)."""

    def __init__(self, options: JsonOptions, pool: DescriptorPool) -> None:
        self._emit_defaults = options.emit_defaults
        self._proto_names = options.field_names == "proto"
        self._enum_numbers = options.enums == "number"
        self._json_format = json_format_writer(options, pool)
        self._writers: dict[str, Writer] = {}

    def writer(self, descriptor: Descriptor) -> Writer:
        """message -> its JSON value, as json_format.MessageToDict gives it."""
        write = self._writers.get(descriptor.full_name)
        if write is None:
            write = self._build_writer(descriptor)
            self._writers[descriptor.full_name] = write
        return write

    def _lazy_writer(self, descriptor: Descriptor) -> Writer:
        if descriptor.full_name in WELL_KNOWN:
            return self._json_format
        built: list[Writer] = []

        def write(message: Message) -> Any:
            if not built:
                built.append(self.writer(descriptor))
            return built[0](message)

        return write

    def _build_writer(self, descriptor: Descriptor) -> Writer:
        if descriptor.full_name in WELL_KNOWN:
            return self._json_format
        source = _WriterSource()
        for field in descriptor.fields:
            self._field_writer(field, source)
        return source.finish(descriptor.full_name)

    def _value_writer(self, field: FieldDescriptor) -> Convert | None:
        """How one value of `field` becomes JSON; None when it is already JSON."""
        cpp = field.cpp_type
        if cpp == T.CPPTYPE_MESSAGE:
            assert field.message_type is not None  # a message field
            return self._lazy_writer(field.message_type)
        if cpp in _INT64_KINDS:
            return str
        if cpp == T.CPPTYPE_DOUBLE:
            return _double_json
        if cpp == T.CPPTYPE_FLOAT:
            return _float_json
        if field.type == T.TYPE_BYTES:
            return _bytes_json
        if cpp == T.CPPTYPE_ENUM and not self._enum_numbers:
            enum = field.enum_type
            assert enum is not None  # an enum field
            if enum.full_name == "google.protobuf.NullValue":
                return lambda _: None
            names = {value.number: value.name for value in enum.values}
            # An open enum's unknown number is printed as the number.
            return lambda number: names.get(number, number)
        return None

    def _field_writer(self, field: FieldDescriptor, source: _WriterSource) -> None:
        """Add to `source` the code that writes `field`."""
        key = field.name if self._proto_names else field.json_name
        attr = field.name
        emit = self._emit_defaults
        if is_map(field):
            entry = field.message_type
            assert entry is not None  # a map field
            step = source.name(self._map_writer(key, attr, entry.fields_by_name["value"]))
            source.statement(f"{step}(message, result)")
            return
        value = source.attribute("message", attr)
        entry = field.message_type
        if entry is not None and entry.full_name not in WELL_KNOWN:
            converter: str | None = source.later(partial(self.writer, entry))
            convert: Convert | None = None
        else:
            convert = self._value_writer(field)
            converter = None if convert is None else source.name(convert)

        def written(expression: str) -> str:
            # The two most common conversions in line, without a call.
            if convert is str:  # a 64-bit integer
                return f"f'{{{expression}}}'"
            if convert is _double_json:
                return (
                    f"(number if (number := {expression}) - number == 0.0"
                    f" else {source.name(_special_float)}(number))"
                )
            return expression if converter is None else f"{converter}({expression})"

        if field.is_repeated:

            def listed(values: str) -> str:
                if converter is None:
                    # A slice of a repeated scalar field is a list: half the
                    # time of list(), which iterates it element by element.
                    return f"{values}[:]"
                return f"[{converter}(item) for item in {values}]"

            if emit:
                source.always(key, listed(value))
            else:
                source.statement(
                    f"values = {value}", f"if values: result[{key!r}] = {listed('values')}"
                )
        elif field.has_presence:
            source.statement(f"if message.HasField({attr!r}): result[{key!r}] = {written(value)}")
        elif emit:
            source.always(key, written(value))
        elif field.cpp_type in (T.CPPTYPE_DOUBLE, T.CPPTYPE_FLOAT):
            present = source.name(_float_present)
            source.statement(
                f"value = {value}", f"if {present}(value): result[{key!r}] = {written('value')}"
            )
        else:
            source.statement(f"value = {value}", f"if value: result[{key!r}] = {written('value')}")

    def _map_writer(self, key: str, attr: str, value_field: FieldDescriptor) -> Step:
        emit = self._emit_defaults
        write = self._value_writer(value_field) or _identity

        def write_map(message: Message, result: dict[str, Any]) -> None:
            entries = getattr(message, attr)
            if entries or emit:
                result[key] = {_map_key_json(k): write(v) for k, v in entries.items()}

        return write_map


class _WriterSource(GeneratedSource):
    """The source of one message type's writer, `write(message) -> dict`, as
    it is put together: the fields written whatever their value first, as one
    dict display, then a statement per field, in field order."""

    def __init__(self) -> None:
        super().__init__()
        self._display: list[str] = []
        self._statements: list[str] = []

    def always(self, key: str, expression: str) -> None:
        if self._statements:
            self._statements.append(f"result[{key!r}] = {expression}")
        else:
            self._display.append(f"{key!r}: {expression}")

    def statement(self, *lines: str) -> None:
        self._statements.extend(lines)

    def finish(self, message_name: str) -> Writer:
        self.lines += [
            f"result = {{{', '.join(self._display)}}}",
            *self._statements,
            "return result",
        ]
        return cast("Writer", self.compile("write(message)", f"writer: {message_name}"))


def _identity(value: Any) -> Any:
    return value

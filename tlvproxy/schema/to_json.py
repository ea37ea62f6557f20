"""Writers: a protobuf message -> its proto3 JSON value, specialised per
message type (docs/configuration.md "json").

Owns: for one set of `json` options, a writer per message type, equal to
`json_format.MessageToDict` with the matching flags, built from the
descriptors so that an answer walks precomputed closures instead of them.
Writers for nested messages are built on first use and then kept.
Must not: do I/O.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import TYPE_CHECKING, Any, Final

from tlvproxy.schema.protojson import WELL_KNOWN, T, is_map, json_format_writer

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
        steps = tuple(self._field_writer(field) for field in descriptor.fields)

        def write(message: Message) -> dict[str, Any]:
            result: dict[str, Any] = {}
            for step in steps:
                step(message, result)
            return result

        return write

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

    def _field_writer(self, field: FieldDescriptor) -> Step:
        key = field.name if self._proto_names else field.json_name
        attr = field.name
        emit = self._emit_defaults
        if is_map(field):
            entry = field.message_type
            assert entry is not None  # a map field
            return self._map_writer(key, attr, entry.fields_by_name["value"])
        convert = self._value_writer(field)
        if field.is_repeated:
            if convert is None:

                def repeated_plain(message: Message, result: dict[str, Any]) -> None:
                    values = getattr(message, attr)
                    if values or emit:
                        result[key] = list(values)

                return repeated_plain

            def repeated(message: Message, result: dict[str, Any]) -> None:
                values = getattr(message, attr)
                if values or emit:
                    result[key] = [convert(value) for value in values]

            return repeated
        write = convert if convert is not None else _identity
        if field.has_presence:

            def present(message: Message, result: dict[str, Any]) -> None:
                if message.HasField(attr):
                    result[key] = write(getattr(message, attr))

            return present
        if emit:

            def always(message: Message, result: dict[str, Any]) -> None:
                result[key] = write(getattr(message, attr))

            return always
        if field.cpp_type in (T.CPPTYPE_DOUBLE, T.CPPTYPE_FLOAT):

            def floating(message: Message, result: dict[str, Any]) -> None:
                value = getattr(message, attr)
                if _float_present(value):
                    result[key] = write(value)

            return floating
        if convert is None:

            def plain(message: Message, result: dict[str, Any]) -> None:
                value = getattr(message, attr)
                if value:
                    result[key] = value

            return plain

        def converted(message: Message, result: dict[str, Any]) -> None:
            value = getattr(message, attr)
            if value:
                result[key] = write(value)

        return converted

    def _map_writer(self, key: str, attr: str, value_field: FieldDescriptor) -> Step:
        emit = self._emit_defaults
        write = self._value_writer(value_field) or _identity

        def write_map(message: Message, result: dict[str, Any]) -> None:
            entries = getattr(message, attr)
            if entries or emit:
                result[key] = {_map_key_json(k): write(v) for k, v in entries.items()}

        return write_map


def _identity(value: Any) -> Any:
    return value

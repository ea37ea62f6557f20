"""Protobuf <-> proto3 JSON converters specialised per message type
(docs/configuration.md "json").

Owns: for one set of `json` options, a writer per message type (message -> JSON
dict, equal to `json_format.MessageToDict` with the matching flags) and a fast
reader per message type (JSON value -> message, and REST overlays), built from
the descriptors when a codec is made, so a request walks precomputed closures
instead of the descriptors (issue 10: json_format costs ~35 us a round trip).
Must not: do I/O, write error messages, or decide what input is valid. The
codec's generic reader is the reference for both: a fast reader that meets
anything but the plain accepted case (a wrong type, null, an unknown field, a
duplicate key, two members of a oneof, too deep a body, ...) raises `Fallback`,
and the codec runs the generic reader over a fresh message, which then builds
the message or raises the BadRequest naming the field.

Well-known types (Timestamp, Struct, wrappers, ...) go through json_format for
that field, both ways. Converters for nested messages are built on first use and
then kept, so loading a table with deep message chains stays cheap and a
recursive message type needs no special case.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from google.protobuf.descriptor import Descriptor
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message import Message

    from tlvproxy.config.model import JsonOptions

    Writer = Callable[[Message], Any]
    Merge = Callable[[object, Message, int], None]
    Overlay = Callable[[Message, Mapping[str, str]], None]
    _Step = Callable[[Message, dict[str, Any]], None]
    _SetField = Callable[[Message, Any, int], None]
    _SetText = Callable[[Message, str], None]
    _Convert = Callable[[Any], Any]

# Same bound as json_format's max_recursion_depth: deeper bodies are refused
# rather than risking Python's recursion limit on recursive message types.
MAX_DEPTH: Final = 100

# Messages whose JSON form is not an object of their fields (proto3 JSON mapping).
WELL_KNOWN: Final = frozenset(
    "google.protobuf." + name
    for name in (
        "Any",
        "Duration",
        "FieldMask",
        "Timestamp",
        "Struct",
        "Value",
        "ListValue",
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
)

_T = FieldDescriptor
INT_RANGES: Final = {
    _T.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    _T.CPPTYPE_UINT32: (0, 2**32 - 1),
    _T.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    _T.CPPTYPE_UINT64: (0, 2**64 - 1),
}
# The smallest magnitude that rounds to infinity as a float32 (halfway between
# the largest float32 and 2**128; ties go to the even 2**128). json_format prints
# the largest float32 as 3.4028235e+38, above it, and must read back.
FLOAT32_LIMIT: Final = float(2**128 - 2**103)
INTEGER_TEXT: Final = re.compile(r"-?[0-9]+")
# The longest integer text a 64-bit field can hold ("-9223372036854775808"), plus
# room for leading zeros; longer texts go to the generic reader, whose int() would
# otherwise hit Python's digit limit.
_MAX_INTEGER_TEXT: Final = 24
_INT64_KINDS: Final = (_T.CPPTYPE_INT64, _T.CPPTYPE_UINT64)
_SPECIAL_FLOAT_NAMES: Final = {math.inf: "Infinity", -math.inf: "-Infinity"}
_SPECIAL_FLOATS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT32: Final = struct.Struct("<f")


# What ParseDict raises on bad input: json_format.Parse wraps any exception of
# ParseDict in ParseError, but ParseDict itself lets some through (a wrapper
# type given "x" raises ValueError from int()).
PARSE_DICT_ERRORS: Final = (json_format.ParseError, ValueError, TypeError, AttributeError)


class Fallback(Exception):
    """The fast reader cannot vouch for this input; run the generic reader."""


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional. Raises ValueError."""
    padded = text + "=" * (-len(text) % 4)
    if "-" in text or "_" in text:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    return base64.b64decode(padded, validate=True)


def json_format_writer(options: JsonOptions, pool: DescriptorPool) -> Writer:
    """The reference writer: `json_format.MessageToDict` with the options' flags."""
    emit_defaults = options.emit_defaults
    proto_names = options.field_names == "proto"
    enum_numbers = options.enums == "number"

    def write(message: Message) -> Any:
        return json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=emit_defaults,
            preserving_proto_field_name=proto_names,
            use_integers_for_enums=enum_numbers,
            descriptor_pool=pool,
        )

    return write


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def _is_real_oneof_member(field: FieldDescriptor) -> bool:
    # A proto3 `optional` field sits in a one-member synthetic oneof.
    oneof = field.containing_oneof
    return oneof is not None and not (len(oneof.fields) == 1 and oneof.name == f"_{field.name}")


# ---------------------------------------------------------------- writing


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


# ---------------------------------------------------------------- reading


def _int_reader(low: int, high: int) -> _Convert:
    def read(value: Any) -> int:
        kind = type(value)
        if kind is int:
            if low <= value <= high:
                return int(value)
        elif (
            kind is str
            and len(value) <= _MAX_INTEGER_TEXT
            and INTEGER_TEXT.fullmatch(value) is not None
        ):
            number = int(value)
            if low <= number <= high:
                return number
        raise Fallback

    return read


def _int_text_reader(low: int, high: int) -> _Convert:
    def read(text: Any) -> int:
        if (
            type(text) is str
            and len(text) <= _MAX_INTEGER_TEXT
            and INTEGER_TEXT.fullmatch(text) is not None
        ):
            number = int(text)
            if low <= number <= high:
                return number
        raise Fallback

    return read


def _double_reader(value: Any) -> float:
    kind = type(value)
    if kind is float:
        return float(value)
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            raise Fallback from None
    if kind is str:
        # The strings json_format writes for what JSON numbers cannot hold.
        special = _SPECIAL_FLOATS.get(value)
        if special is not None:
            return special
    raise Fallback


def _float_reader(value: Any) -> float:
    number = _double_reader(value)
    if type(value) is str:  # "NaN", "Infinity", "-Infinity"
        return number
    if abs(number) >= FLOAT32_LIMIT:
        raise Fallback
    return number


def _bool_reader(value: Any) -> bool:
    if type(value) is bool:
        return bool(value)
    raise Fallback


def _bool_text_reader(text: Any) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise Fallback


def _string_reader(value: Any) -> str:
    if type(value) is str:
        return str(value)
    raise Fallback


def _bytes_reader(value: Any) -> bytes:
    if type(value) is str:
        try:
            return decode_base64(value)
        except ValueError:  # binascii.Error is one
            raise Fallback from None
    raise Fallback


def _enum_reader(field: FieldDescriptor, from_text: bool) -> _Convert:
    enum = field.enum_type
    assert enum is not None  # an enum field
    numbers = {value.name: value.number for value in enum.values}
    low, high = INT_RANGES[_T.CPPTYPE_INT32]
    # proto3 enums are open: any int32 is kept; proto2 (closed) ones are not.
    known = frozenset(numbers.values()) if enum.is_closed else None

    def read(value: Any) -> int:
        if type(value) is str:
            number = numbers.get(value)
            if number is not None:
                return number
        elif (
            not from_text
            and type(value) is int
            and low <= value <= high
            and (known is None or value in known)
        ):
            return int(value)
        raise Fallback

    return read


# ---------------------------------------------------------------- per message type


class Converters:
    """The writers and fast readers of one schema under one set of `json` options.

    `writer`, `reader` and `overlay` return the converter for a message type,
    building and keeping it (and, on first use, those of its nested types).
    """

    def __init__(self, options: JsonOptions, pool: DescriptorPool) -> None:
        self._emit_defaults = options.emit_defaults
        self._proto_names = options.field_names == "proto"
        self._enum_numbers = options.enums == "number"
        self._ignore_unknown = options.ignore_unknown_fields
        self._pool = pool
        self._json_format = json_format_writer(options, pool)
        self._writers: dict[str, Writer] = {}
        self._readers: dict[str, Merge] = {}
        self._overlays: dict[str, Overlay] = {}

    # ------------------------------------------------------------ writers

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

    def _value_writer(self, field: FieldDescriptor) -> _Convert | None:
        """How one value of `field` becomes JSON; None when it is already JSON."""
        cpp = field.cpp_type
        if cpp == _T.CPPTYPE_MESSAGE:
            assert field.message_type is not None  # a message field
            return self._lazy_writer(field.message_type)
        if cpp in _INT64_KINDS:
            return str
        if cpp == _T.CPPTYPE_DOUBLE:
            return _double_json
        if cpp == _T.CPPTYPE_FLOAT:
            return _float_json
        if field.type == _T.TYPE_BYTES:
            return _bytes_json
        if cpp == _T.CPPTYPE_ENUM and not self._enum_numbers:
            enum = field.enum_type
            assert enum is not None  # an enum field
            if enum.full_name == "google.protobuf.NullValue":
                return lambda _: None
            names = {value.number: value.name for value in enum.values}
            # An open enum's unknown number is printed as the number.
            return lambda number: names.get(number, number)
        return None

    def _field_writer(self, field: FieldDescriptor) -> _Step:
        key = field.name if self._proto_names else field.json_name
        attr = field.name
        emit = self._emit_defaults
        if _is_map(field):
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
        if field.cpp_type in (_T.CPPTYPE_DOUBLE, _T.CPPTYPE_FLOAT):

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

    def _map_writer(self, key: str, attr: str, value_field: FieldDescriptor) -> _Step:
        emit = self._emit_defaults
        write = self._value_writer(value_field) or _identity

        def write_map(message: Message, result: dict[str, Any]) -> None:
            entries = getattr(message, attr)
            if entries or emit:
                result[key] = {_map_key_json(k): write(v) for k, v in entries.items()}

        return write_map

    # ------------------------------------------------------------ readers

    def reader(self, descriptor: Descriptor) -> Merge:
        """merge(value, message, depth): merge a JSON value into `message`, a
        `descriptor` message at nesting `depth`. Raises Fallback."""
        merge = self._readers.get(descriptor.full_name)
        if merge is None:
            merge = self._build_reader(descriptor)
            self._readers[descriptor.full_name] = merge
        return merge

    def _lazy_reader(self, descriptor: Descriptor) -> Merge:
        built: list[Merge] = []

        def merge(value: object, message: Message, depth: int) -> None:
            if not built:
                built.append(self.reader(descriptor))
            built[0](value, message, depth)

        return merge

    def _well_known_reader(self) -> Merge:
        ignore_unknown, pool = self._ignore_unknown, self._pool

        def merge(value: object, message: Message, depth: int) -> None:
            try:
                json_format.ParseDict(
                    value,  # type: ignore[arg-type]  # well-known types take any JSON value
                    message,
                    ignore_unknown_fields=ignore_unknown,
                    descriptor_pool=pool,
                )
            except PARSE_DICT_ERRORS:
                raise Fallback from None

        return merge

    def _build_reader(self, descriptor: Descriptor) -> Merge:
        if descriptor.full_name in WELL_KNOWN:
            return self._well_known_reader()
        setters: dict[str, _SetField] = {}
        for field in descriptor.fields:
            setter = self._field_reader(field)
            setters[field.name] = setter
            setters[field.json_name] = setter
        # A body may hold only one of a field's two spellings, and only one
        # spelling of one member of a oneof.
        spellings = tuple((f.name, f.json_name) for f in descriptor.fields if f.name != f.json_name)
        oneofs = tuple(
            frozenset(k for f in members for k in (f.name, f.json_name))
            for members in (
                [f for f in oneof.fields if _is_real_oneof_member(f)] for oneof in descriptor.oneofs
            )
            if len(members) > 1
        )
        checked = bool(spellings or oneofs)
        ignore_unknown = self._ignore_unknown

        def merge(value: object, message: Message, depth: int) -> None:
            if type(value) is not dict or depth >= MAX_DEPTH:
                raise Fallback
            message.SetInParent()
            for key, item in value.items():
                setter = setters.get(key)
                if setter is None:
                    if ignore_unknown:
                        continue
                    raise Fallback
                if item is None:
                    raise Fallback
                setter(message, item, depth)
            if checked and len(value) > 1:
                for name, json_name in spellings:
                    if name in value and json_name in value:
                        raise Fallback
                for keys in oneofs:
                    if len(keys.intersection(value)) > 1:
                        raise Fallback

        return merge

    def _scalar_reader(self, field: FieldDescriptor) -> _Convert:
        cpp = field.cpp_type
        if cpp in INT_RANGES:
            return _int_reader(*INT_RANGES[cpp])
        if cpp == _T.CPPTYPE_DOUBLE:
            return _double_reader
        if cpp == _T.CPPTYPE_FLOAT:
            return _float_reader
        if cpp == _T.CPPTYPE_BOOL:
            return _bool_reader
        if cpp == _T.CPPTYPE_ENUM:
            return _enum_reader(field, from_text=False)
        if field.type == _T.TYPE_BYTES:
            return _bytes_reader
        return _string_reader

    def _field_reader(self, field: FieldDescriptor) -> _SetField:
        attr = field.name
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            return self._map_reader(attr, entry)
        if entry is not None:
            merge = self._lazy_reader(entry)
            if field.is_repeated:

                def messages(message: Message, value: Any, depth: int) -> None:
                    if type(value) is not list:
                        raise Fallback
                    add = getattr(message, attr).add
                    for item in value:
                        if item is None:
                            raise Fallback
                        merge(item, add(), depth + 1)

                return messages

            def nested(message: Message, value: Any, depth: int) -> None:
                merge(value, getattr(message, attr), depth + 1)

            return nested
        read = self._scalar_reader(field)
        # A string protobuf cannot encode (a lone surrogate) raises
        # UnicodeEncodeError; the generic reader names the field.
        if field.is_repeated:

            def scalars(message: Message, value: Any, depth: int) -> None:
                if type(value) is not list:
                    raise Fallback
                try:
                    getattr(message, attr).extend([read(item) for item in value])
                except UnicodeEncodeError:
                    raise Fallback from None

            return scalars

        if read is _string_reader:

            def string(message: Message, value: Any, depth: int) -> None:
                if type(value) is not str:
                    raise Fallback
                try:
                    setattr(message, attr, value)
                except UnicodeEncodeError:
                    raise Fallback from None

            return string

        def scalar(message: Message, value: Any, depth: int) -> None:
            try:
                setattr(message, attr, read(value))
            except UnicodeEncodeError:
                raise Fallback from None

        return scalar

    def _map_reader(self, attr: str, entry: Descriptor) -> _SetField:
        key_field = entry.fields_by_name["key"]
        value_field = entry.fields_by_name["value"]
        read_key = _text_reader(key_field)
        if value_field.message_type is not None:
            merge = self._lazy_reader(value_field.message_type)

            def messages(message: Message, value: Any, depth: int) -> None:
                if type(value) is not dict:
                    raise Fallback
                container = getattr(message, attr)
                for key, item in value.items():
                    if item is None:
                        raise Fallback
                    try:
                        entry = container[read_key(key)]
                    except UnicodeEncodeError:
                        raise Fallback from None
                    merge(item, entry, depth + 1)

            return messages
        read = self._scalar_reader(value_field)

        def scalars(message: Message, value: Any, depth: int) -> None:
            if type(value) is not dict:
                raise Fallback
            container = getattr(message, attr)
            try:
                for key, item in value.items():
                    container[read_key(key)] = read(item)
            except UnicodeEncodeError:
                raise Fallback from None

        return scalars

    # ------------------------------------------------------------ overlays

    def overlay(self, descriptor: Descriptor) -> Overlay:
        """overlay(message, values): set top-level fields from strings (query,
        path, `fields`), ignoring names that are not fields. Raises Fallback."""
        overlay = self._overlays.get(descriptor.full_name)
        if overlay is None:
            overlay = self._build_overlay(descriptor)
            self._overlays[descriptor.full_name] = overlay
        return overlay

    def _build_overlay(self, descriptor: Descriptor) -> Overlay:
        setters: dict[str, _SetText] = {}
        for field in descriptor.fields:
            setter = _text_setter(field)
            setters[field.name] = setter
            setters[field.json_name] = setter

        def overlay(message: Message, values: Mapping[str, str]) -> None:
            for key, text in values.items():
                setter = setters.get(key)
                if setter is not None:
                    setter(message, text)

        return overlay


def _identity(value: Any) -> Any:
    return value


def _refuse(message: Message, text: str) -> None:
    raise Fallback


def _text_reader(field: FieldDescriptor) -> _Convert:
    """A map key or an overlay string as the value of scalar `field`; only the
    forms the fast path handles (strings, integers, booleans, enum names)."""
    cpp = field.cpp_type
    if cpp in INT_RANGES:
        return _int_text_reader(*INT_RANGES[cpp])
    if cpp == _T.CPPTYPE_BOOL:
        return _bool_text_reader
    if cpp == _T.CPPTYPE_ENUM:
        return _enum_reader(field, from_text=True)
    if cpp == _T.CPPTYPE_STRING and field.type != _T.TYPE_BYTES:
        return _string_reader
    return _refuse_value


def _refuse_value(value: Any) -> Any:
    raise Fallback


def _text_setter(field: FieldDescriptor) -> _SetText:
    read = _text_reader(field)
    if field.is_repeated or field.message_type is not None or read is _refuse_value:
        return _refuse
    attr = field.name

    def set_text(message: Message, text: str) -> None:
        try:
            setattr(message, attr, read(text))
        except UnicodeEncodeError:
            raise Fallback from None

    return set_text

"""Fast readers: a JSON value -> a protobuf message, and REST overlays,
specialised per message type (docs/configuration.md "json").

Owns: for one set of `json` options, a reader and an overlay per message type,
built from the descriptors so that a request does not walk them: a reader is
one generated function, as a writer is (to_json.py), and a body holding few
of its type's fields goes to closures keyed by field name instead. A reader
meets only the plain accepted case; anything else (a wrong type, null, an
unknown field, a duplicate key, two members of a oneof, too deep a body, ...)
raises `Fallback`, and the codec's generic reader (codec.py) decides, words
the error, or builds the message.
Must not: do I/O, write error messages, or decide what input is valid.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format

from tlvproxy.schema.protojson import (
    FLOAT32_LIMIT,
    INT_RANGES,
    INTEGER_TEXT,
    MAX_DEPTH,
    PARSE_DICT_ERRORS,
    WELL_KNOWN,
    Fallback,
    GeneratedSource,
    T,
    decode_base64,
    is_real_oneof_member,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from google.protobuf.descriptor import Descriptor, FieldDescriptor
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message import Message

    from tlvproxy.config.model import JsonOptions
    from tlvproxy.schema.protojson import Convert, Merge, Overlay, SetField, SetText

# The longest integer text a 64-bit field can hold ("-9223372036854775808"), plus
# room for leading zeros; longer texts go to the generic reader, whose int() would
# otherwise hit Python's digit limit.
_MAX_INTEGER_TEXT: Final = 24
_SPECIAL_FLOATS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _int_reader(low: int, high: int) -> Convert:
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


def _int_text_reader(low: int, high: int) -> Convert:
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
        # value - value is 0.0 exactly when value is finite. A number that is
        # not (1e400 read by the json module, YAML's .inf) is refused.
        if value - value == 0.0:
            return float(value)
        raise Fallback
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


def _enum_reader(field: FieldDescriptor, from_text: bool) -> Convert:
    enum = field.enum_type
    assert enum is not None  # an enum field
    numbers = {value.name: value.number for value in enum.values}
    low, high = INT_RANGES[T.CPPTYPE_INT32]
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


# The codec reads a request body with orjson alone, which reads an integer
# outside 64 bits as the nearest float, of this magnitude at least; and
# json_format takes a whole float for an Int64Value, or for an int64 field of
# a message in an Any. A well-known value holding such a float goes to the
# generic reader, which the codec gives the body read again exactly.
_INEXACT_FROM: Final = float(2**63)


def _holds_inexact_number(value: object) -> bool:
    """Whether `value` holds a float of `_INEXACT_FROM` or more in magnitude."""
    todo = [value]
    while todo:
        item = todo.pop()
        if type(item) is float:
            if not -_INEXACT_FROM < item < _INEXACT_FROM:
                return True
        elif type(item) is dict:
            todo.extend(item.values())
        elif type(item) is list:
            todo.extend(item)
    return False


# A body holding under one in `_SPARSE` of its type's fields goes to the
# dispatching reader. The generated reader looks each field up, about 0.05 us
# for one the body does not hold, and saves up to 0.15 us on one it holds.
_SPARSE: Final = 3
# What `dict.get` gives for a key the body does not hold (null is a value).
_MISSING: Final = object()


def _two_members(oneofs: tuple[frozenset[str], ...], value: dict[str, Any]) -> bool:
    """Whether `value` holds two members (or spellings) of one oneof."""
    return any(len(keys.intersection(value)) > 1 for keys in oneofs)


def _dispatching_reader(
    setters: dict[str, SetField],
    spellings: tuple[tuple[str, str], ...],
    oneofs: tuple[frozenset[str], ...],
    ignore_unknown: bool,
) -> Merge:
    """merge(value, message, depth) key by key: each key's setter from `setters`."""
    checked = bool(spellings or oneofs)

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
            if _two_members(oneofs, value):
                raise Fallback

    return merge


class Readers:
    """The fast readers and overlays of one schema under one set of `json`
    options: `reader` and `overlay` return those of a message type, building
    and keeping them (and, on first use, those of its nested types)."""

    def __init__(self, options: JsonOptions, pool: DescriptorPool) -> None:
        self._ignore_unknown = options.ignore_unknown_fields
        self._proto_names = options.field_names == "proto"
        self._pool = pool
        self._readers: dict[str, Merge] = {}
        self._overlays: dict[str, Overlay] = {}

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
            if _holds_inexact_number(value):
                raise Fallback
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
        setters: dict[str, SetField] = {}
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
                [f for f in oneof.fields if is_real_oneof_member(f)] for oneof in descriptor.oneofs
            )
            if len(members) > 1
        )
        dispatching = _dispatching_reader(setters, spellings, oneofs, self._ignore_unknown)
        spelled = sum(1 if f.name == f.json_name else 2 for f in descriptor.fields)
        if len(setters) != spelled:
            # Two fields share a spelling (proto2 allows it): only the
            # dispatching reader, key by key, sees which one a key means.
            return dispatching
        return self._generated_reader(descriptor, setters, dispatching, spellings, oneofs)

    def _generated_reader(
        self,
        descriptor: Descriptor,
        setters: dict[str, SetField],
        dispatching: Merge,
        spellings: tuple[tuple[str, str], ...],
        oneofs: tuple[frozenset[str], ...],
    ) -> Merge:
        """merge(value, message, depth) as one generated function that looks
        each field up in `value`, in field order: 2.7 us where the dispatching
        reader took 3.8 for an 11-field message with 8 fields in the body.
        A body holding few of many fields goes to the dispatching reader,
        which pays for the keys the body holds instead of the fields."""
        source = GeneratedSource()
        fallback = source.name(Fallback)
        missing = source.name(_MISSING)
        fields = descriptor.fields
        lines = source.lines
        lines.append(f"if type(value) is not dict or depth >= {MAX_DEPTH}:")
        lines.append(f"    raise {fallback}")
        lines.append(f"if len(value) * {_SPARSE} < {len(fields)}:")
        lines.append(f"    return {source.name(dispatching)}(value, message, depth)")
        lines.extend(("message.SetInParent()", "get = value.get", "found = 0"))
        for field in fields:
            # The spelling the answers use first: callers tend to send it.
            first, second = field.json_name, field.name
            if self._proto_names:
                first, second = second, first
            lines.append(f"item = get({first!r}, {missing})")
            if first != second:
                lines.append(f"if item is {missing}:")
                lines.append(f"    item = get({second!r}, {missing})")
            lines.append(f"if item is not {missing}:")
            lines.append("    found += 1")
            field_lines = self._field_lines(field, setters, source, fallback)
            lines.extend(f"    {line}" for line in field_lines)
        lines.append("if found != len(value):")
        if not self._ignore_unknown:
            # A key that is no field's.
            lines.append(f"    raise {fallback}")
        elif spellings:
            for name, json_name in spellings:
                lines.append(f"    if {name!r} in value and {json_name!r} in value:")
                lines.append(f"        raise {fallback}")
        else:
            lines.append("    pass")
        if oneofs:
            lines.append(f"if len(value) > 1 and {source.name(_two_members)}({oneofs!r}, value):")
            lines.append(f"    raise {fallback}")
        return source.compile("merge(value, message, depth)", f"reader: {descriptor.full_name}")

    def _field_lines(
        self,
        field: FieldDescriptor,
        setters: dict[str, SetField],
        source: GeneratedSource,
        fallback: str,
    ) -> list[str]:
        """The lines that set `field` of `message` from `item`, a value the
        body holds for it (null included), or raise `fallback`."""
        target = source.attribute("message", field.name)
        assignment = source.assignment("message", field.name, "item")
        entry = field.message_type
        if field.is_repeated or entry is not None:
            # Null is never the plain case (a well-known type may take it).
            lines = ["if item is None:", f"    raise {fallback}"]
            if entry is not None and not field.is_repeated:
                merge = source.later(partial(self.reader, entry))
                lines.append(f"{merge}(item, {target}, depth + 1)")
            elif entry is None and self._scalar_reader(field) is _string_reader:
                lines += [
                    "if type(item) is not list:",
                    f"    raise {fallback}",
                    "for element in item:",
                    "    if type(element) is not str:",
                    f"        raise {fallback}",
                    "try:",
                    f"    {target}.extend(item)",
                    "except UnicodeEncodeError:",
                    f"    raise {fallback} from None",
                ]
            else:
                lines.append(f"{source.name(setters[field.name])}(message, item, depth)")
            return lines
        read = self._scalar_reader(field)
        converted = f"item = {source.name(read)}(item)"
        cpp = field.cpp_type
        # The usual value, a JSON value of the field's own Python type, is set as
        # it is; any other goes through its reader, which converts it or refuses.
        if cpp in INT_RANGES:
            low, high = INT_RANGES[cpp]
            test = f"type(item) is not int or not {low} <= item <= {high}"
        elif cpp == T.CPPTYPE_FLOAT:
            limit = source.name(FLOAT32_LIMIT)
            test = f"type(item) is not float or not -{limit} < item < {limit}"
        elif cpp == T.CPPTYPE_DOUBLE:
            # item - item is 0.0 exactly when item is finite.
            test = "type(item) is not float or item - item != 0.0"
        elif cpp == T.CPPTYPE_BOOL:
            test = "type(item) is not bool"
        elif read is _string_reader:
            test, converted = "type(item) is not str", f"raise {fallback}"
        else:
            test = ""
        lines = [f"if {test}:", f"    {converted}"] if test else [converted]
        if cpp != T.CPPTYPE_STRING:
            return [*lines, assignment]
        # A string protobuf cannot encode (a lone surrogate) raises
        # UnicodeEncodeError; the generic reader names the field.
        return [
            *lines,
            "try:",
            f"    {assignment}",
            "except UnicodeEncodeError:",
            f"    raise {fallback} from None",
        ]

    def _scalar_reader(self, field: FieldDescriptor) -> Convert:
        cpp = field.cpp_type
        if cpp in INT_RANGES:
            return _int_reader(*INT_RANGES[cpp])
        if cpp == T.CPPTYPE_DOUBLE:
            return _double_reader
        if cpp == T.CPPTYPE_FLOAT:
            return _float_reader
        if cpp == T.CPPTYPE_BOOL:
            return _bool_reader
        if cpp == T.CPPTYPE_ENUM:
            return _enum_reader(field, from_text=False)
        if field.type == T.TYPE_BYTES:
            return _bytes_reader
        return _string_reader

    def _field_reader(self, field: FieldDescriptor) -> SetField:
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

        # The usual value, a JSON value of the field's own Python type, is set as
        # it is; any other goes through `read`, which converts it or refuses.
        cpp = field.cpp_type
        if cpp in INT_RANGES:
            low, high = INT_RANGES[cpp]

            def integer(message: Message, value: Any, depth: int) -> None:
                if type(value) is not int or not low <= value <= high:
                    value = read(value)
                setattr(message, attr, value)

            return integer
        if cpp == T.CPPTYPE_FLOAT:

            def float32(message: Message, value: Any, depth: int) -> None:
                if type(value) is not float or not -FLOAT32_LIMIT < value < FLOAT32_LIMIT:
                    value = read(value)
                setattr(message, attr, value)

            return float32
        if cpp == T.CPPTYPE_DOUBLE:

            def double(message: Message, value: Any, depth: int) -> None:
                if type(value) is not float or value - value != 0.0:
                    value = read(value)
                setattr(message, attr, value)

            return double
        if cpp == T.CPPTYPE_BOOL:

            def boolean(message: Message, value: Any, depth: int) -> None:
                if type(value) is not bool:
                    value = read(value)
                setattr(message, attr, value)

            return boolean
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

    def _map_reader(self, attr: str, entry: Descriptor) -> SetField:
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
        setters: dict[str, SetText] = {}
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


def _refuse(message: Message, text: str) -> None:
    raise Fallback


def _text_reader(field: FieldDescriptor) -> Convert:
    """A map key or an overlay string as the value of scalar `field`; only the
    forms the fast path handles (strings, integers, booleans, enum names)."""
    cpp = field.cpp_type
    if cpp in INT_RANGES:
        return _int_text_reader(*INT_RANGES[cpp])
    if cpp == T.CPPTYPE_BOOL:
        return _bool_text_reader
    if cpp == T.CPPTYPE_ENUM:
        return _enum_reader(field, from_text=True)
    if cpp == T.CPPTYPE_STRING and field.type != T.TYPE_BYTES:
        return _string_reader
    return _refuse_value


def _refuse_value(value: Any) -> Any:
    raise Fallback


def _text_setter(field: FieldDescriptor) -> SetText:
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

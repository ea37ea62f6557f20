"""The generic reader: a JSON value -> a protobuf message, field by field
through the descriptors (docs/reference.md "Mapping", docs/configuration.md "json").

Owns: what input a `protobuf` command accepts, and every error message about a
body that does not fit its message, naming the field's path. It is the
reference the fast readers (from_json.py) fall back to for anything but
plainly valid input.
Must not: do I/O.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tlvproxy.errors import BadRequest
from tlvproxy.schema.json_text import show
from tlvproxy.schema.protojson import (
    FLOAT32_LIMIT,
    INT_RANGES,
    INTEGER_TEXT,
    MAX_DEPTH,
    PARSE_DICT_ERRORS,
    WELL_KNOWN,
    decode_base64,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from google.protobuf.descriptor import EnumDescriptor
    from google.protobuf.message import Message

    from tlvproxy.schema.protos import Schema

_T = FieldDescriptor
_TYPE_NAMES: Final = {
    _T.TYPE_DOUBLE: "double",
    _T.TYPE_FLOAT: "float",
    _T.TYPE_INT64: "int64",
    _T.TYPE_UINT64: "uint64",
    _T.TYPE_INT32: "int32",
    _T.TYPE_FIXED64: "fixed64",
    _T.TYPE_FIXED32: "fixed32",
    _T.TYPE_BOOL: "bool",
    _T.TYPE_STRING: "string",
    _T.TYPE_BYTES: "bytes",
    _T.TYPE_UINT32: "uint32",
    _T.TYPE_SFIXED32: "sfixed32",
    _T.TYPE_SFIXED64: "sfixed64",
    _T.TYPE_SINT32: "sint32",
    _T.TYPE_SINT64: "sint64",
}
_SPECIAL_FLOATS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NOT_FINITE: Final = (
    ' (a number must be finite: write "NaN", "Infinity" or "-Infinity" as a string)'
)


class _Invalid(Exception):
    """A JSON value that does not fit a field; becomes a BadRequest naming the path."""

    def __init__(self, expected: str, value: object, note: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value
        self.note = note


class _Skip(Exception):
    """An unknown enum name under ignore_unknown_fields: the field stays unset."""


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    enum = field.enum_type
    if enum is None:
        raise TypeError(f"{field.full_name} is not an enum field")
    return enum


def _describe_type(field: FieldDescriptor) -> str:
    if field.type == _T.TYPE_ENUM:
        enum = _enum_type(field)
        names = [v.name for v in enum.values]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return f"an enum {enum.full_name} ({shown}, or its number)"
    if field.message_type is not None:
        return f"an object ({field.message_type.full_name})"
    kind = _TYPE_NAMES.get(field.type, "value")
    if field.cpp_type in INT_RANGES:
        return f"an integer ({kind})"
    if field.cpp_type in (_T.CPPTYPE_DOUBLE, _T.CPPTYPE_FLOAT):
        return f"a number ({kind})"
    if field.type == _T.TYPE_BOOL:
        return "a boolean (true or false)"
    if field.type == _T.TYPE_BYTES:
        return "a base64 string (bytes)"
    return "a string"


def _integer(field: FieldDescriptor, value: object) -> int:
    if isinstance(value, bool):
        raise _Invalid(_describe_type(field), value)
    if isinstance(value, int):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and INTEGER_TEXT.fullmatch(value)
    ):
        try:
            number = int(value)
        except ValueError:
            # More digits than int() converts (sys.get_int_max_str_digits).
            raise _Invalid(_describe_type(field), value, " (too many digits)") from None
    else:
        raise _Invalid(_describe_type(field), value)
    low, high = INT_RANGES[field.cpp_type]
    if not low <= number <= high:
        raise _Invalid(_describe_type(field), value, f" (out of range {low}..{high})")
    return number


def _floating(field: FieldDescriptor, value: object) -> float:
    if isinstance(value, bool):
        raise _Invalid(_describe_type(field), value)
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise _Invalid(_describe_type(field), value, " (out of range)") from None
        if not math.isfinite(number):
            # 1e400 as the json module reads it, or YAML's .inf and .nan.
            raise _Invalid(_describe_type(field), value, _NOT_FINITE)
    elif isinstance(value, str) and value in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value]
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _Invalid(_describe_type(field), value) from None
        if not math.isfinite(number):
            raise _Invalid(_describe_type(field), value)
    else:
        raise _Invalid(_describe_type(field), value)
    if field.cpp_type == _T.CPPTYPE_FLOAT and abs(number) >= FLOAT32_LIMIT:
        raise _Invalid(_describe_type(field), value, " (out of range for float)")
    return number


def _scalar(field: FieldDescriptor, value: object, from_text: bool, ignore_unknown: bool) -> Any:
    """A JSON value (or an overlay string when `from_text`) as the field's Python value.

    Raises _Invalid, or _Skip for an unknown enum name under ignore_unknown.
    """
    cpp = field.cpp_type
    if cpp in INT_RANGES:
        return _integer(field, value)
    if cpp in (_T.CPPTYPE_DOUBLE, _T.CPPTYPE_FLOAT):
        return _floating(field, value)
    if cpp == _T.CPPTYPE_BOOL:
        if isinstance(value, bool):
            return value
        if from_text and value in ("true", "false"):
            return value == "true"
        raise _Invalid(_describe_type(field), value)
    if cpp == _T.CPPTYPE_ENUM:
        return _enum(field, value, from_text, ignore_unknown)
    if not isinstance(value, str):
        raise _Invalid(_describe_type(field), value)
    if field.type == _T.TYPE_BYTES:
        try:
            return decode_base64(value)
        except ValueError:  # binascii.Error is one
            raise _Invalid(_describe_type(field), value) from None
    try:
        value.encode()
    except UnicodeEncodeError:
        # JSON's \ud800 escapes decode to lone surrogates, which protobuf refuses.
        raise _Invalid(_describe_type(field), value, " (it holds a lone surrogate)") from None
    return value


def _enum(field: FieldDescriptor, value: object, from_text: bool, ignore_unknown: bool) -> int:
    enum = _enum_type(field)
    if isinstance(value, str):
        known = enum.values_by_name.get(value)
        if known is not None:
            return known.number
        if from_text and INTEGER_TEXT.fullmatch(value):
            value = int(value)
        elif ignore_unknown:
            raise _Skip
        else:
            raise _Invalid(_describe_type(field), value)
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = INT_RANGES[_T.CPPTYPE_INT32]
        # proto3 enums are open: any int32 is kept; proto2 (closed) ones are not.
        if low <= value <= high and (not enum.is_closed or value in enum.values_by_number):
            return value
    raise _Invalid(_describe_type(field), value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class GenericReader:
    """JSON values -> messages of one schema, with field-path errors."""

    def __init__(self, schema: Schema, ignore_unknown_fields: bool) -> None:
        self._pool = schema.pool
        self._ignore_unknown = ignore_unknown_fields
        self._fields = schema.fields_by_key

    def merge_body(self, value: object, message: Message) -> None:
        """Merge a parsed JSON body into `message`. Raises BadRequest."""
        descriptor = message.DESCRIPTOR
        if descriptor.full_name not in WELL_KNOWN and not isinstance(value, dict):
            raise BadRequest(
                f"the body must be a JSON object ({descriptor.full_name}), got {show(value)}"
            )
        self._merge(value, message, "", 0)

    def _merge(self, value: object, message: Message, path: str, depth: int) -> None:
        descriptor = message.DESCRIPTOR
        if descriptor.full_name in WELL_KNOWN:
            self._well_known(value, message, path)
            return
        if not isinstance(value, dict):
            raise _located(path, _Invalid(f"an object ({descriptor.full_name})", value))
        if depth >= MAX_DEPTH:
            raise BadRequest(f"field '{path}': the body nests more than {MAX_DEPTH} levels")
        message.SetInParent()
        fields = self._fields(descriptor.full_name)
        seen: dict[int, str] = {}
        oneofs: dict[str, str] = {}
        for key, item in value.items():
            field = fields.get(key)
            child = _join(path, key)
            if field is None:
                if self._ignore_unknown:
                    continue
                known = ", ".join(f.name for f in descriptor.fields)
                raise BadRequest(
                    f"field '{child}': unknown field of {descriptor.full_name} "
                    f"(its fields: {known or 'none'})"
                )
            if field.number in seen:
                raise BadRequest(
                    f"field '{child}': given twice, as '{seen[field.number]}' and '{key}'"
                )
            seen[field.number] = key
            if (
                item is None
                and field.message_type is not None
                and (
                    field.message_type.full_name == "google.protobuf.Value"
                    and not field.is_repeated
                )
            ):
                # proto3 JSON: null is the Value NULL_VALUE, not "unset".
                self._well_known(None, getattr(message, field.name), child)
                continue
            if item is None:
                message.ClearField(field.name)
                continue
            oneof = field.containing_oneof
            if oneof is not None and not _synthetic(field):
                if oneof.name in oneofs:
                    raise BadRequest(
                        f"field '{child}': oneof '{oneof.name}' is already set by "
                        f"'{oneofs[oneof.name]}'"
                    )
                oneofs[oneof.name] = key
            self._set(message, field, item, child, depth)

    def _set(
        self, message: Message, field: FieldDescriptor, value: object, path: str, depth: int
    ) -> None:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            self._set_map(getattr(message, field.name), entry, value, path, depth)
        elif field.is_repeated:
            if not isinstance(value, list):
                raise _located(path, _Invalid(f"a list of {_describe_type(field)}", value))
            container = getattr(message, field.name)
            if entry is not None:
                for index, item in enumerate(value):
                    self._merge_item(container.add(), item, f"{path}[{index}]", depth)
            else:
                container.extend(self._list(field, value, path))
        elif entry is not None:
            self._merge(value, getattr(message, field.name), path, depth + 1)
        else:
            try:
                setattr(message, field.name, _scalar(field, value, False, self._ignore_unknown))
            except _Invalid as exc:
                raise _located(path, exc) from None
            except _Skip:
                return

    def _merge_item(self, message: Message, item: object, path: str, depth: int) -> None:
        if item is None:
            raise BadRequest(f"field '{path}': null is not allowed in a list")
        self._merge(item, message, path, depth + 1)

    def _list(self, field: FieldDescriptor, value: list[Any], path: str) -> list[Any]:
        result = []
        for index, item in enumerate(value):
            if item is None:
                raise BadRequest(f"field '{path}[{index}]': null is not allowed in a list")
            try:
                result.append(_scalar(field, item, False, self._ignore_unknown))
            except _Invalid as exc:
                raise _located(f"{path}[{index}]", exc) from None
            except _Skip:
                continue
        return result

    def _set_map(
        self, container: Any, entry: Descriptor, value: object, path: str, depth: int
    ) -> None:
        key_field = entry.fields_by_name["key"]
        value_field = entry.fields_by_name["value"]
        if not isinstance(value, dict):
            raise _located(path, _Invalid("an object (a map)", value))
        for raw_key, item in value.items():
            child = f"{path}[{json.dumps(raw_key, ensure_ascii=False)}]"
            try:
                key = _scalar(key_field, raw_key, True, False)
            except _Invalid as exc:
                raise BadRequest(
                    f"field '{child}': a map key must be {exc.expected}, got {show(raw_key)}"
                ) from None
            if value_field.message_type is not None:
                self._merge_item(container[key], item, child, depth)
                continue
            if item is None:
                raise BadRequest(f"field '{child}': null is not allowed as a map value")
            try:
                container[key] = _scalar(value_field, item, False, self._ignore_unknown)
            except _Invalid as exc:
                raise _located(child, exc) from None
            except _Skip:
                continue

    def _well_known(self, value: object, message: Message, path: str) -> None:
        try:
            json_format.ParseDict(
                value,  # type: ignore[arg-type]  # well-known types take any JSON value
                message,
                ignore_unknown_fields=self._ignore_unknown,
                descriptor_pool=self._pool,
            )
        except PARSE_DICT_ERRORS as exc:
            where = f"field '{path}'" if path else "the body"
            raise BadRequest(
                f"{where}: expected the JSON form of {message.DESCRIPTOR.full_name}, "
                f"got {show(value)}: {exc}"
            ) from None

    def overlay(self, message: Message, values: Mapping[str, str]) -> None:
        """Set top-level fields from strings (query, path, `fields`). Raises BadRequest."""
        fields = self._fields(message.DESCRIPTOR.full_name)
        for name, text in values.items():
            field = fields.get(name)
            if field is None:
                continue
            entry = field.message_type
            if entry is not None:
                if entry.full_name not in WELL_KNOWN or field.is_repeated:
                    raise BadRequest(
                        f"field '{name}': {_describe_type(field)} cannot be set from a "
                        "string; send it in the JSON body"
                    )
                message.ClearField(field.name)
                self._well_known(text, getattr(message, field.name), name)
                continue
            try:
                converted = _scalar(field, text, True, self._ignore_unknown)
            except _Invalid as exc:
                raise _located(name, exc) from None
            except _Skip:
                continue
            if field.is_repeated:
                container = getattr(message, field.name)
                del container[:]
                container.append(converted)
            else:
                setattr(message, field.name, converted)


def _synthetic(field: FieldDescriptor) -> bool:
    """A proto3 `optional` field sits in a one-member synthetic oneof."""
    oneof = field.containing_oneof
    return oneof is not None and len(oneof.fields) == 1 and oneof.name == f"_{field.name}"


def _located(path: str, error: _Invalid) -> BadRequest:
    return BadRequest(
        f"field '{path}': expected {error.expected}, got {show(error.value)}{error.note}"
    )

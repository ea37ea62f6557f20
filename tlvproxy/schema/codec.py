"""Body codecs: one per command, between JSON callers and frame bodies (docs/reference.md
"Mapping").

Owns: turning a REST body plus its overlays (query, path parameters, `fields`)
or a WebSocket JSON value into a frame body, and a frame body back into JSON,
for the three codecs: `protobuf` (proto3 JSON mapping, honouring the table's
`json` options), `json` (validated passthrough) and `raw` (bytes both ways).
Must not: do I/O, know about HTTP or WebSocket framing, or touch the default
descriptor pool. The loader builds every codec once per table; the servers only
call them. Protobuf bodies go through the converters of convert.py, built per
message type; this module's generic reader stays the reference they fall back
to, and the one that words every error.

Decisions made here:
- `protobuf` JSON input follows the proto3 JSON mapping: both proto and lowerCamelCase
  field names, enums by name or number, 64-bit integers as numbers or strings, bytes
  as base64, `null` meaning "unset". A key given twice (as `user_name` and `userName`)
  or two members of one oneof are errors. Well-known types (Timestamp, Struct, ...)
  are parsed by `google.protobuf.json_format`.
- Overlays (query parameters, path parameters, `fields` values) set top-level fields
  only. A name that is not a field of the request is ignored: the query string also
  carries values for the gateway itself (`hash_on: query.did`, rate-limit keys,
  cache busters); the loader checks that path parameters and `fields` name real fields.
  A repeated scalar field overlaid gets that one value; a message field can only be
  overlaid when it is a well-known type with a string JSON form (Timestamp, ...).
- An empty REST body is the empty object. For the `json` codec it is sent as `{}`,
  and overlays are ignored: the body is passed through byte for byte.
- `raw` bodies are bytes over REST; where a JSON value is needed (WebSocket json
  mode, `tlvproxy call`, the mock upstream) they are base64 strings.
- A `json` command's empty response body decodes as `null`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Final

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, EncodeError, Message

from tlvproxy.errors import AnswerTooLarge, BadRequest, UpstreamProtocolError
from tlvproxy.schema.convert import (
    FLOAT32_LIMIT,
    INT_RANGES,
    INTEGER_TEXT,
    MAX_DEPTH,
    PARSE_DICT_ERRORS,
    WELL_KNOWN,
    Converters,
    Fallback,
    decode_base64,
    json_format_writer,
)
from tlvproxy.schema.sizing import Sizers

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from google.protobuf.descriptor import EnumDescriptor

    from tlvproxy.config.model import JsonOptions
    from tlvproxy.schema.convert import Merge, Overlay, Writer
    from tlvproxy.schema.protos import Schema

JSON_CONTENT_TYPE: Final = "application/json"
RAW_CONTENT_TYPE: Final = "application/octet-stream"

# What one upstream answer may expand to as JSON, as a multiple of the largest
# body accepted from an upstream (`framing.max_body`): docs/reference.md
# "Answers too large to render".
RENDER_FACTOR: Final = 8
DEFAULT_MAX_RENDERED: Final = RENDER_FACTOR * 1024 * 1024  # with the default max_body

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


class CommandCodec(ABC):
    """How one command's bodies are encoded: the interface every server uses.

    `content_type` is what a REST answer carries. Methods raise `BadRequest` for
    bad caller input and `UpstreamProtocolError` for an undecodable upstream body.
    """

    content_type: str
    # False when `encode_request` ignores its overlays (the body passes through):
    # a caller can then skip computing them.
    uses_overlays: bool = True

    @abstractmethod
    def encode_request(self, body: bytes, overlays: Sequence[Mapping[str, str]]) -> bytes:
        """The frame body for a REST request: `body` (b"" = empty object), then
        each overlay in order, later values winning. Raises BadRequest."""

    @abstractmethod
    def encode_value(self, value: Any) -> bytes:
        """The frame body for an already-parsed JSON value (WebSocket json mode,
        `tlvproxy call`). Raises BadRequest."""

    @abstractmethod
    def decode_response(self, body: bytes) -> Any:
        """A response (or push) body as a JSON-able value. Raises UpstreamProtocolError."""

    @abstractmethod
    def response_json(self, body: bytes) -> bytes:
        """A response body as the REST answer's bytes. Raises UpstreamProtocolError."""

    @abstractmethod
    def decode_request(self, body: bytes) -> Any:
        """Server side (the mock upstream): a request body as a JSON-able value.
        Raises BadRequest."""

    @abstractmethod
    def encode_response(self, value: Any) -> bytes:
        """Server side: a response (or push) body from a JSON-able value. Raises BadRequest."""


# ---------------------------------------------------------------- JSON text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads/json.dumps with options build a new decoder/encoder on
# every call, which costs more than parsing a small body (issue 10).
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# 19 digits in a row: maybe an integer outside 64 bits (-9223372036854775809,
# 18446744073709551616), which orjson reads as a float.
_LONG_DIGIT_RUN: Final = re.compile(rb"\d{19}")


def _loads(body: bytes) -> Any:
    """Parse JSON text strictly (no NaN/Infinity literals). Raises ValueError."""
    # orjson parses a typical body 4x faster, to the same value, unless it holds
    # an integer outside 64 bits. Such a body goes to the json module, as does
    # whatever orjson refuses (UTF-16, 1e400, a lone surrogate escape, nesting
    # over 1024, invalid JSON): the json module decides and words the error.
    if _LONG_DIGIT_RUN.search(body) is None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        # What json.loads does with bytes: UTF-8, -16 or -32, found from the first bytes.
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None


def _check(body: bytes) -> None:
    """Raise ValueError unless `body` is JSON text (strictly, as `_loads`).

    Only validity matters here, not the value, so an integer outside 64 bits,
    which orjson reads as a float, needs no second look: one orjson parse
    accepts the usual body, and the json module decides the rest.
    """
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        _loads(body)


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _dumps_converted(value: Any) -> bytes:
    """JSON text of a converter's output (str keys, no NaN floats: the proto3
    mapping writes those as strings), by orjson, 5x faster than `_dumps`."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer outside 64 bits, say
        return _dumps(value)


def _parse_body(body: bytes) -> Any:
    try:
        return _loads(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


def _show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
        text.encode()
    except UnicodeEncodeError:
        # A lone surrogate cannot be written as UTF-8 in the error body: escape it.
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- protobuf


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


class _Reader:
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
                f"the body must be a JSON object ({descriptor.full_name}), got {_show(value)}"
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
                    f"field '{child}': a map key must be {exc.expected}, got {_show(raw_key)}"
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
                f"got {_show(value)}: {exc}"
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
        f"field '{path}': expected {error.expected}, got {_show(error.value)}{error.note}"
    )


class _Side:
    """One message type of a command with its converters: the fast reader and
    overlay (None when the codec is built with fast=False) and the writer."""

    def __init__(
        self,
        cls: type[Message],
        converters: Converters | None,
        options: JsonOptions,
        schema: Schema,
    ) -> None:
        self.cls = cls
        descriptor = schema.descriptor(cls.DESCRIPTOR.full_name)
        self.merge: Merge | None = None
        self.overlay: Overlay | None = None
        self.write: Writer
        if converters is None:
            self.write = json_format_writer(options, schema.pool)
        else:
            self.merge = converters.reader(descriptor)
            self.overlay = converters.overlay(descriptor)
            self.write = converters.writer(descriptor)

    def fast_fill(
        self, message: Message, value: object, overlays: Sequence[Mapping[str, str]]
    ) -> bool:
        """Fill `message` through the fast reader; False when it fell back (the
        message is then half-filled and must be dropped)."""
        if self.merge is None or self.overlay is None:
            return False
        try:
            if value is not _NO_BODY:
                self.merge(value, message, 0)
            for values in overlays:
                self.overlay(message, values)
        except Fallback:
            return False
        return True


# An absent or blank REST body, as opposed to a body holding `null`.
_NO_BODY: Final = object()


class ProtobufCodec(CommandCodec):
    """proto3 JSON <-> protobuf bytes for one command (docs/configuration.md "json").

    `request` is None for a push command: its `response` is the push message, and
    encoding a request raises BadRequest. With `fast` (the default) bodies go
    through converters specialised per message type (convert.py), falling back
    to the generic reader for anything but plainly valid input; `fast=False`
    keeps the reference path (generic reader, json_format writer) for tests and
    benchmarks. Both give the same answers.

    A response whose JSON would be over `max_rendered` bytes raises
    AnswerTooLarge: from a lower bound read off the decoded message before any
    JSON is built (sizing.py), and from the JSON's length once it is.
    """

    content_type = JSON_CONTENT_TYPE

    def __init__(
        self,
        command: str,
        request: type[Message] | None,
        response: type[Message],
        options: JsonOptions,
        schema: Schema,
        *,
        fast: bool = True,
        max_rendered: int = DEFAULT_MAX_RENDERED,
    ) -> None:
        self.command = command
        self.request = request
        self.response = response
        self.options = options
        self.max_rendered = max_rendered
        self._size = Sizers(options).sizer(schema.descriptor(response.DESCRIPTOR.full_name))
        self._reader = _Reader(schema, options.ignore_unknown_fields)
        converters = Converters(options, schema.pool) if fast else None
        self._request = None if request is None else _Side(request, converters, options, schema)
        self._response = _Side(response, converters, options, schema)

    def _request_side(self) -> _Side:
        if self._request is None:
            raise BadRequest(f"{self.command} is a push command; it cannot be sent")
        return self._request

    def _build(
        self, side: _Side, value: object, overlays: Sequence[Mapping[str, str]] = ()
    ) -> bytes:
        message = side.cls()
        if not side.fast_fill(message, value, overlays):
            # The generic reader is the reference: it builds the message or raises
            # the BadRequest naming the field.
            message = side.cls()
            if value is not _NO_BODY:
                self._reader.merge_body(value, message)
            for values in overlays:
                self._reader.overlay(message, values)
        return _serialize(message)

    def encode_request(self, body: bytes, overlays: Sequence[Mapping[str, str]]) -> bytes:
        side = self._request_side()
        return self._build(side, _parse_body(body) if body.strip() else _NO_BODY, overlays)

    def encode_value(self, value: Any) -> bytes:
        return self._build(self._request_side(), _NO_BODY if value is None else value)

    def decode_response(self, body: bytes) -> Any:
        try:
            message = self.response.FromString(body)
        except DecodeError as exc:
            raise UpstreamProtocolError(
                f"{self.command}: the upstream's body is not a valid "
                f"{self.response.DESCRIPTOR.full_name}: {exc}"
            ) from None
        # Before the JSON value is built: a few bytes of body may stand for
        # many empty elements, each a Python object and many bytes of JSON.
        size = self._size
        if size is not None and size(message, self.max_rendered) > self.max_rendered:
            raise self._too_large(len(body))
        return self._response.write(message)

    def response_json(self, body: bytes) -> bytes:
        text = _dumps_converted(self.decode_response(body))
        if len(text) > self.max_rendered:
            raise self._too_large(len(body))
        return text

    def _too_large(self, body_size: int) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"{self.command}: the upstream's answer ({body_size} bytes) would be over "
            f"{self.max_rendered} bytes as JSON ({RENDER_FACTOR} x framing.max_body)"
        )

    def decode_request(self, body: bytes) -> Any:
        side = self._request_side()
        try:
            message = side.cls.FromString(body)
        except DecodeError as exc:
            raise BadRequest(
                f"{self.command}: the body is not a valid {side.cls.DESCRIPTOR.full_name}: {exc}"
            ) from None
        return side.write(message)

    def encode_response(self, value: Any) -> bytes:
        return self._build(self._response, _NO_BODY if value is None else value)


def _serialize(message: Message) -> bytes:
    try:
        return message.SerializeToString()
    except EncodeError as exc:
        raise BadRequest(f"{message.DESCRIPTOR.full_name}: {exc}") from None


# ---------------------------------------------------------------- json and raw


class JsonCodec(CommandCodec):
    """A JSON body passed through unchanged once it parses (docs/reference.md "Mapping")."""

    content_type = JSON_CONTENT_TYPE
    uses_overlays = False

    def encode_request(self, body: bytes, overlays: Sequence[Mapping[str, str]]) -> bytes:
        if not body or body.isspace():
            return b"{}"
        try:
            _check(body)
        except ValueError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        return body

    def encode_value(self, value: Any) -> bytes:
        try:
            return _dumps(value)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"the body cannot be written as JSON: {exc}") from None

    def decode_response(self, body: bytes) -> Any:
        if not body.strip():
            return None
        try:
            return _loads(body)
        except ValueError as exc:
            raise UpstreamProtocolError(f"the upstream's body is not valid JSON: {exc}") from None

    def response_json(self, body: bytes) -> bytes:
        if not body or body.isspace():
            return b"null"
        try:
            _check(body)
        except ValueError as exc:
            raise UpstreamProtocolError(f"the upstream's body is not valid JSON: {exc}") from None
        return body

    def decode_request(self, body: bytes) -> Any:
        if not body.strip():
            return None
        return _parse_body(body)

    def encode_response(self, value: Any) -> bytes:
        return self.encode_value(value)


class RawCodec(CommandCodec):
    """Bytes both ways; base64 strings where a JSON value is needed."""

    content_type = RAW_CONTENT_TYPE
    uses_overlays = False

    def encode_request(self, body: bytes, overlays: Sequence[Mapping[str, str]]) -> bytes:
        return body

    def encode_value(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            try:
                return decode_base64(value)
            except ValueError:
                raise BadRequest(f"a raw body must be base64, got {_show(value)}") from None
        raise BadRequest(f"a raw body must be a base64 string, got {_show(value)}")

    def decode_response(self, body: bytes) -> Any:
        return base64.b64encode(body).decode("ascii")

    def response_json(self, body: bytes) -> bytes:
        return body

    def decode_request(self, body: bytes) -> Any:
        return base64.b64encode(body).decode("ascii")

    def encode_response(self, value: Any) -> bytes:
        return self.encode_value(value)

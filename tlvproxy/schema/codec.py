"""Body codecs: one per command, between JSON callers and frame bodies (docs/reference.md
"Mapping").

Owns: turning a REST body plus its overlays (query, path parameters, `fields`)
or a WebSocket JSON value into a frame body, and a frame body back into JSON,
for the three codecs: `protobuf` (proto3 JSON mapping, honouring the table's
`json` options), `json` (validated passthrough) and `raw` (bytes both ways).
Must not: do I/O, know about HTTP or WebSocket framing, or touch the default
descriptor pool. The loader builds every codec once per table; the servers only
call them. Protobuf bodies go through the converters of convert.py, built per
message type; the generic reader (generic_reader.py) stays the reference they
fall back to, and the one that words every error. JSON text is json_text.py's.

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
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Final

from google.protobuf.message import DecodeError, EncodeError, Message

from tlvproxy.errors import AnswerTooLarge, BadRequest, UpstreamProtocolError
from tlvproxy.schema.convert import Converters
from tlvproxy.schema.generic_reader import GenericReader
from tlvproxy.schema.json_text import (
    check_json,
    dumps,
    dumps_converted,
    loads,
    loads_inexact,
    parse_body,
    show,
)
from tlvproxy.schema.protojson import (
    Fallback,
    decode_base64,
    json_format_writer,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from tlvproxy.config.model import JsonOptions
    from tlvproxy.schema.protojson import Merge, Overlay, Writer
    from tlvproxy.schema.protos import Schema

JSON_CONTENT_TYPE: Final = "application/json"
RAW_CONTENT_TYPE: Final = "application/octet-stream"

# What one upstream answer may expand to as JSON, as a multiple of the largest
# body accepted from an upstream (`framing.max_body`): docs/reference.md
# "Answers too large to render".
RENDER_FACTOR: Final = 8
DEFAULT_MAX_RENDERED: Final = RENDER_FACTOR * 1024 * 1024  # with the default max_body


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


# ---------------------------------------------------------------- protobuf


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
        self._descriptor = descriptor = schema.descriptor(cls.DESCRIPTOR.full_name)
        self._converters = converters
        self.merge: Merge | None = None
        self.overlay: Overlay | None = None
        self.write: Writer
        if converters is None:
            self.write = json_format_writer(options, schema.pool)
        else:
            # The reader and the writer are built on first use: they are
            # compiled code (0.5 and 0.14 ms for a message type of 10 fields),
            # which a table of hundreds of commands would pay at every load.
            self.merge = self._first_merge
            self.overlay = converters.overlay(descriptor)
            self.write = self._first_write

    def _first_merge(self, value: object, message: Message, depth: int) -> None:
        assert self._converters is not None  # merge is None without converters
        self.merge = merge = self._converters.reader(self._descriptor)
        merge(value, message, depth)

    def _first_write(self, message: Message) -> Any:
        assert self._converters is not None  # write is json_format's without converters
        self.write = write = self._converters.writer(self._descriptor)
        return write(message)

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
                if values:
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
    benchmarks. Both give the same answers. `converters`, those of `options`
    over `schema`'s pool, may be shared by the codecs of one table: each
    message type's converters are then built once.

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
        converters: Converters | None = None,
    ) -> None:
        self.command = command
        self.request = request
        self.response = response
        self.options = options
        self.max_rendered = max_rendered
        if converters is None:
            converters = Converters(options, schema.pool)
        assert converters.options == options, "converters of other json options"
        sizers = converters.sizers
        descriptor = schema.descriptor(response.DESCRIPTOR.full_name)
        self._size = sizers.sizer(descriptor)
        # Below this many bytes a body's estimate cannot be over max_rendered:
        # most answers skip the sizer (0.5 us for the bench's 11-field message).
        self._sized_from = (max_rendered - sizers.least(descriptor)) // sizers.per_byte(
            descriptor
        ) + 1
        self._reader = GenericReader(schema, options.ignore_unknown_fields)
        fast_converters = converters if fast else None
        self._request = (
            None if request is None else _Side(request, fast_converters, options, schema)
        )
        self._response = _Side(response, fast_converters, options, schema)

    def _request_side(self) -> _Side:
        if self._request is None:
            raise BadRequest(f"{self.command} is a push command; it cannot be sent")
        return self._request

    def _build(
        self,
        side: _Side,
        value: object,
        overlays: Sequence[Mapping[str, str]] = (),
        inexact: bytes | None = None,
    ) -> bytes:
        """The message of `value` and `overlays`, serialised. `inexact`: the
        body `value` was read from by `loads_inexact`, read again exactly for
        the generic reader."""
        message = side.cls()
        if not side.fast_fill(message, value, overlays):
            # The generic reader is the reference: it builds the message or raises
            # the BadRequest naming the field.
            if inexact is not None:
                value = parse_body(inexact)
            message = side.cls()
            if value is not _NO_BODY:
                self._reader.merge_body(value, message)
            for values in overlays:
                self._reader.overlay(message, values)
        return _serialize(message)

    def encode_request(self, body: bytes, overlays: Sequence[Mapping[str, str]]) -> bytes:
        side = self._request_side()
        if not body or body.isspace():
            return self._build(side, _NO_BODY, overlays)
        try:
            value = loads_inexact(body)
        except ValueError:
            # The exact reading decides, words the error, or reads what orjson refuses.
            return self._build(side, parse_body(body), overlays)
        # A fast reader takes a float only where an integer outside 64 bits, which
        # loads_inexact reads as a float, would become that same float.
        return self._build(side, value, overlays, inexact=body)

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
        if (
            size is not None
            and len(body) >= self._sized_from
            and size(message, self.max_rendered) > self.max_rendered
        ):
            raise self._too_large(len(body))
        return self._response.write(message)

    def response_json(self, body: bytes) -> bytes:
        text = dumps_converted(self.decode_response(body))
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
            check_json(body)
        except ValueError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        return body

    def encode_value(self, value: Any) -> bytes:
        try:
            return dumps(value)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"the body cannot be written as JSON: {exc}") from None

    def decode_response(self, body: bytes) -> Any:
        if not body.strip():
            return None
        try:
            return loads(body)
        except ValueError as exc:
            raise UpstreamProtocolError(f"the upstream's body is not valid JSON: {exc}") from None

    def response_json(self, body: bytes) -> bytes:
        if not body or body.isspace():
            return b"null"
        try:
            check_json(body)
        except ValueError as exc:
            raise UpstreamProtocolError(f"the upstream's body is not valid JSON: {exc}") from None
        return body

    def decode_request(self, body: bytes) -> Any:
        if not body.strip():
            return None
        return parse_body(body)

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
                raise BadRequest(f"a raw body must be base64, got {show(value)}") from None
        raise BadRequest(f"a raw body must be a base64 string, got {show(value)}")

    def decode_response(self, body: bytes) -> Any:
        return base64.b64encode(body).decode("ascii")

    def response_json(self, body: bytes) -> bytes:
        return body

    def decode_request(self, body: bytes) -> Any:
        return base64.b64encode(body).decode("ascii")

    def encode_response(self, value: Any) -> bytes:
        return self.encode_value(value)

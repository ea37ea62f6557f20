"""The json-mode message protocol of WebSocket sessions (docs/websocket.md "json mode").

Owns: turning a client's text message into a `JsonRequest` (the command, the
client's seq and the encoded frame body), and rendering responses, pushes and
per-message errors as the UTF-8 text of text messages.
Must not: do I/O, import trio, or decide whether a session closes: that is
the session's (`server/ws_requests.py`). Every error here is per-message (the
session stays open).

Client messages are `{"cmd": NAME_OR_NUMBER, "seq": N, "body": {...}}`; `body`
may be left out for a command whose request is empty.
"""

from __future__ import annotations

import codecs
import json
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson

from tlvproxy.errors import BadRequest, GatewayError, ws_error_message
from tlvproxy.schema.codec import JSON_CONTENT_TYPE
from tlvproxy.schema.json_text import has_long_digit_run, loads_text

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.schema.codec import CommandCodec


@attrs.frozen(slots=True, kw_only=True)
class JsonRequest:
    """One parsed client request: what to send upstream, and the seq to answer with."""

    command: CommandSpec
    seq: int
    body: bytes


class MessageRejected(Exception):
    """A client message answered with a per-message error; `seq` is echoed (None if unknown)."""

    def __init__(self, seq: int | str | None, error: GatewayError) -> None:
        super().__init__(error.message)
        self.seq = seq
        self.error = error


# Built once: json.dumps with options builds an encoder on every call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


def dumps(value: Any) -> bytes:
    """Compact JSON text of `value`, as UTF-8."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # An integer outside 64 bits, or a lone surrogate (escaped, so the
        # text stays UTF-8): the json module writes both.
        return _ENCODER.encode(value).encode()


def parse_request(text: str, table: CompiledTable, upstream: str, view: RequestView) -> JsonRequest:
    """Parse one client text message for a session on `upstream`.

    A command's `fields` are filled from `view`, the session's opening request,
    as on REST (docs/websocket.md "json mode"): a client cannot set `client_ip` itself.

    Raises MessageRejected carrying a BadRequest for invalid JSON, a message that
    is not an object, a missing or non-integer seq, an unknown command, a push
    command, a command served by another upstream, or a body its codec refuses.
    """
    message: Any = None
    if not has_long_digit_run(text.encode("utf-8", "surrogatepass")):
        # orjson parses a message 4x faster, to the same value. What it refuses
        # (NaN, a lone surrogate escape, invalid JSON) goes to the json module,
        # which decides and words the error.
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            message = None
    try:
        if message is None:
            # Strict: a NaN or Infinity is no more JSON here than over REST.
            message = loads_text(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            # The json module recurses once per nesting level, and `[[[[...`
            # fits max_message many thousand times over.
            detail = "nested too deeply"
        elif isinstance(exc, json.JSONDecodeError):
            detail = exc.msg
        else:
            detail = str(exc)  # a NaN or Infinity
        raise MessageRejected(None, BadRequest(f"message is not valid JSON: {detail}")) from None
    if not isinstance(message, dict):
        raise MessageRejected(
            None, BadRequest('a message must be a JSON object {"cmd", "seq", "body"}')
        )
    seq = message.get("seq")
    echo = seq if isinstance(seq, int | str) and not isinstance(seq, bool) else None
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise MessageRejected(
            echo, BadRequest('"seq" must be an integer (the client\'s own number)')
        )
    unknown = sorted(set(message) - {"cmd", "seq", "body"})
    if unknown:
        raise MessageRejected(
            seq,
            BadRequest(f"unknown member(s) {', '.join(map(repr, unknown))}: use cmd, seq, body"),
        )
    command = _command(message.get("cmd"), table, upstream, seq)
    codec = table.codecs[command.name]
    value = message.get("body", {})
    try:
        if command.fields:
            overlay = {
                field: found
                for field, key in command.fields.items()
                if (found := key.evaluate(view)) is not None
            }
            body = codec.encode_request(dumps(value), [overlay])
        else:
            body = codec.encode_value(value)
    except BadRequest as exc:
        raise MessageRejected(seq, exc) from None
    except RecursionError:
        # A body nested deeper than the json module writes (orjson reads 1024 levels).
        raise MessageRejected(seq, BadRequest("the body nests too deeply")) from None
    return JsonRequest(command=command, seq=seq, body=body)


def _command(cmd: object, table: CompiledTable, upstream: str, seq: int) -> CommandSpec:
    if cmd is None:
        raise MessageRejected(seq, BadRequest('"cmd" is missing: a command name or number'))
    if not isinstance(cmd, str | int) or isinstance(cmd, bool):
        raise MessageRejected(seq, BadRequest('"cmd" must be a command name or number'))
    # A number names the command of this session's upstream: command words
    # are unique per upstream (docs/configuration.md "commands").
    command = table.find_command(cmd, upstream)
    if command is None:
        raise MessageRejected(seq, BadRequest(f"unknown command {cmd!r}"))
    if command.push is not None:
        raise MessageRejected(
            seq, BadRequest(f"{command.name!r} is a push command: only the upstream sends it")
        )
    if command.upstream != upstream:
        raise MessageRejected(
            seq,
            BadRequest(
                f"{command.name!r} is served by upstream {command.upstream!r}, "
                f"not by this session's {upstream!r}"
            ),
        )
    return command


def body_json(codec: CommandCodec, body: bytes) -> bytes:
    """The JSON text (UTF-8) of a response or push body, for the `*_json`
    renderers; raises UpstreamProtocolError when `codec` cannot decode it.

    A json codec's text goes as the upstream sent it when it is UTF-8, as a
    text message must be; other text (UTF-16, a byte order mark) is rewritten.
    """
    if codec.content_type == JSON_CONTENT_TYPE:
        text = codec.response_json(body)
        # JSON text has no NUL byte: one means UTF-16 or UTF-32.
        if b"\x00" not in text and (
            text.isascii() or (not text.startswith(codecs.BOM_UTF8) and _is_utf8(text))
        ):
            return text
    return dumps(codec.decode_response(body))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def render_response(command: CommandSpec, seq: int, status: int, body: Any) -> bytes:
    """`{"cmd", "seq", "status", "body"}`; `body` is None when it did not decode."""
    return dumps({"cmd": command.name, "seq": seq, "status": status, "body": body})


def render_response_json(command: CommandSpec, seq: int, status: int, body: bytes) -> bytes:
    """`render_response` of a body that is JSON text (UTF-8) already."""
    return b"".join(
        (
            b'{"cmd":',
            dumps(command.name),
            b',"seq":%d,"status":%d,"body":' % (seq, status),
            body,
            b"}",
        )
    )


def render_fallback_json(command: CommandSpec, seq: int, body: bytes, kind: str) -> bytes:
    """A fallback answer (docs/websocket.md "Split, mirror, fallback"): a status-0
    response whose `fallback` member says it came from the gateway, not the
    upstream; `body` is JSON text (UTF-8) already."""
    return render_response_json(command, seq, 0, body)[:-1] + b',"fallback":' + dumps(kind) + b"}"


def render_push(command: CommandSpec, body: Any) -> bytes:
    """`{"cmd", "push": true, "body"}`."""
    return dumps({"cmd": command.name, "push": True, "body": body})


def render_push_json(command: CommandSpec, body: bytes) -> bytes:
    """`render_push` of a body that is JSON text (UTF-8) already."""
    return b'{"cmd":' + dumps(command.name) + b',"push":true,"body":' + body + b"}"


def render_error(error: GatewayError, seq: int | str | None) -> bytes:
    """`{"seq", "error": {"code", "message"}}` (docs/websocket.md "json mode")."""
    return dumps(ws_error_message(error, seq))

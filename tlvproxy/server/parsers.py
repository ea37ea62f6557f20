"""The sans-I/O seam between one HTTP/1.1 connection driver and its request parser.

Owns: the events a request parser yields (`RequestHead`, `RequestEnd`,
`CONNECTION_CLOSED`, `NEED_DATA`), the `RequestParser` protocol that both
implementations (`h11_parser.py`, the reference, and `httptools_parser.py`, the
fast one) follow, the rules they share (limits, keep-alive, response checks),
and the factory that picks one.
Must not: import trio, touch sockets or read a clock; the driver in
`http_conn.py` moves the bytes and owns every deadline (STYLE 1, 5).

Limits live inside the parser (STYLE 3): a head still incomplete once its
buffered bytes pass `max_header_bytes`, or a complete head whose size
(request line, header lines and blank line) passes it, raises `HeadersTooLarge`;
a declared Content-Length over `max_body` raises `PayloadTooLarge` on the
`next_event` call after the head, before a byte of the body is read, and a
chunked body raises it as soon as its running total passes the limit
(SPEC 4.2, 4.3). Malformed input raises `BadRequest`. After an error the
parser is dead: every later `next_event` raises the same error again.
"""

from __future__ import annotations

import enum
import importlib.util
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import unquote, urlsplit

import attrs

if TYPE_CHECKING:
    from collections.abc import Sequence

ParserName = Literal["h11", "httptools"]

# Statuses whose responses never carry a body (RFC 9110 6.4.1).
NO_BODY_STATUSES = frozenset({204, 304})

# Framing and connection management belong to the parser (SPEC 4.3): a handler
# that sets them would contradict the bytes actually sent.
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

# RFC 9110 5.6.2 token and 5.5 field-value, as h11 checks them (h11/_abnf.py).
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")

REASONS: dict[int, str] = {status.value: status.phrase for status in HTTPStatus}


class NeedData(enum.Enum):
    """The parser needs more bytes before it can yield another event."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA


@attrs.frozen(slots=True)
class RequestHead:
    """A complete request head.

    `keep_alive` is False for HTTP/1.0 and for `Connection: close` (h11's rule:
    HTTP/1.0 keep-alive is not offered). `upgrade` is True when the peer proposes
    a protocol switch: `Connection: upgrade` with an `Upgrade` header, or CONNECT.
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    http_version: str
    keep_alive: bool
    upgrade: bool


@attrs.frozen(slots=True)
class RequestEnd:
    """The request's body is complete; `body` is all of it (chunked bodies joined)."""

    body: bytes


class Closed(enum.Enum):
    """The peer closed the connection between two requests."""

    CONNECTION_CLOSED = enum.auto()


CONNECTION_CLOSED = Closed.CONNECTION_CLOSED

Event = RequestHead | RequestEnd | Closed | NeedData


class InvalidResponse(ValueError):
    """A handler's response cannot be put on the wire as given (bad status or header)."""


class RequestParser(Protocol):
    """One connection's request parser and response serialiser.

    Usage, as with h11: `receive_data(chunk)` (b"" at EOF), then `next_event()`
    until it returns `NEED_DATA`. After a `RequestEnd` the caller answers with
    `send_response` before asking for the next event, or takes over the
    connection with `trailing_data` (protocol upgrade).
    """

    def receive_data(self, data: bytes) -> None:
        """Buffer `data`; b"" means the peer closed its side."""

    def next_event(self) -> Event:
        """The next event; raises BadRequest, HeadersTooLarge or PayloadTooLarge."""

    @property
    def has_partial_request(self) -> bool:
        """True when bytes of a request not yet complete are buffered."""

    @property
    def expects_continue(self) -> bool:
        """True when the peer waits for `100 Continue` before sending the body."""

    @property
    def can_pipeline(self) -> bool:
        """True when `next_event` may go on to the next request before this one
        is answered (the answers are still sent in request order)."""

    def send_continue(self) -> bytes:
        """The bytes of `100 Continue`."""

    def send_response(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        close: bool,
        method: str | None = None,
        checked: bool = False,
    ) -> bytes:
        """The bytes of a whole response, with Content-Length and, when `close`,
        `Connection: close` added; no body for HEAD, 204 or 304. `method` is the
        request's (by default the last one parsed). `checked`: the caller
        vouches for the status and headers (see `check_status`, `check_header`).

        Raises InvalidResponse if the status or a header cannot be sent as given.
        """

    def trailing_data(self) -> bytes:
        """The bytes received past the last complete request (for an upgrade)."""


def check_status(status: int, body: bytes) -> None:
    """Raise InvalidResponse unless `status` is a final status that fits `body`."""
    if not 200 <= status <= 999:
        raise InvalidResponse(f"status {status} is not a final HTTP status")
    if body and status in NO_BODY_STATUSES:
        raise InvalidResponse(f"a {status} response cannot have a body")


def check_header(name: str, value: str) -> None:
    """Raise InvalidResponse unless `name: value` is a header a handler may send."""
    if _TOKEN.fullmatch(name) is None:
        raise InvalidResponse(f"invalid header name {name!r}")
    if _FIELD_VALUE.fullmatch(value) is None:
        raise InvalidResponse(f"invalid value for header {name}: {value!r}")
    if name.lower() in _RESERVED_HEADERS:
        raise InvalidResponse(f"header {name} is set by the HTTP layer, not the handler")


def head_size(
    method: str, target: str, http_version: str, headers: Sequence[tuple[str, str]]
) -> int:
    """Bytes of a request head as sent without optional whitespace.

    "METHOD SP target SP HTTP/v CRLF", "name: value CRLF" per header, CRLF.
    """
    size = len(method) + len(target) + len(http_version) + 9 + 2
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


def comma_tokens(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    """Lower-cased comma-separated tokens of every `name` header (names lower-cased)."""
    return [
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in value.split(",")
        if token.strip()
    ]


def wants_keep_alive(http_version: str, headers: Sequence[tuple[str, str]]) -> bool:
    """HTTP/1.1 without `Connection: close` (RFC 9112 9.3; h11 never keeps 1.0 alive)."""
    return http_version == "1.1" and "close" not in comma_tokens(headers, "connection")


def wants_continue(http_version: str, headers: Sequence[tuple[str, str]]) -> bool:
    """`Expect: 100-continue` on an HTTP/1.1 request (RFC 9110 10.1.1)."""
    return http_version == "1.1" and any(
        key == "expect" and value.lower() == "100-continue" for key, value in headers
    )


def content_length(headers: Sequence[tuple[str, str]]) -> int | None:
    """The declared Content-Length, once the parser has validated it."""
    for key, value in headers:
        if key == "content-length":
            return int(value)
    return None


def split_target(target: str) -> tuple[str, str]:
    """(percent-decoded path, raw query) of an origin- or absolute-form target."""
    if target.startswith("/"):
        raw_path, _, query = target.partition("?")
        return (unquote(raw_path) if "%" in raw_path else raw_path), query
    if target == "*":
        return target, ""
    parts = urlsplit(target)
    return unquote(parts.path or "/"), parts.query


def resolve_parser_name(name: Literal["auto", "h11", "httptools"]) -> ParserName:
    """The parser `http_parser: NAME` means: auto is httptools when importable (SPEC 3)."""
    if name != "auto":
        return name
    return "httptools" if importable_httptools() else "h11"


def importable_httptools() -> bool:
    """True when the httptools package can be imported."""
    return importlib.util.find_spec("httptools") is not None


def new_parser(name: ParserName, *, max_header_bytes: int, max_body: int) -> RequestParser:
    """A fresh parser for one connection, enforcing the given limits."""
    if name == "httptools":
        from tlvproxy.server.httptools_parser import HttptoolsParser

        return HttptoolsParser(max_header_bytes=max_header_bytes, max_body=max_body)
    from tlvproxy.server.h11_parser import H11Parser

    return H11Parser(max_header_bytes=max_header_bytes, max_body=max_body)

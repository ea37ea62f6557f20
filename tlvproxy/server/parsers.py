"""The sans-I/O seam between one HTTP/1.1 connection driver and its request parser.

Owns: the events a request parser yields (`RequestHead`, `RequestEnd`,
`CONNECTION_CLOSED`, `NEED_DATA`), the `RequestParser` protocol that both
implementations (`h11_parser.py`, the reference, and `httptools_parser.py`, the
fast one) follow, the rules they share (what a well-formed request is, limits,
keep-alive, response checks), and the factory that picks one.
Must not: import trio, touch sockets or read a clock; the driver in
`http_conn.py` moves the bytes and owns every deadline.

One strictness for both parsers (docs/reference.md "Limits"): each keeps the
bytes it receives and hands its library one whole head at a time, found here
(`head_end`); the request line and the framing headers are judged by the rules
below whichever library parsed them; a chunked body is decoded by the shared
`chunked.ChunkedBody`. So the same bytes are accepted or refused alike, and at
the same point.

Limits live inside the parser: a head (request line, header lines and
blank line, as received) over `max_header_bytes` raises `HeadersTooLarge` as
soon as that many bytes of it are buffered; a declared Content-Length over
`max_body` raises `PayloadTooLarge` on the `next_event` call after the head,
before a byte of the body is read, and a chunked body raises it as soon as a
chunk would take it over the limit. Malformed input raises `BadRequest`. After
an error the parser is dead: every later `next_event` raises the same error
again.
"""

from __future__ import annotations

import enum
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import unquote, urlsplit

import attrs

from tlvproxy.errors import BadRequest, HeadersTooLarge
from tlvproxy.server.chunked import FIELD_LINE

if TYPE_CHECKING:
    from collections.abc import Sequence

ParserName = Literal["h11", "httptools"]

# Statuses whose responses never carry a body (RFC 9110 6.4.1).
NO_BODY_STATUSES = frozenset({204, 304})

# Framing and connection management belong to the parser: a handler
# that sets them would contradict the bytes actually sent.
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

# RFC 9110 5.6.2 token and 5.5 field-value, as h11 checks them (h11/_abnf.py).
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")

REASONS: dict[int, str] = {status.value: status.phrase for status in HTTPStatus}

# The methods a request may have (RFC 9110 9.3 and PATCH, but CONNECT: the
# gateway is no tunnel), in upper case; anything else is refused with 400 by
# both parsers (docs/reference.md "Limits").
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"})

# The request line: one space on each side of the target, HTTP/1.0 or 1.1, CRLF.
_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/1\.([01])\r\n")
# Header lines up to the blank line that ends the head (chunked.FIELD_LINE).
_FIELD_LINES = re.compile(rb"(?:" + FIELD_LINE + rb")*\r\n")
# A request-target that is not origin-form ("/...") nor "*": absolute-form
# with an http(s) scheme (RFC 9112 3.2.2). The authority may hold what RFC 3986
# allows there; the rest, any visible ASCII.
_ABSOLUTE_FORM = re.compile(
    rb"[Hh][Tt][Tt][Pp][Ss]?://[-A-Za-z0-9._~!$&'()*+,;=:@%\[\]]*(?:[/?][\x21-\x7e]*)?"
)
# In a head: a LF without its CR, a CR without its LF (but the last byte
# received, whose LF may be next), a line that begins with whitespace (obs-fold).
_BAD_BREAK = re.compile(rb"[^\r]\n|\r[^\n]|\n[ \t]")
# A Content-Length value: 1 to 19 digits (it fits in 63 bits).
MAX_LENGTH_DIGITS = 19


class NeedData(enum.Enum):
    """The parser needs more bytes before it can yield another event."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA


@attrs.frozen(slots=True)
class RequestHead:
    """A complete request head.

    `keep_alive` is False for HTTP/1.0 and for `Connection: close` (h11's rule:
    HTTP/1.0 keep-alive is not offered). `upgrade` is True when the peer proposes
    a protocol switch: an `upgrade` token in `Connection` and a non-empty `Upgrade`.
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


class Received:
    """The bytes a parser has received: `_data` from `_start` on are not used
    yet, `_scanned` of them were searched for the end of a head, and `_eof`
    says the client's sending side closed. Both parsers keep their input so."""

    def __init__(self) -> None:
        self._data = b""
        self._start = 0
        self._scanned = 0
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Take `data` from the client; b"" means it closed its sending side."""
        if not data:
            self._eof = True
        elif self._start < len(self._data):
            self._data = self._data[self._start :] + data
            self._start = 0
        else:
            self._data = data
            self._start = 0


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


def head_end(data: bytes, start: int, scanned: int, max_header_bytes: int) -> int:
    """The offset just past the CRLF CRLF that ends the head starting at
    `data[start]`, or -1 while it is incomplete. `scanned`: bytes of it already
    searched by an earlier call (the search resumes near their end).

    Raises HeadersTooLarge once `max_header_bytes` bytes of the head have
    arrived without its end, and BadRequest as soon as what has arrived cannot
    begin a valid request (the same request-line rule as for a whole head).
    """
    if not 65 <= data[start] <= 90:  # a method begins with a capital letter
        raise BadRequest("malformed HTTP request: no request line received")
    lo = start + scanned - 3 if scanned > 3 else start
    found = data.find(b"\r\n\r\n", lo, start + max_header_bytes)
    if found >= 0:
        return found + 4
    if len(data) - start >= max_header_bytes:
        raise HeadersTooLarge(f"the request head is over {max_header_bytes} bytes")
    # Only the bytes new since the last call (and two before them) are searched.
    if _BAD_BREAK.search(data, start + scanned - 2 if scanned > 2 else start) is not None:
        raise BadRequest("malformed HTTP request: a bare CR or LF, or a folded header line")
    line_end = data.find(b"\n", start)
    if line_end - start >= scanned:  # the request line ended since the last call
        match = _REQUEST_LINE.fullmatch(data, start, line_end + 1)
        problem = "invalid request line" if match is None else _line_problem(match)
        if problem is not None:
            raise BadRequest(f"malformed HTTP request: {problem}")
    return -1


def check_head(head: bytes) -> None:
    """Raise BadRequest unless `head` (whole: `head_end` found its end) is a
    well-formed request head: the checks the fast parser's library and
    `framing_problem` make together, here on the bytes.
    """
    match = _REQUEST_LINE.match(head)
    problem = "invalid request line" if match is None else _line_problem(match)
    if problem is None:
        assert match is not None  # _line_problem needs one
        fields_start = match.end()
        if _FIELD_LINES.fullmatch(head, fields_start) is None:
            problem = "invalid header line"
        else:
            hosts = lengths = codings = 0
            length = coding = ""
            lines = head[fields_start:-4].split(b"\r\n") if len(head) > fields_start + 2 else ()
            for line in lines:
                name, _, value = line.partition(b":")
                lowered = name.lower()
                if lowered == b"host":
                    hosts += 1
                elif lowered == b"content-length":
                    lengths += 1
                    length = value.strip(b" \t").decode("latin-1")
                elif lowered == b"transfer-encoding":
                    codings += 1
                    coding = value.lstrip(b" \t").decode("latin-1")
            version = "1.1" if match[3] == b"1" else "1.0"
            problem = framing_problem(version, hosts, lengths, length, codings, coding)
    if problem is not None:
        raise BadRequest(f"malformed HTTP request: {problem}")


def _line_problem(match: re.Match[bytes]) -> str | None:
    method = match[1].decode("ascii")
    if method not in METHODS:
        return f"unsupported method {method!r}"
    return target_problem(method, match[2])


def target_problem(method: str, target: bytes) -> str | None:
    """Why `target` (visible ASCII) cannot be `method`'s request-target, or None.

    Origin-form ("/path?query"); "*" for OPTIONS; absolute-form with an http or
    https scheme.
    """
    if target[:1] == b"/":
        return None
    if target == b"*":
        return None if method == "OPTIONS" else "'*' is a target for OPTIONS only"
    return None if _ABSOLUTE_FORM.fullmatch(target) is not None else "invalid request target"


def framing_problem(
    version: str, hosts: int, lengths: int, length: str, codings: int, coding: str
) -> str | None:
    """What is wrong with a head's Host and framing fields, or None.

    `hosts`, `lengths`, `codings`: how many Host, Content-Length and
    Transfer-Encoding fields it has; `length`: the value of the last
    Content-Length without the whitespace around it; `coding`: that of the
    last Transfer-Encoding without the whitespace before it. HTTP/1.1 needs one
    Host, HTTP/1.0 at most one; at most one Content-Length, 1 to 19 digits (no
    list); at most one Transfer-Encoding, exactly `chunked` with nothing after
    it, never with Content-Length or in HTTP/1.0. Anything else is framing a
    proxy in front may read differently: request smuggling.
    """
    if hosts != 1 and (hosts or version == "1.1"):
        return "Missing mandatory Host: header" if not hosts else "Found multiple Host: headers"
    if lengths:
        if lengths > 1:
            return "more than one Content-Length"
        if not (length.isdigit() and length.isascii() and len(length) <= MAX_LENGTH_DIGITS):
            return f"invalid Content-Length {length!r}"
    if codings:
        if codings > 1 or coding != "chunked":
            return "the only Transfer-Encoding accepted is one 'chunked'"
        if lengths:
            return "Transfer-Encoding with Content-Length"
        if version != "1.1":
            return "Transfer-Encoding in an HTTP/1.0 request"
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

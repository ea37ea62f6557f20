"""The fast request parser: llhttp (httptools) behind the `RequestParser` seam.

Owns: the bytes received and how they reach llhttp, collecting its callbacks
into the seam's events, the shared rules llhttp does not apply itself (the
request line's method, version and spacing, the request-target's form, Host
and the framing fields: `parsers.framing_problem`), and serialising responses
from a precomputed status-line table in one join.
Must not: import trio or do I/O; behave differently from
`h11_parser.py`, the reference: the same input gives the same events and errors;
keep a list of body pieces (the body is joined as it arrives).

llhttp keeps no buffer of its own, so this parser hands it one whole head at a
time (`parsers.head_end` finds its end) and then exactly the bytes of a
Content-Length body: when a message completes, llhttp has not parsed a byte of
the next one. A chunked body is decoded by the shared `ChunkedBody`, and a fresh
llhttp parses the request after it. The body of a protocol-switch proposal,
which llhttp skips, is read here too.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import httptools

from tlvproxy.errors import BadRequest, GatewayError, PayloadTooLarge
from tlvproxy.server.chunked import ChunkedBody
from tlvproxy.server.parsers import (
    CONNECTION_CLOSED,
    METHODS,
    NEED_DATA,
    NO_BODY_STATUSES,
    REASONS,
    Event,
    Received,
    RequestEnd,
    RequestHead,
    check_header,
    check_status,
    comma_tokens,
    framing_problem,
    head_end,
    target_problem,
    wants_continue,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

# Where the parser is in the current request.
_HEAD = 0  # waiting for a whole head
_BODY_LENGTH = 1  # feeding llhttp a Content-Length body
_BODY_CHUNKED = 2  # decoding a chunked body
_BODY_SWITCH = 3  # reading the Content-Length body of a switch proposal (llhttp skips it)
_SWITCHED = 4  # the peer proposed a protocol switch; the rest is not HTTP

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n" for code, reason in REASONS.items()}
# How a request line ends after its target, by the version llhttp read: any
# other version (0.9, 2.0) is refused.
_LINE_ENDS = {"1.1": b" HTTP/1.1\r\n", "1.0": b" HTTP/1.0\r\n"}


def _received_coding(head: bytes) -> str:
    """The value of the one Transfer-Encoding field of `head`, as received but
    for the whitespace before it."""
    start = head.lower().find(b"\r\ntransfer-encoding:") + len(b"\r\ntransfer-encoding:")
    return head[start : head.find(b"\r\n", start)].lstrip(b" \t").decode("latin-1")


class _Stop(Exception):
    """Raised in a callback to stop llhttp after recording an error on the parser."""


class HttptoolsParser(Received):
    """A `RequestParser` on `httptools.HttpRequestParser` (see `parsers.RequestParser`)."""

    def __init__(self, *, max_header_bytes: int, max_body: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body = max_body
        self._llhttp = httptools.HttpRequestParser(self)
        super().__init__()
        self._events: deque[Event] = deque()
        self._error: GatewayError | None = None
        self._state = _HEAD
        self._remaining = 0  # Content-Length bytes not yet read
        self._chunked: ChunkedBody | None = None
        self._switching = False  # the request proposes a protocol switch
        self._head = b""  # the head being parsed, as received
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: bytes | bytearray = b""  # joined as it arrives
        self._method = ""
        self._continue = False

    def next_event(self) -> Event:
        events = self._events
        while True:
            if events:
                return events.popleft()
            if self._error is not None:
                raise self._error
            if self._state == _SWITCHED:
                return NEED_DATA
            if self._start < len(self._data) and self._step():
                continue
            if not self._eof:
                return NEED_DATA
            if self._state == _HEAD and self._start == len(self._data):
                return CONNECTION_CLOSED
            self._error = BadRequest("the connection closed in the middle of a request")

    def _step(self) -> bool:
        """Use the next bytes; False when more are needed first."""
        data, start = self._data, self._start
        state = self._state
        try:
            if state == _HEAD:
                end = head_end(data, start, self._scanned, self._max_header_bytes)
                if end < 0:
                    self._scanned = len(data) - start
                    return False
                head = data if start == 0 and end == len(data) else data[start:end]
                self._start = end
                self._scanned = 0
                self._head = head
                self._feed(head)
                if not self._events and self._error is None:
                    # llhttp took a whole head without a callback (it does so
                    # for "PRI", the HTTP/2 preface's method).
                    self._fail(BadRequest("malformed HTTP request: invalid request line"))
                remaining = self._remaining
                if (
                    self._state == _BODY_LENGTH
                    and 0 < remaining <= len(data) - end
                    and self._error is None
                ):
                    # The whole body is here too: feed it now, the step the
                    # next call would take.
                    self._remaining = 0
                    self._start = end + remaining
                    self._continue = False
                    self._feed(data[end : end + remaining])
                return True
            self._continue = False
            if state == _BODY_LENGTH:
                take = min(self._remaining, len(data) - start)
                if not take:
                    return False  # not reached: a message without a body ends with its head
                self._remaining -= take
                self._start = start + take
                self._feed(data if take == len(data) else data[start : start + take])
                return True
            if state == _BODY_CHUNKED:
                chunked = self._chunked
                assert chunked is not None  # set with _BODY_CHUNKED
                self._start = chunked.consume(data, start)
                if chunked.done:
                    self._body = chunked.body
                    self._chunked = None
                    if self._switching:
                        self._end_switch()
                    else:
                        # llhttp's own idea of this body (it may not have taken
                        # it as chunked) must not outlive it: a fresh one
                        # parses the next request.
                        self._llhttp = httptools.HttpRequestParser(self)
                        self._end_message()
                    return True
                return self._start > start
            # _BODY_SWITCH
            take = min(self._remaining, len(data) - start)
            self._remaining -= take
            self._start = start + take
            self.on_body(data[start : start + take])
            if not self._remaining:
                self._end_switch()
            return True
        except GatewayError as error:
            self._fail(error)
            return True

    def _feed(self, piece: bytes) -> None:
        try:
            self._llhttp.feed_data(piece)
        except httptools.HttpParserUpgrade:
            # A switch proposal: llhttp stops after its head (see
            # on_message_complete); the rest is not llhttp's.
            pass
        except httptools.HttpParserError as exc:
            if self._error is None:
                self._fail(BadRequest(f"malformed HTTP request: {exc}"))

    def _end_switch(self) -> None:
        self._events.append(RequestEnd(self._take_body()))
        self._state = _SWITCHED

    def _fail(self, error: GatewayError) -> None:
        self._error = error
        self._data = b""
        self._start = 0

    def _take_body(self) -> bytes:
        body = self._body
        self._body = b""
        return body if type(body) is bytes else bytes(body)

    # llhttp callbacks (httptools looks them up by name).

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._method = ""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append(
            (name.decode("latin-1").lower(), value.decode("latin-1").rstrip(" \t"))
        )

    def on_headers_complete(self) -> None:
        llhttp = self._llhttp
        method = llhttp.get_method().decode("ascii")
        url = self._url
        version = llhttp.get_http_version()
        # The request line as parsers._REQUEST_LINE has it: a method of ours,
        # one space, the target, one space, HTTP/1.0 or HTTP/1.1, CRLF (llhttp
        # takes several spaces, and HTTP/0.9 or 2.0). Checked on the bytes of
        # the head, which llhttp parsed as a whole.
        head = self._head
        line_end = _LINE_ENDS.get(version)
        size = len(method)
        if (
            line_end is None
            or method not in METHODS
            or head[size] != 32
            or not head.startswith(url, size + 1)
            or not head.startswith(line_end, size + 1 + len(url))
        ):
            self._stop(BadRequest("malformed HTTP request: invalid request line"))
        if url[:1] != b"/":
            problem = target_problem(method, url)
            if problem is not None:
                self._stop(BadRequest(f"malformed HTTP request: {problem}"))
        headers = tuple(self._headers)
        # One pass over the headers for the framing and the options; the token
        # lists are split only for the headers that are present. Same results
        # as wants_keep_alive and wants_continue.
        hosts = lengths = codings = 0
        length = coding = ""
        has_connection = has_expect = False
        for name, value in headers:
            if name == "host":
                hosts += 1
            elif name == "content-length":
                lengths += 1
                length = value
            elif name == "transfer-encoding":
                codings += 1
                coding = value
            elif name == "connection":
                has_connection = True
            elif name == "expect":
                has_expect = True
        if codings == 1:
            # llhttp's value has lost its trailing whitespace, which the rule
            # counts (parsers.framing_problem).
            coding = _received_coding(head)
        problem = framing_problem(version, hosts, lengths, length, codings, coding)
        if problem is not None:
            self._stop(BadRequest(f"malformed HTTP request: {problem}"))
        upgrade = llhttp.should_upgrade()
        keep_alive = version == "1.1" and (
            not has_connection or "close" not in comma_tokens(headers, "connection")
        )
        self._events.append(
            RequestHead(method, url.decode("latin-1"), headers, version, keep_alive, upgrade)
        )
        self._method = method
        self._switching = upgrade
        if codings:
            self._state = _BODY_CHUNKED
            self._chunked = ChunkedBody(
                max_body=self._max_body, max_trailer_bytes=self._max_header_bytes
            )
        else:
            size = int(length) if lengths else 0
            if size > self._max_body:
                # Refused before a byte of the body is read, and before 100 Continue.
                self._stop(
                    PayloadTooLarge(
                        f"the request body of {size} bytes is over {self._max_body} bytes"
                    )
                )
            self._state = _BODY_LENGTH
            self._remaining = size
        self._continue = (
            has_expect
            and (self._state == _BODY_CHUNKED or self._remaining > 0)
            and wants_continue(version, headers)
        )

    def on_body(self, body: bytes) -> None:
        # A Content-Length body: its length was checked against max_body with
        # the head.
        current = self._body
        if not current:
            self._body = body
        else:
            if type(current) is bytes:
                current = self._body = bytearray(current)
            current += body

    def on_message_complete(self) -> None:
        if self._state != _BODY_LENGTH:
            return  # a chunked body ends when ChunkedBody says so, not llhttp
        if not self._switching:
            body = self._body
            self._body = b""
            self._events.append(RequestEnd(body if type(body) is bytes else bytes(body)))
            self._continue = False
            self._state = _HEAD
        elif self._remaining:
            # llhttp skips the body of a switch proposal and completes the
            # message after the head: the body is read in _step first.
            self._state = _BODY_SWITCH
        else:
            self._end_switch()

    def _end_message(self) -> None:
        self._events.append(RequestEnd(self._take_body()))
        self._continue = False
        self._state = _HEAD

    def _stop(self, error: GatewayError) -> None:
        self._fail(error)
        raise _Stop

    # Answers.

    @property
    def has_partial_request(self) -> bool:
        return self._start < len(self._data) or self._state != _HEAD

    @property
    def expects_continue(self) -> bool:
        return self._continue

    @property
    def can_pipeline(self) -> bool:
        return True

    def send_continue(self) -> bytes:
        self._continue = False
        return _CONTINUE

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
        if not checked:
            check_status(status, body)
            for name, value in headers:
                check_header(name, value)
        parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n"]
        for name, value in headers:
            parts.append(f"{name}: {value}\r\n")
        if status not in NO_BODY_STATUSES:
            parts.append(f"Content-Length: {len(body)}\r\n")
        parts.append("Connection: close\r\n\r\n" if close else "\r\n")
        head = "".join(parts).encode("ascii")
        # A HEAD answer keeps the Content-Length a GET would get (RFC 9110 9.3.2).
        if not body or (method or self._method) == "HEAD":
            return head
        return head + body

    def trailing_data(self) -> bytes:
        return self._data[self._start :]

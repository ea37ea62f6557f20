"""The fast request parser: llhttp (httptools) behind the `RequestParser` seam.

Owns: feeding llhttp so that it never sees past the end of the current request
(which keeps head sizes, leftover bytes and pipelined errors exact), collecting
its callbacks into the seam's events, the h11 rules llhttp does not enforce
(Host, Transfer-Encoding, no leading blank lines), and serialising responses
from a precomputed status-line table in one join.
Must not: import trio or do I/O (STYLE 1); behave differently from
`h11_parser.py`, the reference: the same input gives the same events and errors.

llhttp keeps no buffer of its own, so this parser cuts the input at the only
places a message can end: a head or a chunked body ends right after CRLF CRLF,
a Content-Length body after exactly that many bytes. Each piece is fed alone,
so when a message completes llhttp has not parsed a byte of the next one.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import httptools

from tlvproxy.errors import BadRequest, GatewayError, HeadersTooLarge, PayloadTooLarge
from tlvproxy.server.parsers import (
    CONNECTION_CLOSED,
    NEED_DATA,
    NO_BODY_STATUSES,
    REASONS,
    Event,
    RequestEnd,
    RequestHead,
    check_header,
    check_status,
    comma_tokens,
    wants_continue,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

# Where the parser is in the current request.
_HEAD = 0  # reading the head
_BODY_LENGTH = 1  # reading a Content-Length body (or none: it ends with the head)
_BODY_CHUNKED = 2  # reading a chunked body
_SWITCHED = 3  # the peer proposed a protocol switch; the rest is not HTTP

_END = b"\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n" for code, reason in REASONS.items()}


class _Stop(Exception):
    """Raised in a callback to stop llhttp after recording an error on the parser."""


class HttptoolsParser:
    """A `RequestParser` on `httptools.HttpRequestParser` (see `parsers.RequestParser`)."""

    def __init__(self, *, max_header_bytes: int, max_body: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body = max_body
        self._llhttp = httptools.HttpRequestParser(self)
        self._pending = b""  # received, not fed yet
        self._eof = False
        self._events: deque[Event] = deque()
        self._error: GatewayError | None = None
        self._state = _HEAD
        self._head_bytes = 0  # bytes of the current head fed so far
        self._tail = b""  # last bytes fed, to find CRLF CRLF across pieces
        self._remaining = 0  # Content-Length bytes still to feed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._method = ""
        self._continue = False

    def receive_data(self, data: bytes) -> None:
        if data:
            self._pending = self._pending + data if self._pending else data
        else:
            self._eof = True

    def next_event(self) -> Event:
        events = self._events
        while True:
            if events:
                return events.popleft()
            if self._error is not None:
                raise self._error
            if self._pending and self._state != _SWITCHED:
                self._step()
            elif self._eof:
                if self._state == _HEAD and self._head_bytes == 0:
                    return CONNECTION_CLOSED
                self._error = BadRequest("the connection closed in the middle of a request")
            else:
                return NEED_DATA

    def _step(self) -> None:
        data = self._pending
        if self._state == _BODY_LENGTH:
            cut = self._remaining
            self._remaining -= min(cut, len(data))
        else:
            if self._state == _HEAD and self._head_bytes == 0 and data[0] in b"\r\n":
                self._error = BadRequest("malformed HTTP request: no request line received")
                return
            cut = self._find_end(data)
        if 0 <= cut < len(data):
            piece, self._pending = data[:cut], data[cut:]
        else:
            piece, self._pending = data, b""
        if self._state == _HEAD:
            self._head_bytes += len(piece)
        self._tail = piece[-3:] if len(piece) >= 3 else (self._tail + piece)[-3:]
        self._feed(piece)
        remaining = self._remaining
        if (
            self._state == _BODY_LENGTH
            and 0 < remaining <= len(self._pending)
            and self._error is None
        ):
            # The head just ended and its whole body is here: feed it now, the
            # step the next call would take.
            data = self._pending
            self._remaining = 0
            self._pending = data[remaining:]
            self._feed(data[:remaining])
        if (
            self._error is None
            and self._state == _HEAD
            and self._head_bytes > self._max_header_bytes
        ):
            # Still incomplete with every byte fed (a complete head would have
            # reset the count): the same 431 h11 raises for its receive buffer.
            self._fail(HeadersTooLarge(f"the request head is over {self._max_header_bytes} bytes"))

    def _find_end(self, data: bytes) -> int:
        """The index in `data` just past the first CRLF CRLF, counting the tail; or -1."""
        tail = self._tail
        if tail:
            found = (tail + data[:3]).find(_END)
            if found >= 0:
                return found + 4 - len(tail)
        found = data.find(_END)
        return found + 4 if found >= 0 else -1

    def _feed(self, piece: bytes) -> None:
        try:
            self._llhttp.feed_data(piece)
        except httptools.HttpParserUpgrade as upgrade:
            # The head ended the piece, so the offset is its end; anything after
            # belongs to the new protocol.
            self._pending = piece[upgrade.args[0] :] + self._pending
            self._state = _SWITCHED
        except httptools.HttpParserError as exc:
            if self._error is None:
                self._fail(BadRequest(f"malformed HTTP request: {exc}"))

    def _fail(self, error: GatewayError) -> None:
        self._error = error
        self._pending = b""

    # llhttp callbacks (httptools looks them up by name).

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._method = ""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _HEAD:  # trailers of a chunked body are dropped, as h11 does
            self._headers.append(
                (name.decode("latin-1").lower(), value.decode("latin-1").rstrip(" \t"))
            )

    def on_headers_complete(self) -> None:
        llhttp = self._llhttp
        method = llhttp.get_method().decode("ascii")
        target = self._url.decode("latin-1")
        version = llhttp.get_http_version()
        headers = tuple(self._headers)
        # One pass over the headers for the size, the framing and the options;
        # the token lists are split only for the headers that are present.
        # Same checks, same order, same results as head_size, _check_framing,
        # wants_keep_alive and wants_continue.
        size = len(method) + len(target) + len(version) + 11
        hosts = 0
        declared_length = ""
        has_coding = has_connection = has_expect = False
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == "host":
                hosts += 1
            elif name == "content-length":
                declared_length = value  # the last one, as before
            elif name == "transfer-encoding":
                has_coding = True
            elif name == "connection":
                has_connection = True
            elif name == "expect":
                has_expect = True
        if size > self._max_header_bytes:
            self._stop(HeadersTooLarge(f"the request head is over {self._max_header_bytes} bytes"))
        chunked = self._check_framing(version, headers, hosts, has_coding)
        upgrade = llhttp.should_upgrade()
        keep_alive = version == "1.1" and (
            not has_connection or "close" not in comma_tokens(headers, "connection")
        )
        self._events.append(RequestHead(method, target, headers, version, keep_alive, upgrade))
        self._method = method
        self._tail = b""
        self._head_bytes = 0
        if upgrade:
            # llhttp skips the body of a switch proposal and completes the message.
            self._state = _BODY_LENGTH
            self._remaining = 0
        elif chunked:
            self._state = _BODY_CHUNKED
        else:
            length = int(declared_length) if declared_length else 0
            if length > self._max_body:
                # Refused before a byte of the body is read, and before 100 Continue.
                self._stop(
                    PayloadTooLarge(
                        f"the request body of {length} bytes is over {self._max_body} bytes"
                    )
                )
            self._state = _BODY_LENGTH
            self._remaining = length
        self._continue = (
            has_expect
            and (self._state == _BODY_CHUNKED or self._remaining > 0)
            and wants_continue(version, headers)
        )

    def _check_framing(
        self, version: str, headers: tuple[tuple[str, str], ...], hosts: int, has_coding: bool
    ) -> bool:
        """True for a chunked body; stop on what h11 refuses and llhttp lets through."""
        if version == "1.1" and hosts == 0:
            self._stop(BadRequest("malformed HTTP request: Missing mandatory Host: header"))
        if hosts > 1:
            self._stop(BadRequest("malformed HTTP request: Found multiple Host: headers"))
        if not has_coding:
            return False
        codings = comma_tokens(headers, "transfer-encoding")
        if codings and codings != ["chunked"]:
            self._stop(
                BadRequest("malformed HTTP request: Only Transfer-Encoding: chunked is supported")
            )
        return bool(codings)

    def on_body(self, body: bytes) -> None:
        self._continue = False
        size = self._body_size + len(body)
        if size > self._max_body:
            self._stop(PayloadTooLarge(f"the request body is over {self._max_body} bytes"))
        self._body_size = size
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body
        self._events.append(RequestEnd(body[0] if len(body) == 1 else b"".join(body)))
        self._body = []
        self._body_size = 0
        self._continue = False
        self._tail = b""
        self._state = _HEAD

    def _stop(self, error: GatewayError) -> None:
        self._fail(error)
        raise _Stop

    # Answers.

    @property
    def has_partial_request(self) -> bool:
        return bool(self._pending) or self._state != _HEAD or self._head_bytes > 0

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
        return self._pending

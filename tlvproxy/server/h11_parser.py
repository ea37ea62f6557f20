"""The reference request parser: h11's state machine behind the `RequestParser` seam.

Owns: the bytes received and how they reach h11: one whole head at a time,
checked first by the shared rules (`parsers.check_head`, `framing_problem`:
h11 alone accepts obs-fold, bare LF, Content-Length lists and more); then a
Content-Length body as it arrives, or, for a chunked body, the shared
`ChunkedBody` decoder and an empty last chunk once it is done. Also: h11 events
and errors into the seam's events and GatewayErrors, and serialising responses
through h11, which checks both directions.
Must not: import trio or do I/O; answer anything on its own; keep a
list of body pieces (the body is joined as it arrives).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11

from tlvproxy.errors import BadRequest, GatewayError, HeadersTooLarge, PayloadTooLarge
from tlvproxy.server.chunked import ChunkedBody
from tlvproxy.server.parsers import (
    CONNECTION_CLOSED,
    NEED_DATA,
    NO_BODY_STATUSES,
    REASONS,
    Event,
    InvalidResponse,
    Received,
    RequestEnd,
    RequestHead,
    check_head,
    check_header,
    check_status,
    comma_tokens,
    head_end,
    wants_continue,
    wants_keep_alive,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

# Where the parser is in the current request.
_HEAD = 0  # waiting for a whole head
_BODY_LENGTH = 1  # feeding h11 a Content-Length body
_BODY_CHUNKED = 2  # decoding a chunked body (h11 gets an empty last chunk at its end)

# What h11 gets for a chunked body, once `ChunkedBody` has read all of it.
_LAST_CHUNK = b"0\r\n\r\n"


class H11Parser(Received):
    """A `RequestParser` on `h11.Connection` (see `parsers.RequestParser`)."""

    def __init__(self, *, max_header_bytes: int, max_body: int) -> None:
        # h11 only ever holds one whole head or a piece of a body (see _feed_next).
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_header_bytes = max_header_bytes
        self._max_body = max_body
        super().__init__()
        self._state = _HEAD
        self._remaining = 0  # Content-Length bytes not yet given to h11
        self._chunked: ChunkedBody | None = None
        self._body: bytes | bytearray = b""  # joined as it arrives
        self._continue = False
        self._error: GatewayError | None = None
        self._deferred_error: GatewayError | None = None
        self._method = ""  # of the request being answered, for HEAD

    def next_event(self) -> Event:
        if self._deferred_error is not None:
            self._error, self._deferred_error = self._deferred_error, None
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                self._error = HeadersTooLarge(
                    f"the request head is over {self._max_header_bytes} bytes"
                )
            else:
                self._error = BadRequest(f"malformed HTTP request: {exc}")
            raise self._error from exc
        except GatewayError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if not self._feed_next():
                    return NEED_DATA
            elif isinstance(event, h11.Data):
                self._add_body(event.data)
            elif isinstance(event, h11.Request):
                return self._head(event)
            elif isinstance(event, h11.EndOfMessage):
                body = self._body
                if self._chunked is not None:
                    body = self._chunked.body
                    self._chunked = None
                self._body = b""
                self._state = _HEAD
                self._continue = False
                return RequestEnd(body if type(body) is bytes else bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return CONNECTION_CLOSED
            else:
                # PAUSED: the caller asked for the next request before answering this one.
                raise RuntimeError(f"h11 paused in state {conn.their_state}: answer first")

    def _feed_next(self) -> bool:
        """Give h11 the next piece it may have; False when more bytes are needed."""
        data, start = self._data, self._start
        available = len(data) - start
        state = self._state
        if state == _HEAD:
            if not available:
                if self._eof:
                    self._conn.receive_data(b"")  # h11 answers ConnectionClosed
                    return True
                return False
            end = head_end(data, start, self._scanned, self._max_header_bytes)
            if end < 0:
                if self._eof:
                    raise BadRequest("the connection closed in the middle of a request")
                self._scanned = available
                return False
            head = data[start:end]
            self._start = end
            self._scanned = 0
            check_head(head)
            self._conn.receive_data(head)
            return True
        if not available:
            if self._eof:
                # h11 refuses a body cut short; the decoder knows it is cut.
                if state == _BODY_CHUNKED:
                    raise BadRequest("the connection closed in the middle of a request")
                self._conn.receive_data(b"")
                return True
            return False
        self._continue = False
        if state == _BODY_LENGTH:
            take = min(self._remaining, available)
            self._remaining -= take
            self._start = start + take
            self._conn.receive_data(data if take == len(data) else data[start : start + take])
            return True
        chunked = self._chunked
        assert chunked is not None  # set with _BODY_CHUNKED
        self._start = chunked.consume(data, start)
        if chunked.done:
            self._conn.receive_data(_LAST_CHUNK)
            return True
        if self._eof:
            raise BadRequest("the connection closed in the middle of a request")
        return self._start > start

    def _head(self, event: h11.Request) -> RequestHead:
        method = event.method.decode("ascii")
        target = event.target.decode("latin-1")
        version = event.http_version.decode("ascii")
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
        )
        self._method = method
        # llhttp's rule: an "upgrade" token in Connection and a non-empty Upgrade.
        upgrade = "upgrade" in comma_tokens(headers, "connection") and any(
            name == "upgrade" and value for name, value in headers
        )
        length = 0
        chunked = False
        for name, value in headers:
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = True
        if chunked:
            self._state = _BODY_CHUNKED
            self._chunked = ChunkedBody(
                max_body=self._max_body, max_trailer_bytes=self._max_header_bytes
            )
        else:
            self._state = _BODY_LENGTH
            self._remaining = length
            if length > self._max_body:
                # Refused before a byte of the body is read, and before 100
                # Continue (docs/reference.md "Limits").
                self._deferred_error = PayloadTooLarge(
                    f"the request body of {length} bytes is over {self._max_body} bytes"
                )
        self._continue = (chunked or 0 < length <= self._max_body) and wants_continue(
            version, headers
        )
        return RequestHead(
            method, target, headers, version, wants_keep_alive(version, headers), upgrade
        )

    def _add_body(self, data: bytes) -> None:
        # The declared length was checked against max_body with the head.
        body = self._body
        if not body:
            self._body = data
        else:
            if type(body) is bytes:
                body = self._body = bytearray(body)
            body += data

    @property
    def has_partial_request(self) -> bool:
        return self._conn.their_state is not h11.IDLE or self._start < len(self._data)

    @property
    def expects_continue(self) -> bool:
        return self._continue

    @property
    def can_pipeline(self) -> bool:
        # h11 pauses after a request until it is answered; its own `_method`
        # is then always the one being answered.
        return False

    def send_continue(self) -> bytes:
        self._continue = False
        return self._send(
            h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        )

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
        check_status(status, body)
        wire_headers = list(headers)
        for name, value in wire_headers:
            check_header(name, value)
        if status not in NO_BODY_STATUSES:
            wire_headers.append(("Content-Length", str(len(body))))
        if close:
            wire_headers.append(("Connection", "close"))
        conn = self._conn
        try:
            data = self._send(
                h11.Response(
                    status_code=status,
                    headers=wire_headers,
                    reason=REASONS.get(status, "").encode("ascii"),
                )
            )
            # A HEAD answer keeps the Content-Length a GET would get, without the
            # body (RFC 9110 9.3.2); h11 frames it as empty.
            if body and self._method != "HEAD":
                data += self._send(h11.Data(data=body))
            data += self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise InvalidResponse(str(exc)) from exc
        if not close and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._method = ""
        return data

    def trailing_data(self) -> bytes:
        return self._data[self._start :]

    def _send(self, event: h11.Event) -> bytes:
        return self._conn.send(event) or b""

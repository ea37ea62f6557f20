"""The reference request parser: h11's state machine behind the `RequestParser` seam.

Owns: translating h11 events and errors into the seam's events and GatewayErrors,
the limits h11 does not enforce itself (a complete head's size, the body size),
and serialising responses through h11, which checks both directions.
Must not: import trio or do I/O (STYLE 1); answer anything on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11

from tlvproxy.errors import BadRequest, GatewayError, HeadersTooLarge, PayloadTooLarge
from tlvproxy.server.parsers import (
    CONNECTION_CLOSED,
    NEED_DATA,
    NO_BODY_STATUSES,
    REASONS,
    Event,
    InvalidResponse,
    RequestEnd,
    RequestHead,
    check_header,
    check_status,
    comma_tokens,
    content_length,
    head_size,
    wants_keep_alive,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


class H11Parser:
    """A `RequestParser` on `h11.Connection` (see `parsers.RequestParser`)."""

    def __init__(self, *, max_header_bytes: int, max_body: int) -> None:
        # h11 raises its 431 once an incomplete head outgrows the receive buffer
        # limit; the size of a complete head is checked in _head (SPEC 4.2).
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_header_bytes = max_header_bytes
        self._max_body = max_body
        self._body: list[bytes] = []
        self._body_size = 0
        self._error: GatewayError | None = None
        self._deferred_error: GatewayError | None = None
        self._method = ""  # of the request being answered, for HEAD

    def receive_data(self, data: bytes) -> None:
        self._conn.receive_data(data)

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
                return NEED_DATA
            if isinstance(event, h11.Data):
                self._add_body(event.data)
            elif isinstance(event, h11.Request):
                return self._head(event)
            elif isinstance(event, h11.EndOfMessage):
                body = b"".join(self._body)
                self._body.clear()
                self._body_size = 0
                return RequestEnd(body)
            elif isinstance(event, h11.ConnectionClosed):
                return CONNECTION_CLOSED
            else:
                # PAUSED: the caller asked for the next request before answering this one.
                raise RuntimeError(f"h11 paused in state {conn.their_state}: answer first")

    def _head(self, event: h11.Request) -> RequestHead:
        method = event.method.decode("ascii")
        target = event.target.decode("latin-1")
        version = event.http_version.decode("ascii")
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
        )
        self._method = method
        if head_size(method, target, version, headers) > self._max_header_bytes:
            raise HeadersTooLarge(f"the request head is over {self._max_header_bytes} bytes")
        upgrade = method == "CONNECT" or (
            "upgrade" in comma_tokens(headers, "connection")
            and any(name == "upgrade" for name, _ in headers)
        )
        length = content_length(headers)
        if length is not None and length > self._max_body:
            # Refused before a byte of the body is read, and before 100 Continue (SPEC 4.2).
            self._deferred_error = PayloadTooLarge(
                f"the request body of {length} bytes is over {self._max_body} bytes"
            )
        return RequestHead(
            method, target, headers, version, wants_keep_alive(version, headers), upgrade
        )

    def _add_body(self, data: bytes) -> None:
        size = self._body_size + len(data)
        if size > self._max_body:
            raise PayloadTooLarge(f"the request body is over {self._max_body} bytes")
        self._body_size = size
        self._body.append(data)

    @property
    def has_partial_request(self) -> bool:
        return self._conn.their_state is not h11.IDLE or bool(self._conn.trailing_data[0])

    @property
    def expects_continue(self) -> bool:
        return self._conn.client_is_waiting_for_100_continue

    @property
    def can_pipeline(self) -> bool:
        # h11 pauses after a request until it is answered; its own `_method`
        # is then always the one being answered.
        return False

    def send_continue(self) -> bytes:
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
        return self._conn.trailing_data[0]

    def _send(self, event: h11.Event) -> bytes:
        return self._conn.send(event) or b""

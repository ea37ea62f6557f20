"""What the HTTP driver shares with its callers and handlers (docs/reference.md).

Owns: `Request`, one complete request as a handler sees it; `Response`, the
final answer it gives; `HttpSettings`, the limits and parser a connection
runs with; and the signatures of the handlers the driver calls (`Handler`,
`ErrorHandler`, `UpgradeHandler`).
Must not: read or write a connection, or parse HTTP (http_conn.py and the
parsers do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from tlvproxy.errors import GatewayError

if TYPE_CHECKING:
    from tlvproxy.config.model import Limits


@attrs.define(slots=True, kw_only=True)
class Request:
    """One complete request as the handler sees it. Read-only by convention:
    not frozen, because one is made per request and a frozen instance costs
    twice as much to make."""

    method: str
    target: str  # raw request target, e.g. "/v1/users/7/profile?x=1"
    path: str  # percent-decoded path, without the query
    query_string: str  # raw query, without "?"
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes
    http_version: str  # "1.1" or "1.0"
    remote_addr: str  # the peer's IP address
    received_at: float  # trio.current_time() when the head arrived

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        key = name.lower()
        for header_name, value in self.headers:
            if header_name == key:
                return value
        return None


@attrs.frozen(slots=True)
class Response:
    """A final answer. Content-Length and Connection are the driver's to add."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    # True when the status and headers are known to be valid (built by the
    # gateway from checked values), so serialising skips their checks.
    checked: bool = False


@attrs.frozen(slots=True, kw_only=True)
class HttpSettings:
    """The limits (docs/configuration.md "limits") and the parser one connection runs with."""

    max_header_bytes: int
    max_request_body: int
    header_timeout: float
    keepalive_timeout: float
    parser: Literal["h11", "httptools"]

    @classmethod
    def from_limits(cls, limits: Limits, parser: Literal["h11", "httptools"]) -> HttpSettings:
        """Settings from the table's `limits` and a resolved parser name."""
        return cls(
            max_header_bytes=limits.max_header_bytes,
            max_request_body=limits.max_request_body,
            header_timeout=limits.header_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            parser=parser,
        )


Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[GatewayError, Request | None], Response]
UpgradeHandler = Callable[[Request, trio.abc.Stream, bytes], Awaitable[None]]

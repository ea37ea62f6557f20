"""The gateway's error hierarchy: each error carries its own answer.

Owns: the error table (code and HTTP status, docs/reference.md "Errors") and the
close codes (docs/websocket.md "Close codes"), and the two renderings of an error
(a REST JSON body, a WebSocket error message).
Must not: do I/O or know about h11/wsproto; callers turn a rendering into bytes.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

_E = TypeVar("_E", bound=BaseException)


class GatewayError(Exception):
    """An error the gateway answers with: `code` and `http_status` (docs/reference.md
    "Errors").

    `ws_close` is the WebSocket close code when the error ends a session
    (docs/websocket.md "Close codes"); None means it is a per-message error and the
    session stays open.
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    ws_close: ClassVar[int | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> list[tuple[str, str]]:
        """Extra response headers this error needs (Allow, Retry-After)."""
        return []

    def details(self) -> dict[str, Any]:
        """Extra members of the JSON `error` object."""
        return {}


class BadRequest(GatewayError):
    code, http_status = "bad_request", 400


class Unauthorized(GatewayError):
    """Credentials missing or not valid (docs/security.md); `reason` labels the
    tlvproxy_auth_failures_total count, `challenge` is the WWW-Authenticate value."""

    code, http_status, ws_close = "unauthorized", 401, 1008

    def __init__(self, message: str, *, reason: str, challenge: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.challenge = challenge

    def headers(self) -> list[tuple[str, str]]:
        return [("WWW-Authenticate", self.challenge)]


class Forbidden(GatewayError):
    code, http_status, ws_close = "forbidden", 403, 1008


class RouteNotFound(GatewayError):
    code, http_status = "route_not_found", 404


class SessionNotFound(GatewayError):
    """A push session id that does not exist, has expired, or belongs to
    another identity: the three answer alike (docs/push-sessions.md "Identity")."""

    code, http_status = "session_not_found", 404


class MethodNotAllowed(GatewayError):
    code, http_status = "method_not_allowed", 405

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allow))]


class RequestTimeout(GatewayError):
    code, http_status = "request_timeout", 408


class PayloadTooLarge(GatewayError):
    code, http_status, ws_close = "payload_too_large", 413, 1009


class HeadersTooLarge(GatewayError):
    code, http_status = "headers_too_large", 431


class RateLimited(GatewayError):
    code, http_status = "rate_limited", 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after))]


class UpstreamStatus(GatewayError):
    """The upstream answered a non-zero status; the HTTP status is mapped by `status_map`
    (docs/reference.md "Mapping")."""

    code = "upstream_status"

    def __init__(
        self, message: str, status: int, http_status: int, body: Any | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.mapped_http_status = http_status
        self.body = body

    def details(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"status": self.status}
        if self.body is not None:
            extra["body"] = self.body
        return extra


class UpstreamUnavailable(GatewayError):
    code, http_status, ws_close = "upstream_unavailable", 502, 1011


class NoHealthyNode(UpstreamUnavailable):
    """No node of the upstream is healthy; a WebSocket session closes with 1013."""

    ws_close = 1013


class UpstreamProtocolError(GatewayError):
    """An upstream body the gateway cannot answer with; `reason` labels the
    tlvproxy_frames_rejected_total count."""

    code, http_status, ws_close = "upstream_protocol_error", 502, 1011
    reason: ClassVar[str] = "undecodable_body"


class AnswerTooLarge(UpstreamProtocolError):
    """An upstream body whose JSON form would be over the bound on what one
    answer may expand to (docs/reference.md "Answers too large to render")."""

    reason = "answer_too_large"


class ShuttingDown(GatewayError):
    code, http_status, ws_close = "shutting_down", 503, 1001


class Overloaded(GatewayError):
    """A connection limit is reached, or the worker has no file descriptor to
    spare (docs/operations.md "Connections and file descriptors"); a WebSocket
    session closes with 1013, try again later."""

    code, http_status, ws_close = "overloaded", 503, 1013


class UpstreamTimeout(GatewayError):
    code, http_status = "upstream_timeout", 504


def status_of(error: GatewayError) -> int:
    """The HTTP status to answer `error` with."""
    if isinstance(error, UpstreamStatus):
        return error.mapped_http_status
    return error.http_status


def error_body(error: GatewayError, request_id: str) -> dict[str, Any]:
    """The JSON error body: {"error": {code, message, request_id, ...}}
    (docs/reference.md "Errors")."""
    inner: dict[str, Any] = {
        "code": error.code,
        "message": error.message,
        "request_id": request_id,
    }
    inner.update(error.details())
    return {"error": inner}


def ws_error_message(error: GatewayError, seq: Any) -> dict[str, Any]:
    """The per-message error: {"seq": N, "error": {code, message}} (docs/websocket.md
    "json mode")."""
    inner: dict[str, Any] = {"code": error.code, "message": error.message}
    inner.update(error.details())
    return {"seq": seq, "error": inner}


def first_of(group: BaseExceptionGroup[_E]) -> _E:
    """The first exception of `group` (as `except*` gives it), however deeply
    nested nurseries grouped it."""
    found = group.exceptions[0]
    return first_of(found) if isinstance(found, BaseExceptionGroup) else found

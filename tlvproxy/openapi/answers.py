"""The gateway's own answers in the OpenAPI document: the error answers
(docs/reference.md "Errors"), the envelope (docs/configuration.md
"status_map and envelope") and the headers of a command's answer.

Owns: the statuses and codes of the error table as the document lists them,
the `ErrorBody` and `Envelope` schemas, one response component per error
status, and the headers every answer carries.
Must not: describe a command's own request or response (operations.py does),
do I/O or import trio.

Decisions made here:
- Every error status of docs/reference.md "Errors" is listed, plus each
  `status_map` value not among them; with `envelope: true` every answer is HTTP
  200 with the envelope.
- A command with a fallback lists the X-Fallback header on its 200 answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tlvproxy.openapi.messages import ref

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.model import CommandSpec

# The media type of JSON bodies.
JSON_TYPE: Final = "application/json"

# Every error status and the codes it carries (docs/reference.md "Errors").
ERROR_CODES: Final[dict[int, tuple[str, ...]]] = {
    400: ("bad_request",),
    401: ("unauthorized",),
    403: ("forbidden",),
    404: ("route_not_found",),
    405: ("method_not_allowed",),
    408: ("request_timeout",),
    413: ("payload_too_large",),
    429: ("rate_limited",),
    431: ("headers_too_large",),
    500: ("upstream_status", "internal_error"),
    502: ("upstream_unavailable", "upstream_protocol_error"),
    503: ("shutting_down",),
    504: ("upstream_timeout",),
}
_ERROR_TEXT: Final = {
    400: "The body is not valid JSON, or a field is unknown or of the wrong type.",
    401: (
        "Credentials missing, malformed, expired or not valid for the command's "
        "authenticator; see the WWW-Authenticate header."
    ),
    403: "A deny WAF rule matched (the message names the rule), or the caller lacks a claim.",
    404: "No route for the path.",
    405: "The path exists for other methods; see the Allow header.",
    408: "The request head or body did not arrive in time.",
    413: "The body is over limits.max_request_body.",
    429: "A rate limit refused the request; see the Retry-After header.",
    431: "The request head is over limits.max_header_bytes.",
    500: "The upstream answered a non-zero status that status_map does not map.",
    502: "No healthy upstream node, the connection failed, or the upstream sent a bad frame.",
    503: "The gateway is draining.",
    504: "The upstream did not answer within the timeout.",
}
# The schema components of an error answer and of the envelope.
ERROR_BODY: Final = "ErrorBody"
ENVELOPE: Final = "Envelope"
_REQUEST_ID_HEADER: Final = {
    "X-Request-Id": {
        "description": "The caller's X-Request-Id, or a new one.",
        "schema": {"type": "string"},
    }
}
_FALLBACK_HEADER: Final = {
    "X-Fallback": {
        "description": (
            "Present when the gateway answered in the upstream's place (the upstream was "
            "unavailable, timed out or sent a bad answer): static, the table's fallback "
            "body; last_good, the last good answer to the same request."
        ),
        "schema": {"type": "string", "enum": ["static", "last_good"]},
    }
}


def error_body_schema() -> dict[str, Any]:
    """The `ErrorBody` component: an error answer without the envelope."""
    codes = sorted({code for group in ERROR_CODES.values() for code in group})
    return {
        "type": "object",
        "description": 'The error answer; see the gateway\'s docs/reference.md, "Errors".',
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "request_id"],
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {
                        "type": "string",
                        "description": "What was wrong, in words a caller can act on.",
                    },
                    "request_id": {"type": "string"},
                    "status": {
                        "type": "integer",
                        "description": "upstream_status only: the upstream's status.",
                    },
                    "body": {
                        "description": "upstream_status only: the decoded response, "
                        "when it decodes.",
                    },
                },
            }
        },
    }


def envelope_schema() -> dict[str, Any]:
    """The `Envelope` component: every answer with `envelope: true`."""
    return {
        "type": "object",
        "description": (
            "With envelope: true every answer is HTTP 200 with this object. code is the "
            "upstream status (0 = success) or, for an error of the gateway, the HTTP "
            "status it would have answered."
        ),
        "required": ["code", "msg", "data"],
        "properties": {
            "code": {"type": "integer"},
            "msg": {"type": "string"},
            "data": {
                "description": "The response on success; null or the decoded response otherwise."
            },
        },
    }


def _error_response(text: str, codes: tuple[str, ...], status: int) -> dict[str, Any]:
    headers: dict[str, Any] = dict(_REQUEST_ID_HEADER)
    if status == 405:
        headers["Allow"] = {
            "description": "The methods the path has.",
            "schema": {"type": "string"},
        }
    if status == 429:
        headers["Retry-After"] = {
            "description": "Seconds until a retry can pass.",
            "schema": {"type": "integer"},
        }
    return {
        "description": f"{text} Codes: {', '.join(codes)}.",
        "headers": headers,
        "content": {JSON_TYPE: {"schema": ref(ERROR_BODY)}},
    }


def answer_headers(command: CommandSpec) -> dict[str, Any]:
    """The headers of a command's 200 answer: X-Request-Id, and X-Fallback when
    it has a fallback (docs/configuration.md "fallback")."""
    headers = dict(_REQUEST_ID_HEADER)
    if command.traffic is not None and command.traffic.fallback is not None:
        headers.update(_FALLBACK_HEADER)
    return headers


def error_responses(status_map: Mapping[int, int]) -> dict[str, Any]:
    """One answer per error status (docs/reference.md "Errors"), and per `status_map`
    value: an upstream status mapped onto a status answers with code upstream_status.
    Returns the components by name, `Error<status>`."""
    responses: dict[str, Any] = {}
    mapped: dict[int, list[int]] = {}
    for upstream_status, http_status in sorted(status_map.items()):
        mapped.setdefault(http_status, []).append(upstream_status)
    for status in sorted({*ERROR_CODES, *mapped}):
        text = _ERROR_TEXT.get(status, "")
        codes = ERROR_CODES.get(status, ())
        if status in mapped:
            shown = ", ".join(str(s) for s in mapped[status])
            text = f"{text} status_map maps the upstream's status {shown} here.".strip()
            if "upstream_status" not in codes:
                codes = (*codes, "upstream_status")
        responses[f"Error{status}"] = _error_response(text, codes, status)
    return responses

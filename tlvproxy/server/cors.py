"""Cross-origin REST calls from browser pages (docs/configuration.md "cors").

Owns: the answer to a CORS preflight (an OPTIONS request with
`Access-Control-Request-Method`), answered before routing, and the headers an
actual answer to an allowed page carries.
Must not: route, or decide anything for a request without `Origin` (not a
browser page's cross-origin call: nothing changes for it).

A page of an origin not listed gets a 403 `forbidden` preflight, so the
browser stops there; its simple requests are answered without CORS headers,
which the browser then hides from the page. The allowed origin is echoed from
the table, never from the request, with `Vary: Origin`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from tlvproxy.errors import Forbidden

if TYPE_CHECKING:
    from tlvproxy.config.model import CorsSpec

Headers = list[tuple[str, str]]


def allowed_origin(cors: CorsSpec, origin: str) -> str | None:
    """The Access-Control-Allow-Origin value for a page of `origin`, or None."""
    if cors.origins == ("*",):
        return "*"
    return origin if origin in cors.origins else None


def answer_headers(cors: CorsSpec, origin: str) -> Headers | None:
    """What an answer to a page of `origin` adds, or None when the origin is not allowed."""
    allowed = allowed_origin(cors, origin)
    if allowed is None:
        return None
    return [("Access-Control-Allow-Origin", allowed), *_answer_extra(cors)]


def preflight_headers(cors: CorsSpec, origin: str, method: str) -> Headers:
    """The headers of a 204 preflight answer; raises Forbidden when the page's
    origin or the method it asks for is not allowed."""
    allowed = allowed_origin(cors, origin)
    if allowed is None:
        raise Forbidden(f"cross-origin calls from {origin[:100]!r} are not allowed")
    if method not in cors.methods:
        raise Forbidden(f"cross-origin {method[:20]!r} requests are not allowed")
    return [("Access-Control-Allow-Origin", allowed), *_preflight_extra(cors)]


@lru_cache(maxsize=8)
def _answer_extra(cors: CorsSpec) -> tuple[tuple[str, str], ...]:
    extra = [("Vary", "Origin")]
    if cors.expose_headers:
        extra.append(("Access-Control-Expose-Headers", ", ".join(cors.expose_headers)))
    if cors.credentials:
        extra.append(("Access-Control-Allow-Credentials", "true"))
    return tuple(extra)


@lru_cache(maxsize=8)
def _preflight_extra(cors: CorsSpec) -> tuple[tuple[str, str], ...]:
    extra = [
        ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ("Access-Control-Allow-Methods", ", ".join(cors.methods)),
        ("Access-Control-Max-Age", str(int(cors.max_age))),
    ]
    if cors.headers:
        extra.append(("Access-Control-Allow-Headers", ", ".join(cors.headers)))
    if cors.credentials:
        extra.append(("Access-Control-Allow-Credentials", "true"))
    return tuple(extra)

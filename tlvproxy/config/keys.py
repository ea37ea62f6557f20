"""Key expressions: which value of an incoming request a rule or field uses (SPEC 3).

Owns: parsing `remote_addr`, `header.NAME`, `query.NAME`, `path.NAME`,
`cookie.NAME`, and evaluating one against a `RequestView`.
Must not: parse HTTP itself; the server builds the view from what it parsed.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Literal, Protocol

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

KeySource = Literal["remote_addr", "header", "query", "path", "cookie"]
_SOURCES: tuple[KeySource, ...] = ("header", "query", "path", "cookie")


class RequestView(Protocol):
    """What a key expression may read; the REST and WebSocket servers provide it.

    `headers` keys are lower-case; `query` holds the first value of each name.
    """

    @property
    def remote_addr(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def path_params(self) -> Mapping[str, str]: ...


@attrs.frozen(slots=True)
class KeyExpr:
    """A parsed key expression; `name` is lower-cased for headers."""

    source: KeySource
    name: str = ""

    def __str__(self) -> str:
        return self.source if self.source == "remote_addr" else f"{self.source}.{self.name}"

    def evaluate(self, request: RequestView) -> str | None:
        """The value this expression names in `request`, or None when it is absent."""
        if self.source == "remote_addr":
            return request.remote_addr
        if self.source == "header":
            return request.headers.get(self.name)
        if self.source == "query":
            return request.query.get(self.name)
        if self.source == "path":
            return request.path_params.get(self.name)
        return _cookie(request.headers.get("cookie"), self.name)


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return None if morsel is None else morsel.value


def parse_key(text: object) -> KeyExpr:
    """Parse a key expression. Raises ValueError naming the accepted forms."""
    if not isinstance(text, str):
        raise ValueError(f"expected a key expression string, got {text!r}")
    if text == "remote_addr":
        return KeyExpr("remote_addr")
    source, dot, name = text.partition(".")
    if dot and name and source in _SOURCES:
        return KeyExpr(source, name.lower() if source == "header" else name)
    raise ValueError(
        f"invalid key expression {text!r}: use remote_addr, header.NAME, query.NAME, "
        "path.NAME or cookie.NAME"
    )

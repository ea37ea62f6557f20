"""Key expressions: which value of an incoming request a rule or field uses.

Owns: parsing `remote_addr`, `header.NAME`, `query.NAME`, `path.NAME`,
`cookie.NAME`, `auth.sub`, `auth.consumer`, `auth.claim.NAME`, evaluating
one against a `RequestView`, and the value a traffic rule reads of one
(`rule_value`).
Must not: parse HTTP itself or verify credentials; the server builds the view
from what it parsed and what the authenticator verified.

A request's `numbers` hold the values of the key expressions that fill a
number, already normalised (`010`, `+10` and `10` all read `10`); an
expression found there reads that value wherever it is used, so a rate-limit
key or a hash key is the number, not the caller's spelling of it
(docs/configuration.md "Key expressions").
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from operator import attrgetter
from typing import TYPE_CHECKING, Literal, Protocol

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable, Container, Mapping

KeySource = Literal["remote_addr", "header", "query", "path", "cookie", "auth"]
_SOURCES: tuple[KeySource, ...] = ("header", "query", "path", "cookie")
_IDENTITY_NAMES = ("sub", "consumer")


class Identity(Protocol):
    """What a key expression reads of a verified identity (`tlvproxy.auth.Identity`)."""

    def value(self, name: str) -> str | None: ...


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
    @property
    def identity(self) -> Identity | None: ...
    @property
    def numbers(self) -> Mapping[KeyExpr, str] | None: ...


@attrs.frozen(slots=True)
class KeyExpr:
    """A parsed key expression; `name` is lower-cased for headers.

    `read` reads the value from a request as it came, without its `numbers`:
    for the callers that know a request has none (`evaluate` is the general
    way); chosen once, so a read costs no dispatch on the source.
    """

    source: KeySource
    name: str = ""
    read: Callable[[RequestView], str | None] = attrs.field(
        init=False, eq=False, repr=False, hash=False
    )

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "read", _reader(self.source, self.name))

    def __str__(self) -> str:
        return self.source if self.source == "remote_addr" else f"{self.source}.{self.name}"

    def evaluate(self, request: RequestView) -> str | None:
        """The value this expression names in `request`, or None when it is absent."""
        numbers = request.numbers
        if numbers is not None and (number := numbers.get(self)) is not None:
            return number
        return self.read(request)


def _reader(source: KeySource, name: str) -> Callable[[RequestView], str | None]:
    if source == "remote_addr":
        return attrgetter("remote_addr")
    if source == "header":
        return lambda request: request.headers.get(name)
    if source == "query":
        return lambda request: request.query.get(name)
    if source == "path":
        return lambda request: request.path_params.get(name)
    if source == "auth":
        return lambda request: None if request.identity is None else request.identity.value(name)
    return lambda request: _cookie(request.headers.get("cookie"), name)


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
    if source == "auth" and (name in _IDENTITY_NAMES or (name.startswith("claim.") and name[6:])):
        return KeyExpr("auth", name)
    raise ValueError(
        f"invalid key expression {text!r}: use remote_addr, header.NAME, query.NAME, "
        "path.NAME, cookie.NAME, auth.sub, auth.consumer or auth.claim.NAME"
    )


def rule_value(key: KeyExpr, view: RequestView, numeric: Container[KeyExpr]) -> str | None:
    """The value a `split` rule or a `last_good` cache reads of `key` for a
    request of a command whose keys that fill a number are `numeric`
    (docs/configuration.md "split"): None when it is absent or empty; for a
    key in `numeric`, the number, normalised as `parse_number` reads it, and
    None when it is no number (a REST request refuses it before; a WebSocket
    session reads only its own uid, so its messages are read here), so that
    REST and WebSocket read one key alike."""
    value = key.evaluate(view)
    if not value:
        return None
    if key in numeric:
        try:
            return str(parse_number(key, value))
        except ValueError:
            return None
    return value


def parse_number(key: KeyExpr, text: str) -> int:
    """The whole number `text` spells, for a key expression that fills a number.

    Digits with an optional sign only: `010`, `+10` and `10` are ten; `1_0`,
    ` 10` and non-ASCII digits, which Python's int() would take, are refused.
    Raises ValueError saying what was expected.
    """
    digits = text[1:] if text[:1] in "+-" else text
    if not digits.isascii() or not digits.isdigit() or len(digits) > 20:
        raise ValueError(f"{key}: expected a whole number, got {text[:40]!r}")
    return int(text)

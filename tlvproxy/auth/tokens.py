"""The `jwt` authenticator: a bearer token checked against a key set (docs/security.md "JWT").

Owns: finding the token (`token_from`, first present place; a `Bearer ` prefix
stripped), the header checks (`alg` in the allow-list, a key of its `kid`),
the signature, `iss` and `aud` through PyJWT, `exp` and `nbf` with `leeway`
against the caller's clock, the reason of every refusal, and a bounded cache of verified
tokens.
Must not: fetch keys (a `KeySource` hands over the current `KeySet`) or do I/O.

The cache: a client sends the same token with every request until it expires,
and checking a signature costs tens of microseconds (RS256, ES256), most of a
request's work. A verified token is kept, with its identity and the Unix times
between which it is valid, for as long as that window and the key set it was
checked with last: a new key set (rotation, reload) empties it. At most
`CACHE_SIZE` tokens; past that the oldest go first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, Protocol

import jwt
from jwt.exceptions import (
    DecodeError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidSubjectError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWTError,
)

from tlvproxy.auth.identity import Identity, refuse

if TYPE_CHECKING:
    from tlvproxy.config.jwks import KeySet
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import JwtAuthSpec
    from tlvproxy.errors import Unauthorized

CACHE_SIZE: Final = 4096
# Longer tokens are refused before any parsing.
MAX_TOKEN: Final = 8192

_CHALLENGE: Final = 'Bearer realm="tlvproxy"'
_INVALID: Final = 'Bearer realm="tlvproxy", error="invalid_token"'
# PyJWT's refusals, most specific first (they subclass each other).
_REASONS: Final = (
    (InvalidIssuerError, "issuer", "the token's issuer is not accepted"),
    (InvalidAudienceError, "audience", "the token's audience is not accepted"),
    (MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (InvalidSubjectError, "malformed", "the token's sub is not a string"),
    (InvalidSignatureError, "signature", "the token's signature does not verify"),
    (InvalidAlgorithmError, "algorithm", "the token's algorithm is not accepted"),
    (DecodeError, "malformed", "the token is not a well-formed JWT"),
)


class KeySource(Protocol):
    """Where a `jwt` authenticator finds its keys: a file's set, or a URL's."""

    @property
    def current(self) -> KeySet | None:
        """The key set to verify with; None while a URL's first fetch is pending."""

    def unknown_kid(self) -> None:
        """A token named a `kid` the current set lacks (a URL may refetch)."""


class StaticKeys:
    """The key set of a file, read when the table was loaded."""

    __slots__ = ("current",)

    def __init__(self, key_set: KeySet) -> None:
        self.current: KeySet | None = key_set

    def unknown_kid(self) -> None:
        """A file's keys change only with a reload."""


class JwtAuthenticator:
    """Verifies bearer tokens for one `type: jwt` authenticator."""

    kind = "jwt"

    def __init__(self, spec: JwtAuthSpec, keys: KeySource) -> None:
        self.name = spec.name
        self._spec = spec
        self._keys = keys
        self._algorithms = frozenset(spec.algorithms)
        self._places = spec.token_from
        # `exp` and `nbf` are checked here, against the caller's clock, so that
        # the cache and the check read one clock; `iat` is not checked.
        self._options = {
            "verify_aud": bool(spec.audience),
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        self._audience = list(spec.audience) or None
        # token -> (identity, valid from, valid until), checked with `_cached_with`.
        self._cache: dict[str, tuple[Identity, float, float]] = {}
        self._cached_with: KeySet | None = None

    def authenticate(
        self, view: RequestView, method: str, target: str, body: bytes, now: float
    ) -> Identity:
        """The identity `view`'s token proves at Unix time `now`; raises Unauthorized."""
        token = self._token(view)
        keys = self._keys.current
        if keys is not self._cached_with:
            self._cache.clear()
            self._cached_with = keys
        hit = self._cache.get(token)
        if hit is not None:
            identity, valid_from, valid_until = hit
            if valid_from <= now <= valid_until:
                return identity
            del self._cache[token]  # expired: verified again below, to say why
        if keys is None:
            self._keys.unknown_kid()  # every kid is unknown without a set
            raise _fail("keys_unavailable", "the key set could not be fetched yet")
        identity = self._verify(token, keys, now)
        self._remember(token, identity)
        return identity

    def _token(self, view: RequestView) -> str:
        for place in self._places:
            value = place.evaluate(view)
            if value is None:
                continue
            if value[:7].lower() == "bearer ":
                value = value[7:].strip()
            elif place.source == "header" and place.name == "authorization":
                raise _fail("malformed", "the Authorization header is not a Bearer token")
            if not value or len(value) > MAX_TOKEN:
                raise _fail("malformed", "the token is empty or longer than 8 KiB")
            return value
        places = ", ".join(map(str, self._places))
        raise refuse(f"a token is required (in {places})", reason="missing", challenge=_CHALLENGE)

    def _verify(self, token: str, keys: KeySet, now: float) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError:
            # DecodeError, and PyJWT's own checks of `kid` and `crit`.
            raise _fail("malformed", "the token's header is not well-formed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _fail(
                "algorithm", f"the token's algorithm {str(algorithm)[:20]!r} is not accepted"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _fail("malformed", "the token's kid is not a string")
        key = keys.find(kid, algorithm)
        if key is None:
            if kid not in keys:
                self._keys.unknown_kid()
                raise _fail("unknown_key", "the token's key (kid) is not in the key set")
            raise _fail("algorithm", f"the token's key does not take {algorithm}")
        spec = self._spec
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=spec.issuer,
                leeway=spec.leeway,
                options=self._options,  # type: ignore[arg-type]  # PyJWT types options as a TypedDict
            )
        except PyJWTError as exc:
            for error, reason, message in _REASONS:
                if isinstance(exc, error):
                    raise _fail(reason, message) from None
            raise _fail("invalid", "the token is not valid") from None
        exp = _time_claim(claims, "exp")
        nbf = _time_claim(claims, "nbf")
        if exp is not None and now > exp + spec.leeway:
            raise _fail("expired", "the token has expired")
        if nbf is not None and now < nbf - spec.leeway:
            raise _fail("not_yet_valid", "the token is not valid yet (nbf)")
        sub = claims.get("sub")
        return Identity(
            authenticator=self.name,
            sub=None if sub is None else str(sub),
            claims=claims,
            expires_at=None if exp is None else exp + spec.leeway,
        )

    def _remember(self, token: str, identity: Identity) -> None:
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]
        leeway = self._spec.leeway
        nbf = identity.claims.get("nbf")
        valid_from = nbf - leeway if isinstance(nbf, int | float) else -math.inf
        exp = identity.expires_at
        valid_until = exp if exp is not None else math.inf
        cache[token] = (identity, valid_from, valid_until)


def _time_claim(claims: dict[str, object], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 2): a number of seconds, or absent."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _fail("malformed", f"the token's {name} is not a number of seconds")
    return float(value)


def _fail(reason: str, message: str) -> Unauthorized:
    return refuse(message, reason=reason, challenge=_INVALID)

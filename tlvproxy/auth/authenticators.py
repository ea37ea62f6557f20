"""The authenticators of one loaded table, by name (docs/security.md).

Owns: building each authenticator from its spec (with the key source of a
`jwt` one), checking a request against a command's authenticator and claims,
and counting every refusal in tlvproxy_auth_failures_total.
Must not: fetch keys or read the clock; the gateway runs `RemoteKeys` and
passes the time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tlvproxy.auth.api_keys import ApiKeyAuthenticator
from tlvproxy.auth.identity import check_claims
from tlvproxy.auth.signatures import HmacAuthenticator
from tlvproxy.auth.tokens import JwtAuthenticator, KeySource, StaticKeys
from tlvproxy.config.jwks import parse_key_set
from tlvproxy.config.model import ApiKeyAuthSpec, HmacAuthSpec
from tlvproxy.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tlvproxy.auth.identity import Identity
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import AuthSpec, ClaimValue, JwtAuthSpec
    from tlvproxy.metrics import Metrics


class Authenticator(Protocol):
    name: str
    kind: str

    def authenticate(
        self, view: RequestView, method: str, target: str, body: bytes, now: float
    ) -> Identity: ...


class Authenticators:
    """The table's authenticators; `remote_keys(spec)` gives a URL's key source.

    After a reload, an authenticator whose spec did not change is the one of
    the `previous` table, state included: a signed request seen before the
    reload is still a replay after it, and verified tokens stay verified. A
    changed `hmac` authenticator keeps the signatures its namesake saw.
    """

    def __init__(
        self,
        specs: Mapping[str, AuthSpec],
        metrics: Metrics,
        remote_keys: Callable[[JwtAuthSpec], KeySource],
        previous: Authenticators | None = None,
    ) -> None:
        self._metrics = metrics
        self._specs = dict(specs)
        self._by_name: dict[str, Authenticator] = {}
        for name, spec in specs.items():
            old = None if previous is None else previous._by_name.get(name)
            if old is not None and previous is not None and previous._specs[name] == spec:
                self._by_name[name] = old
            elif isinstance(spec, HmacAuthSpec):
                seen = old.seen if isinstance(old, HmacAuthenticator) else None
                self._by_name[name] = HmacAuthenticator(spec, seen)
            else:
                self._by_name[name] = _build(spec, remote_keys)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def authenticate(
        self,
        name: str,
        view: RequestView,
        method: str,
        target: str,
        body: bytes,
        now: float,
        claims: Mapping[str, tuple[ClaimValue, ...]] | None = None,
    ) -> Identity:
        """The identity the request proves to authenticator `name`, holding `claims`.

        Raises Unauthorized (401) or Forbidden (403, a claim missing), counted.
        """
        try:
            identity = self._by_name[name].authenticate(view, method, target, body, now)
            if claims:
                check_claims(claims, identity)
        except Unauthorized as refusal:
            self._metrics.auth_failures.labels(name, refusal.reason).inc()
            raise
        except Forbidden:
            self._metrics.auth_failures.labels(name, "claims").inc()
            raise
        return identity

    def check_claims(
        self, name: str, claims: Mapping[str, tuple[ClaimValue, ...]], identity: Identity
    ) -> None:
        """Raise Forbidden (counted) unless `identity` holds `claims`."""
        try:
            check_claims(claims, identity)
        except Forbidden:
            self._metrics.auth_failures.labels(name, "claims").inc()
            raise


def _build(spec: AuthSpec, remote_keys: Callable[[JwtAuthSpec], KeySource]) -> Authenticator:
    if isinstance(spec, ApiKeyAuthSpec):
        return ApiKeyAuthenticator(spec)
    if isinstance(spec, HmacAuthSpec):
        return HmacAuthenticator(spec, None)
    if spec.key_set is None:
        return JwtAuthenticator(spec, remote_keys(spec))
    # The loader parsed this text already; a table that loaded has a valid set.
    return JwtAuthenticator(spec, StaticKeys(parse_key_set(spec.key_set, spec.algorithms)))

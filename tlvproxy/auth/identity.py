"""A verified identity, and the refusals of authenticators (docs/security.md).

Owns: `Identity` (what an authenticator vouches for, read by `auth.*` key
expressions and written to access records), `refuse` (the 401 of an
authenticator) and the check of a command's required `claims` (403).
Must not: read requests or credentials; authenticators do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import orjson

from tlvproxy.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.model import ClaimValue


@attrs.frozen(slots=True, kw_only=True)
class Identity:
    """What one authenticator verified about a caller.

    `sub` is a JWT's subject; `consumer` the name of an API key or the key id of
    a signed request; `claims` a JWT's claims or an API key's other entries;
    `expires_at` the Unix time after which it is no longer accepted: a JWT's
    `exp` plus the authenticator's `leeway`, when the token has an `exp`.
    """

    authenticator: str
    sub: str | None = None
    consumer: str | None = None
    claims: Mapping[str, Any] = attrs.field(factory=dict)
    expires_at: float | None = None

    def value(self, name: str) -> str | None:
        """The text of `auth.NAME`: `sub`, `consumer` or `claim.X`; None when absent."""
        if name == "sub":
            return self.sub
        if name == "consumer":
            return self.consumer
        return claim_text(self.claims.get(name[6:]))

    def log_fields(self) -> dict[str, str]:
        """The access record's identity fields (docs/operations.md "Access records")."""
        fields = {"auth": self.authenticator}
        if self.sub is not None:
            fields["sub"] = self.sub
        if self.consumer is not None:
            fields["consumer"] = self.consumer
        return fields


def claim_text(value: object) -> str | None:
    """A claim as a key expression reads it: strings as they are, numbers in
    decimal, booleans as true/false, lists and objects as compact JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return orjson.dumps(value).decode()


def refuse(message: str, *, reason: str, challenge: str) -> Unauthorized:
    """The 401 an authenticator raises; `reason` labels tlvproxy_auth_failures_total."""
    return Unauthorized(message, reason=reason, challenge=challenge)


def check_claims(required: Mapping[str, tuple[ClaimValue, ...]], identity: Identity) -> None:
    """Raise Forbidden unless every required claim holds one of its values.

    A claim that is a list holds a value when the list contains it (a `roles`
    claim, say). Booleans match only booleans, so `true` never matches 1.
    """
    for name, accepted in required.items():
        value = identity.claims.get(name)
        present = value if isinstance(value, list) else [value]
        if not any(_same(item, want) for item in present for want in accepted):
            raise Forbidden(f"the caller's identity lacks the claim {name!r} this command requires")


def _same(value: object, want: ClaimValue) -> bool:
    if isinstance(value, bool) or isinstance(want, bool):
        return value is want
    return value == want

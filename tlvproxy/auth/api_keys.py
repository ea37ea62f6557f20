"""The `api_key` authenticator: a key looked up by its SHA-256 (docs/security.md "API keys").

Owns: reading the key from its header or query parameter, and finding the
consumer whose `sha256` it has. The table holds digests only, so a leaked
table leaks no key. The lookup is a dict lookup of the digest of what the
caller sent, which is as good as a constant-time compare here: a caller
cannot choose the bytes of a SHA-256, so how long a lookup takes tells
nothing about any key (docs/security.md "API keys").
Must not: do I/O.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Final

from tlvproxy.auth.identity import Identity, refuse

if TYPE_CHECKING:
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import ApiKeyAuthSpec

MAX_KEY: Final = 1024


class ApiKeyAuthenticator:
    """Verifies API keys for one `type: api_key` authenticator."""

    kind = "api_key"

    def __init__(self, spec: ApiKeyAuthSpec) -> None:
        self.name = spec.name
        self._source = spec.source
        self._challenge = f'ApiKey realm="tlvproxy", {spec.source.source}="{spec.source.name}"'
        self._by_digest = {
            entry.sha256: Identity(
                authenticator=spec.name, consumer=entry.consumer, claims=entry.claims
            )
            for entry in spec.keys
        }

    def authenticate(
        self, view: RequestView, method: str, target: str, body: bytes, now: float
    ) -> Identity:
        """The consumer whose key `view` carries; raises Unauthorized."""
        key = self._source.evaluate(view)
        if not key:
            raise refuse(
                f"an API key is required (in {self._source})",
                reason="missing",
                challenge=self._challenge,
            )
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        identity = self._by_digest.get(digest)
        if identity is None or len(key) > MAX_KEY:
            raise refuse("the API key is not valid", reason="bad_key", challenge=self._challenge)
        return identity

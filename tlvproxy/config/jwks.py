"""JSON Web Key Sets: parsing one into the keys each accepted algorithm may use.

Owns: `parse_key_set` (JWKS text -> `KeySet`), the algorithm allow-list rules
(docs/security.md "JWT"): `none` is never an algorithm; each algorithm uses
only keys of its own type (`oct` for HS*, `RSA` for RS*/PS*, `EC` with the
matching curve for ES*, `OKP` for EdDSA), so a public RSA key can never be
used as an HMAC secret (the HS/RS confusion); a key whose `alg` is set is used
for that algorithm only; a key whose `use` is not `sig` is skipped.
Must not: fetch anything (tlvproxy/auth/remote_keys.py does) or verify tokens
(tlvproxy/auth/tokens.py). It lives with the table, which checks a key set
file when it loads; the authenticators (tlvproxy/auth/) use it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWTError

if TYPE_CHECKING:
    from collections.abc import Iterable

# Algorithm -> (key type, curve or None): the only keys each may use.
KEY_TYPES: Final[dict[str, tuple[str, str | None]]] = {
    "HS256": ("oct", None),
    "HS384": ("oct", None),
    "HS512": ("oct", None),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
ALGORITHMS: Final = tuple(KEY_TYPES)
# A key set bigger than this is refused (a URL could serve anything).
MAX_KEYS: Final = 256


class KeySet:
    """Keys by `kid` (None for a key without one), each ready for the
    algorithms it may verify."""

    __slots__ = ("_keys",)

    def __init__(self, keys: dict[str | None, dict[str, PyJWK]]) -> None:
        self._keys = keys

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, kid: str | None, algorithm: str) -> PyJWK | None:
        """The key `kid` ready for `algorithm`; a token without a `kid` may use the
        set's only key. None when there is no such key."""
        by_algorithm = self._keys.get(kid)
        if by_algorithm is None and kid is None and len(self._keys) == 1:
            by_algorithm = next(iter(self._keys.values()))
        return None if by_algorithm is None else by_algorithm.get(algorithm)


def parse_key_set(text: str | bytes, algorithms: Iterable[str]) -> KeySet:
    """The keys of a JWKS document usable with `algorithms`.

    Raises ValueError naming the first problem: not JSON, no `keys` list, a key
    that does not parse, a repeated `kid`, or no key usable with `algorithms`.
    """
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the key set is not valid JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('a key set is a JSON object with a "keys" list (RFC 7517 5)')
    if len(entries) > MAX_KEYS:
        raise ValueError(f"the key set has {len(entries)} keys; at most {MAX_KEYS} are accepted")
    wanted = tuple(algorithms)
    keys: dict[str | None, dict[str, PyJWK]] = {}
    for index, entry in enumerate(entries):
        kid, usable = _key(index, entry, wanted)
        if kid in keys:
            raise ValueError(f"keys[{index}]: kid {kid!r} appears twice")
        if usable:
            keys[kid] = usable
    if not keys:
        raise ValueError(f"the key set has no key usable with {', '.join(wanted)}")
    return KeySet(keys)


def _key(
    index: int, entry: Any, algorithms: tuple[str, ...]
) -> tuple[str | None, dict[str, PyJWK]]:
    where = f"keys[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a key is a JSON object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError(f"{where}: kid must be a string")
    if "d" in entry and entry.get("kty") != "oct":
        raise ValueError(f'{where}: a private key (it has "d"); publish only public keys')
    if entry.get("use", "sig") != "sig":
        return kid, {}
    fixed = entry.get("alg")
    usable: dict[str, PyJWK] = {}
    for algorithm in algorithms:
        kty, curve = KEY_TYPES[algorithm]
        if entry.get("kty") != kty or (curve is not None and entry.get("crv") != curve):
            continue
        if fixed is not None and fixed != algorithm:
            continue
        try:
            usable[algorithm] = PyJWK(entry, algorithm)
        except PyJWTError as exc:
            raise ValueError(f"{where} ({kid or 'no kid'}): {exc}") from None
    return kid, usable

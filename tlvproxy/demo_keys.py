"""The demo's signing key and its tokens (`tlvproxy demo-keys`, `mock-upstream --token-key`).

Owns: making the demo's EC P-256 key pair (the private key as PEM, mode 0600;
the public key as a JWKS the demo table's `users` authenticator reads), and
`TokenIssuer`, which signs the ES256 tokens the demo upstream's `login` answers.
Must not: be imported by the gateway; it only verifies tokens (`tlvproxy.auth`).

This is a DEMO: `login` gives a token for whatever user id it is asked for.
A real deployment gets its tokens from an identity provider that checks who the
caller is, and points `auth[].keys` at that provider's key set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from typing import TYPE_CHECKING, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

if TYPE_CHECKING:
    from pathlib import Path

PRIVATE_KEY: Final = "demo-signing-key.pem"
KEY_SET: Final = "jwks.json"
ALGORITHM: Final = "ES256"
# The demo table's `users` authenticator checks these (commands.yaml).
ISSUER: Final = "tlvproxy-demo"
AUDIENCE: Final = "tlvproxy-demo"
LIFETIME: Final = 3600.0  # seconds a demo token is valid


def make_demo_keys(directory: Path) -> tuple[Path, Path]:
    """A new key pair in `directory` (made if missing): (private key PEM, JWKS).

    Replaces the files that are there. The private key is written first and
    readable by its owner only; the JWKS last, so that a JWKS on disk always has
    its private key beside it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    jwk = public_jwk(private.public_key())
    key_path = directory / PRIVATE_KEY
    set_path = directory / KEY_SET
    _write(key_path, pem, 0o600)
    _write(set_path, (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode(), 0o644)
    return key_path, set_path


def public_jwk(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public key as a JWK for ES256 signatures, its `kid` from its thumbprint."""
    jwk: dict[str, str] = ECAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": key_id(jwk), "alg": ALGORITHM, "use": "sig"}


def key_id(jwk: dict[str, str]) -> str:
    """`demo-` and the start of the key's RFC 7638 thumbprint: a new key gets a new kid."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=")
    return "demo-" + digest[:16].decode()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it), with `mode`."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)  # mkstemp makes it 0600; the key stays so
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class TokenIssuer:
    """Signs demo tokens with the private key of `make_demo_keys`."""

    def __init__(self, pem: bytes, *, lifetime: float = LIFETIME) -> None:
        """Raises ValueError when `pem` is not an unencrypted EC P-256 private key."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("expected an EC P-256 private key (what `tlvproxy demo-keys` makes)")
        self._key = key
        self._kid = key_id(public_jwk(key.public_key()))
        self._lifetime = lifetime

    @classmethod
    def from_file(cls, path: Path) -> TokenIssuer:
        """The issuer of the key at `path`; raises OSError or ValueError."""
        return cls(path.read_bytes())

    def issue(self, user_id: int, now: float) -> tuple[str, int]:
        """(token, expiry in unix milliseconds) for `user_id`, `now` being unix seconds."""
        issued = int(now)
        expires = issued + int(self._lifetime)
        claims = {
            "sub": str(user_id),
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": issued,
            "exp": expires,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self._kid})
        return token, expires * 1000

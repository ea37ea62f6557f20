"""Real keys and tokens for the authentication tests, made fresh per test run."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: Any = RSA_KEY, kid: str = "r1", **extra: Any) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", **extra}


def ec_jwk(key: Any = EC_KEY, kid: str = "e1", **extra: Any) -> dict[str, Any]:
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", **extra}


def jwks(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


def token(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = RSA_KEY,
    algorithm: str = "RS256",
    kid: str | None = "r1",
    **extra: Any,
) -> str:
    """A signed token; `claims` default to sub 7 expiring in an hour, `extra` adds claims."""
    payload = {"sub": "7", "exp": int(time.time()) + 3600} if claims is None else dict(claims)
    payload.update(extra)
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with `header` (say alg none) and no signature."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def hs256_with(secret: bytes, claims: dict[str, Any], kid: str = "r1") -> str:
    """An HS256 token whose secret is `secret`, made by hand (PyJWT refuses a PEM secret)."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.digest(secret, f"{head}.{body}".encode(), "sha256")
    return f"{head}.{body}.{b64url(signature)}"


def rs256_with_header(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An RS256 token signed by RSA_KEY with `header` as given (PyJWT would refuse some)."""
    head = b64url(json.dumps({"alg": "RS256", **header}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = RSA_KEY.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64url(signature)}"


def public_pem(key: Any = RSA_KEY) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()

"""`tlvproxy demo-keys` and the demo's token issuer (tlvproxy/demo_keys.py)."""

from __future__ import annotations

import json
import stat
from typing import TYPE_CHECKING

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.cli import run_cli
from tlvproxy.config.jwks import parse_key_set
from tlvproxy.demo_keys import AUDIENCE, ISSUER, KEY_SET, PRIVATE_KEY, TokenIssuer

if TYPE_CHECKING:
    from pathlib import Path


def test_demo_keys_writes_a_private_key_and_its_public_key_set(tmp_path: Path) -> None:
    directory = tmp_path / "build" / "demo-keys"
    result = run_cli("demo-keys", str(directory))
    assert result.returncode == 0, result.stderr
    key, key_set = directory / PRIVATE_KEY, directory / KEY_SET
    assert str(key) in result.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    (jwk,) = json.loads(key_set.read_text())["keys"]
    assert jwk.keys() == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # no "d"
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    assert jwk["kid"].startswith("demo-")
    # What the gateway's `users` authenticator reads it as.
    assert parse_key_set(key_set.read_text(), ["ES256"]).find(jwk["kid"], "ES256") is not None

    # A token of that key verifies with that set.
    token, _ = TokenIssuer.from_file(key).issue(9, 1_900_000_000)
    (public,) = jwt.PyJWKSet.from_json(key_set.read_text()).keys
    claims = jwt.decode(
        token,
        public.key,
        algorithms=["ES256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert (claims["sub"], claims["exp"]) == ("9", 1_900_003_600)

    # Run again: a new key with a new kid, files replaced.
    again = run_cli("demo-keys", str(directory))
    assert again.returncode == 0, again.stderr
    (renewed,) = json.loads(key_set.read_text())["keys"]
    assert renewed["kid"] != jwk["kid"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == [PRIVATE_KEY, KEY_SET]


def test_issue_gives_the_expiry_in_milliseconds(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token, expires_at = TokenIssuer(pem, lifetime=60).issue(3, 1_900_000_000.7)
    claims = jwt.decode(
        token,
        key.public_key(),
        algorithms=["ES256"],
        audience=AUDIENCE,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert (claims["iat"], claims["exp"], expires_at) == (
        1_900_000_000,
        1_900_000_060,
        1_900_000_060_000,
    )
    assert jwt.get_unverified_header(token)["kid"].startswith("demo-")


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"not a key", "not an unencrypted PEM private key"),
        (
            rsa.generate_private_key(65537, 2048).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "expected an EC P-256 private key",
        ),
        (
            ec.generate_private_key(ec.SECP384R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "expected an EC P-256 private key",
        ),
    ],
)
def test_the_issuer_takes_an_ec_p256_private_key_only(pem: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenIssuer(pem)


def test_demo_keys_reports_a_directory_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run_cli("demo-keys", str(tmp_path / "file" / "keys"))
    assert result.returncode == 1
    assert result.stderr.startswith("tlvproxy demo-keys: ")

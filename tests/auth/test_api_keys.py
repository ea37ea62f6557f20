"""The api_key authenticator (docs/security.md "API keys")."""

from __future__ import annotations

import pytest

from tests.auth.keys import sha256_hex
from tlvproxy.auth.api_keys import ApiKeyAuthenticator
from tlvproxy.config.keys import KeyExpr
from tlvproxy.config.model import ApiKeyAuthSpec, ApiKeyEntry
from tlvproxy.errors import Unauthorized
from tlvproxy.server.view import RequestContext

KEYS = (
    ApiKeyEntry(consumer="acme", sha256=sha256_hex("acme-key"), claims={"uid": 42}),
    ApiKeyEntry(consumer="globex", sha256=sha256_hex("globex-key")),
)


HEADER = KeyExpr("header", "x-api-key")


def authenticator(source: KeyExpr = HEADER) -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(ApiKeyAuthSpec(name="partners", source=source, keys=KEYS))


def view(headers: dict[str, str] | None = None, query: str = "") -> RequestContext:
    pairs = [(k.lower(), v) for k, v in (headers or {}).items()]
    return RequestContext(remote_addr="10.0.0.1", headers=pairs, query_string=query)


def test_a_known_key_names_its_consumer_and_claims():
    identity = authenticator().authenticate(view({"X-Api-Key": "acme-key"}), "GET", "/", b"", 0)
    assert identity.consumer == "acme"
    assert identity.value("claim.uid") == "42"
    assert identity.log_fields() == {"auth": "partners", "consumer": "acme"}


def test_a_key_in_the_query():
    auth = authenticator(KeyExpr("query", "api_key"))
    assert auth.authenticate(view(query="api_key=globex-key"), "GET", "/", b"", 0).consumer == (
        "globex"
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"X-Api-Key": ""}, "missing"),
        ({"X-Api-Key": "acme-key "}, "bad_key"),
        ({"X-Api-Key": "ACME-KEY"}, "bad_key"),
        ({"X-Api-Key": sha256_hex("acme-key")}, "bad_key"),  # the digest is not the key
        ({"X-Api-Key": "caf\u00e9"}, "bad_key"),
    ],
)
def test_wrong_or_missing_keys_are_refused(headers, reason):
    with pytest.raises(Unauthorized) as caught:
        authenticator().authenticate(view(headers), "GET", "/", b"", 0)
    assert caught.value.reason == reason
    assert caught.value.challenge.startswith("ApiKey ")

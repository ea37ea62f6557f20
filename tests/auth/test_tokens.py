"""The jwt authenticator against real keys and tokens (docs/security.md "JWT")."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from tests.auth.keys import (
    EC_KEY,
    RSA_OTHER,
    ec_jwk,
    hs256_with,
    jwks,
    public_pem,
    rs256_with_header,
    rsa_jwk,
    token,
    unsigned,
)
from tlvproxy.auth.tokens import CACHE_SIZE, JwtAuthenticator, StaticKeys
from tlvproxy.config.jwks import KeySet, parse_key_set
from tlvproxy.config.keys import parse_key
from tlvproxy.config.model import JwtAuthSpec
from tlvproxy.errors import Unauthorized
from tlvproxy.server.view import RequestContext

ALGORITHMS = ("RS256", "ES256", "HS256")


def spec(**overrides: Any) -> JwtAuthSpec:
    values: dict[str, Any] = {
        "name": "users",
        "keys": "keys.json",
        "key_set": jwks(rsa_jwk(), ec_jwk()),
        "algorithms": ALGORITHMS,
        "issuer": None,
        "audience": (),
        "token_from": (
            parse_key("header.Authorization"),
            parse_key("cookie.token"),
            parse_key("query.access_token"),
        ),
    }
    values.update(overrides)
    return JwtAuthSpec(**values)


class Keys:
    """A key source whose set the test swaps, counting unknown-kid calls."""

    def __init__(self, key_set: KeySet | None) -> None:
        self.current = key_set
        self.unknown = 0

    def unknown_kid(self) -> None:
        self.unknown += 1


def authenticator(source: Any = None, **overrides: Any) -> JwtAuthenticator:
    made = spec(**overrides)
    assert made.key_set is not None
    keys = source or StaticKeys(parse_key_set(made.key_set, made.algorithms))
    return JwtAuthenticator(made, keys)


def view(
    *, headers: dict[str, str] | None = None, query: str = "", bearer: str | None = None
) -> RequestContext:
    pairs = [(k.lower(), v) for k, v in (headers or {}).items()]
    if bearer is not None:
        pairs.append(("authorization", f"Bearer {bearer}"))
    return RequestContext(remote_addr="10.0.0.1", headers=pairs, query_string=query)


def check(auth: JwtAuthenticator, request: RequestContext, now: float | None = None) -> Any:
    return auth.authenticate(request, "GET", "/x", b"", time.time() if now is None else now)


def refusal(auth: JwtAuthenticator, request: RequestContext) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        check(auth, request)
    return caught.value


def test_a_valid_token_gives_its_identity():
    identity = check(authenticator(), view(bearer=token(tenant="acme")))
    assert identity.authenticator == "users"
    assert identity.sub == "7"
    assert identity.value("sub") == "7"
    assert identity.value("claim.tenant") == "acme"
    assert identity.value("claim.nope") is None


def test_an_es256_token_verifies_with_the_ec_key():
    identity = check(authenticator(), view(bearer=token(key=EC_KEY, algorithm="ES256", kid="e1")))
    assert identity.sub == "7"


@pytest.mark.parametrize(
    ("place", "request_view"),
    [
        ("header", lambda t: view(bearer=t)),
        ("cookie", lambda t: view(headers={"Cookie": f"other=1; token={t}"})),
        ("query", lambda t: view(query=f"access_token={t}")),
    ],
)
def test_the_token_is_read_from_each_place(place, request_view):
    assert check(authenticator(), request_view(token())).sub == "7", place


def test_the_first_present_place_wins():
    # The header holds garbage: it is present, so it is the one checked.
    request = view(bearer="garbage", query=f"access_token={token()}")
    assert refusal(authenticator(), request).reason == "malformed"


def now_minus(seconds: int) -> int:
    return int(time.time()) - seconds


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: token({"sub": "7", "exp": now_minus(10)}), "expired"),
        (lambda: token(nbf=int(time.time()) + 600), "not_yet_valid"),
        (lambda: token(key=RSA_OTHER), "signature"),
        (lambda: token(kid="nobody"), "unknown_key"),
        (lambda: token(algorithm="PS256"), "algorithm"),
        (lambda: token(algorithm="RS512"), "algorithm"),
        (lambda: unsigned({"sub": "7"}, {"alg": "none", "kid": "r1"}), "algorithm"),
        (lambda: unsigned({"sub": "7"}, {"alg": "None", "kid": "r1"}), "algorithm"),
        # The HS/RS confusion: the RSA public key used as an HMAC secret.
        (lambda: hs256_with(public_pem(), {"sub": "7"}), "algorithm"),
        (lambda: "not.a.token", "malformed"),
        (lambda: "a" * 9000, "malformed"),
        (lambda: token(sub=7), "malformed"),
    ],
)
def test_bad_tokens_are_refused_with_their_reason(make, reason):
    found = refusal(authenticator(), view(bearer=make()))
    assert found.reason == reason
    assert found.http_status == 401
    assert found.challenge == 'Bearer realm="tlvproxy", error="invalid_token"'


@pytest.mark.parametrize(
    "header",
    [
        {"kid": 1},
        {"kid": "r1", "crit": ["exp"], "exp": 1},
        {"kid": "r1", "crit": []},
    ],
)
def test_a_header_pyjwt_refuses_is_malformed_not_a_crash(header):
    # Found by the end-to-end tests: PyJWT raised past the authenticator (500).
    made = rs256_with_header(header, {"sub": "7"})
    assert refusal(authenticator(), view(bearer=made)).reason == "malformed"


def test_a_tampered_payload_is_refused():
    head, _, signature = token().split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "2", "exp": 2**40}).encode())
    tampered = f"{head}.{forged.rstrip(b'=').decode()}.{signature}"
    assert refusal(authenticator(), view(bearer=tampered)).reason == "signature"


def test_a_missing_token_gets_a_challenge_without_an_error():
    found = refusal(authenticator(), view())
    assert found.reason == "missing"
    assert found.challenge == 'Bearer realm="tlvproxy"'


def test_a_non_bearer_authorization_is_malformed():
    request = view(headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert refusal(authenticator(), request).reason == "malformed"


def test_issuer_and_audience_are_checked():
    auth = authenticator(issuer="https://login.example", audience=("im", "web"))
    good = token(iss="https://login.example", aud="web")
    assert check(auth, view(bearer=good)).sub == "7"
    cases = {
        "issuer": token(iss="https://evil.example", aud="im"),
        "audience": token(iss="https://login.example", aud="other"),
        "missing_claim": token(aud="im"),
    }
    for reason, made in cases.items():
        assert refusal(auth, view(bearer=made)).reason == reason


def test_without_an_audience_setting_any_aud_is_accepted():
    assert check(authenticator(), view(bearer=token(aud="anything"))).sub == "7"


def test_leeway_accepts_a_token_just_expired_and_moves_the_expiry():
    made = token({"sub": "7", "exp": now_minus(5)})
    auth = authenticator(leeway=30.0)
    identity = check(auth, view(bearer=made))
    assert identity.expires_at == pytest.approx(now_minus(5) + 30, abs=2)


def test_a_key_with_alg_serves_that_algorithm_only():
    auth = authenticator(
        key_set=jwks(rsa_jwk(alg="RS256"), ec_jwk()), algorithms=("RS256", "PS256")
    )
    assert refusal(auth, view(bearer=token(algorithm="PS256"))).reason == "algorithm"


def test_a_token_without_kid_uses_the_only_key():
    auth = authenticator(key_set=jwks(rsa_jwk()))
    assert check(auth, view(bearer=token(kid=None))).sub == "7"
    two = authenticator()
    assert refusal(two, view(bearer=token(kid=None))).reason == "unknown_key"


def test_the_cache_serves_a_token_until_it_expires():
    auth = authenticator()
    made = token({"sub": "7", "exp": int(time.time()) + 60})
    first = check(auth, view(bearer=made))
    assert check(auth, view(bearer=made)) is first  # from the cache
    with pytest.raises(Unauthorized) as caught:
        check(auth, view(bearer=made), now=time.time() + 120)
    assert caught.value.reason == "expired"
    assert made not in auth._cache


def test_not_yet_valid_and_expired_follow_the_clock_given():
    auth = authenticator()
    made = token(nbf=int(time.time()) + 100)
    with pytest.raises(Unauthorized):
        check(auth, view(bearer=made))
    assert check(auth, view(bearer=made), now=time.time() + 101).sub == "7"


@pytest.mark.parametrize("value", ["soon", True, None])
def test_a_time_claim_that_is_not_a_number_is_malformed(value):
    made = (
        token({"sub": "7", "exp": value}) if value is not None else token({"sub": "7", "nbf": "x"})
    )
    assert refusal(authenticator(), view(bearer=made)).reason == "malformed"


def test_a_new_key_set_empties_the_cache():
    key_set = parse_key_set(jwks(rsa_jwk()), ALGORITHMS)
    keys = Keys(key_set)
    auth = authenticator(keys)
    made = token()
    assert check(auth, view(bearer=made)).sub == "7"
    keys.current = parse_key_set(jwks(rsa_jwk(RSA_OTHER, kid="r2")), ALGORITHMS)
    assert refusal(auth, view(bearer=made)).reason == "unknown_key"
    assert keys.unknown == 1


def test_no_key_set_yet_is_a_refusal_that_asks_for_a_fetch():
    keys = Keys(None)
    assert refusal(authenticator(keys), view(bearer=token())).reason == "keys_unavailable"
    assert keys.unknown == 1


def test_the_cache_is_bounded():
    auth = authenticator()
    tokens = [token(sub=str(n)) for n in range(CACHE_SIZE + 10)]
    for made in tokens:
        check(auth, view(bearer=made))
    assert len(auth._cache) == CACHE_SIZE
    assert tokens[0] not in auth._cache
    assert tokens[-1] in auth._cache

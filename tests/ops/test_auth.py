"""Authentication through a real `tlvproxy serve` process: `jwt` (a key file and a
key set URL), `api_key` and `hmac` authenticators on REST and on the WebSocket
handshake, `allowed_origins`, the session closed when its token expires, the
verified identity as the frame's uid, numbers read once, per-message checks on a
session, the auth failure metric and the access records.

Each table variant runs in one gateway shared by the module's tests; every test
uses its own users, request ids and metric deltas, so the order does not matter.
"""

from __future__ import annotations

import http.client
import itertools
import time
import uuid
from typing import TYPE_CHECKING, Any

import jwt
import pytest

from tests.auth.keys import sha256_hex
from tests.ops.auth_helpers import (
    AUDIENCE,
    ISSUER,
    KeyServer,
    Signer,
    access_record,
    bearer,
    claims_of,
    handshake,
    hmac_signed,
    jwks,
    rs256_signed,
    signature_headers,
    start_gateway,
    tampered,
    unsigned,
)
from tests.ops.procs import DEADLINE, Processes, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.ops.auth_helpers import Handshake
    from tests.ops.procs import Answer, Gateway

pytestmark = pytest.mark.slow

FAILURES = "tlvproxy_auth_failures_total"
CHALLENGE = 'Bearer realm="tlvproxy"'
INVALID = 'Bearer realm="tlvproxy", error="invalid_token"'

USERS_RSA = Signer("rsa1")
USERS_EC = Signer("ec1", "p256")
STRANGER = Signer("rsa-stranger")  # its kid is in no key set
P384 = Signer("ec384", "p384")  # ES384: not in the allow-list

API_KEY = "acme-key-0123456789"
SECRET_ENV = "TLVPROXY_TEST_PARTNER_SECRET"
SECRET = b"partner-secret-from-the-environment"
LITERAL_SECRET = "partner-secret-in-the-table"
ORIGIN = "https://web.example.com"

_users = itertools.count(50_001)


def fresh_uid() -> int:
    """A user id no other test (of this module) uses, for the shared mock upstream."""
    return next(_users)


def request_id() -> str:
    return f"auth-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- tables


def commands(
    *,
    send: dict[str, Any],
    echo: dict[str, Any],
    profile: dict[str, Any],
    listing: dict[str, Any],
) -> list[dict[str, Any]]:
    """The demo's four commands (the mock upstream knows no others, and a table
    gives each number one command), each with the `auth`, `claims` and `uid`
    given, and the push."""

    def command(name: str, number: int, method: str, path: str, **options: Any) -> dict[str, Any]:
        return {
            "name": name,
            "command": number,
            "upstream": "im",
            "http": {"method": method, "path": path},
            "idempotent": number != 0x1001,
            **options,
        }

    return [
        command(
            "send_message",
            0x1001,
            "POST",
            "/v1/messages",
            request="demo.im.SendMessageRequest",
            response="demo.im.SendMessageResponse",
            **send,
        ),
        command(
            "get_profile",
            0x1002,
            "GET",
            "/v1/users/{user_id}/profile",
            request="demo.im.GetProfileRequest",
            response="demo.im.Profile",
            **profile,
        ),
        command("echo", 0x1003, "POST", "/v1/echo", codec="json", **echo),
        command(
            "list_messages",
            0x1004,
            "GET",
            "/v1/users/{user_id}/messages",
            request="demo.im.ListMessagesRequest",
            response="demo.im.ListMessagesResponse",
            **listing,
        ),
        {"name": "new_message", "command": 0x2001, "push": "demo.im.MessagePush"},
    ]


PUBLIC = {"auth": "none"}

USERS = {
    "name": "users",
    "type": "jwt",
    "keys": "keys/jwks.json",  # relative to the table
    # HS256 is allowed too, so that an HS256 token signed with the RSA public key
    # (the HS/RS confusion) reaches the key lookup.
    "algorithms": ["RS256", "ES256", "HS256"],
    "issuer": ISSUER,
    "audience": AUDIENCE,
    "leeway": "0s",
    "token_from": ["header.Authorization", "cookie.token", "query.access_token"],
}
PARTNERS = {
    "name": "partners",
    "type": "api_key",
    "header": "X-Api-Key",
    "keys": {"acme": {"sha256": sha256_hex(API_KEY), "uid": 42, "tier": "gold"}},
}
PARTNERS_Q = {
    "name": "partners_q",
    "type": "api_key",
    "query": "api_key",
    "keys": {"acme": {"sha256": sha256_hex(API_KEY)}},
}
SIGNED = {
    "name": "signed",
    "type": "hmac",
    "secrets": {"k1": f"env.{SECRET_ENV}", "k2": LITERAL_SECRET},
    "clock_skew": "300s",
}


def websocket(**options: Any) -> dict[str, Any]:
    """The whole `websocket` section (None deletes a key of the base table's)."""
    section: dict[str, Any] = {
        "path": "/ws",
        "upstream": "im",
        "hash_on": "query.did",
        "uid": None,
        "auth": None,
        "allowed_origins": None,
        "mode": "json",
        "max_message": "64 KiB",
        "idle_timeout": "120s",
    }
    section.update(options)
    return section


PROFILE = "/v1/users/3/profile"
PER_SUB_BURST = 3  # main's send_message: 1/m per token sub, 1 + 3 at once
LENIENT = {**USERS, "name": "lenient", "leeway": "30s", "algorithms": ["RS256", "ES256"]}


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """The module's gateways, killed at its end."""
    started = Processes(tmp_path_factory.mktemp("auth"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def main(processes: Processes, upstream: str) -> Gateway:
    """`users` (jwt, a key file) for all but list_messages (`partners`, api_key);
    get_profile needs a role; the session's handshake is `users`', from
    https://web.example.com or no Origin, its uid the token's sub."""
    return start_gateway(
        processes,
        upstream,
        "main",
        files={"keys/jwks.json": jwks(USERS_RSA, USERS_EC)},
        auth=[USERS, PARTNERS],
        default_auth="users",
        commands=commands(
            send={"uid": "auth.sub", "fields": {"client_ip": "remote_addr"}},
            echo={},
            profile={"claims": {"role": ["admin", "ops"]}},
            listing={"auth": "partners"},
        ),
        websocket=websocket(auth="users", uid="auth.sub", allowed_origins=[ORIGIN]),
        rate_limits=[
            {
                "name": "per_sub",
                "commands": ["send_message"],
                "key": "auth.sub",
                "rate": "1/m",
                "burst": PER_SUB_BURST,
            }
        ],
    )


@pytest.fixture(scope="module")
def keyed(processes: Processes, upstream: str) -> Gateway:
    """`partners` (api_key) for send_message (uid: the key's `uid`), echo and the
    session's handshake, with `allowed_origins: []`; `partners_q` (the key in the
    query) for list_messages; get_profile is public, its uid a header, rate
    limited by it."""
    return start_gateway(
        processes,
        upstream,
        "keyed",
        auth=[PARTNERS, PARTNERS_Q],
        default_auth="none",
        commands=commands(
            send={"auth": "partners", "uid": "auth.claim.uid"},
            echo={"auth": "partners"},
            profile={"uid": "header.X-User-Id"},
            listing={"auth": "partners_q"},
        ),
        websocket=websocket(auth="partners", uid="auth.claim.uid", allowed_origins=[]),
        rate_limits=[
            {
                "name": "per_user",
                "commands": ["get_profile"],
                "key": "header.X-User-Id",
                "rate": "1/m",
                "burst": 0,
            }
        ],
    )


@pytest.fixture(scope="module")
def signed(processes: Processes, upstream: str) -> Gateway:
    """`signed` (hmac, a secret from the environment and one in the table) for
    echo and the session's handshake; `lenient` (jwt, leeway 30s, RS256 and ES256
    only) for send_message."""
    return start_gateway(
        processes,
        upstream,
        "signed",
        files={"keys/jwks.json": jwks(USERS_RSA, USERS_EC)},
        env={SECRET_ENV: SECRET.decode()},
        auth=[SIGNED, LENIENT],
        default_auth="none",
        commands=commands(
            send={"auth": "lenient", "uid": "auth.sub"},
            echo={"auth": "signed"},
            profile=PUBLIC,
            listing=PUBLIC,
        ),
        websocket=websocket(auth="signed"),
        rate_limits=[],
    )


class Remote:
    """A gateway whose key sets are fetched from URLs."""

    def __init__(self, gateway: Gateway, rotating: KeyServer, failing: KeyServer) -> None:
        self.gateway = gateway
        self.rotating = rotating  # refresh 10m: fetched again on an unknown kid
        self.failing = failing  # refresh 1s: a test stops it


ROTATED_OLD = Signer("old")
ROTATED_NEW = Signer("new")
FAILING_KEY = Signer("steady")
FAILING_NEXT = Signer("steady-next", "p256")


@pytest.fixture(scope="module")
def remote(processes: Processes, upstream: str) -> Iterator[Remote]:
    rotating, failing = KeyServer(), KeyServer()
    rotating.documents["/jwks.json"] = jwks(ROTATED_OLD)
    failing.documents["/keys"] = jwks(FAILING_KEY)
    nobody = KeyServer()
    nobody.stop()  # its port: nothing listens there
    base = {key: value for key, value in USERS.items() if key not in ("name", "keys")}
    try:
        gateway = start_gateway(
            processes,
            upstream,
            "remote",
            auth=[
                {**base, "name": "rotating", "keys": rotating.url(), "refresh": "10m"},
                {**base, "name": "failing", "keys": failing.url("/keys"), "refresh": "1s"},
                {**base, "name": "unreachable", "keys": nobody.url(), "refresh": "10m"},
            ],
            default_auth="none",
            commands=commands(
                send=PUBLIC,
                echo={"auth": "rotating"},
                profile={"auth": "failing"},
                listing={"auth": "unreachable"},
            ),
            websocket=websocket(),
            rate_limits=[],
        )
        yield Remote(gateway, rotating, failing)
    finally:
        rotating.stop()
        failing.stop()


# ---------------------------------------------------------------- checking


class Failures:
    """The auth failure counts of one authenticator, before something is done."""

    def __init__(self, gateway: Gateway, authenticator: str) -> None:
        self.gateway = gateway
        self.authenticator = authenticator
        self.before = gateway.metrics()

    def added(self) -> dict[str, float]:
        """{reason: how many more refusals} since this was made."""
        after = self.gateway.metrics()
        changed = {}
        for key, value in after.items():
            if key.startswith(FAILURES + "{") and f'authenticator="{self.authenticator}"' in key:
                reason = key.split('reason="', 1)[1].split('"', 1)[0]
                if value != self.before.get(key, 0.0):
                    changed[reason] = value - self.before.get(key, 0.0)
        return changed


def refused(answer: Answer | Handshake, status: int, challenge: str | None) -> None:
    """A JSON error answer (401 with `challenge` when given), never an upgrade."""
    assert answer.status == status, answer
    code = {400: "bad_request", 401: "unauthorized", 403: "forbidden"}[status]
    assert answer.json()["error"]["code"] == code, answer
    if challenge is not None:
        assert answer.headers["www-authenticate"] == challenge, answer.headers
    assert "upgrade" not in answer.headers


SURFACES = ("rest", "websocket")


def attempt(
    gateway: Gateway, surface: str, headers: dict[str, str], query: str = ""
) -> Answer | Handshake:
    """POST /v1/echo, or a handshake of /ws; an accepted session is closed."""
    if surface == "rest":
        return gateway.call("POST", f"/v1/echo{query}", {"hello": "auth"}, headers=headers)
    result = handshake(gateway.http_port, f"/ws{query}", headers)
    result.close()
    return result


def accepted(answer: Answer | Handshake, surface: str) -> None:
    if surface == "rest":
        assert answer.status == 200, answer
        assert answer.json() == {"hello": "auth"}
    else:
        assert answer.status == 101, answer


# ---------------------------------------------------------------- 1. the jwt matrix


def _confusion(kid: str | None) -> str:
    header = {"alg": "HS256", "typ": "JWT"} | ({} if kid is None else {"kid": kid})
    return hmac_signed(USERS_RSA.public_pem(), header, claims_of())


def _with_header(**header: Any) -> str:
    return rs256_signed(USERS_RSA, {"alg": "RS256", "typ": "JWT", **header}, claims_of())


# name -> (the Authorization header, or None for none; reason, or None: accepted)
JWT_CASES: dict[str, tuple[Callable[[], str | None], str | None]] = {
    "valid_rs256": (lambda: f"Bearer {USERS_RSA.token()}", None),
    "valid_es256": (lambda: f"Bearer {USERS_EC.token()}", None),
    "valid_lower_case_bearer": (lambda: f"bearer {USERS_RSA.token()}", None),
    "valid_list_audience": (lambda: f"Bearer {USERS_RSA.token(aud=['x', AUDIENCE])}", None),
    "expired": (lambda: f"Bearer {USERS_RSA.token(lifetime=-10)}", "expired"),
    "not_yet_valid": (
        lambda: f"Bearer {USERS_RSA.token(nbf=int(time.time()) + 60)}",
        "not_yet_valid",
    ),
    "wrong_issuer": (lambda: f"Bearer {USERS_RSA.token(iss='https://evil.example')}", "issuer"),
    "wrong_audience": (lambda: f"Bearer {USERS_RSA.token(aud='other-service')}", "audience"),
    "no_issuer": (lambda: f"Bearer {USERS_RSA.token(iss=None)}", "missing_claim"),
    "no_audience": (lambda: f"Bearer {USERS_RSA.token(aud=None)}", "missing_claim"),
    "ps256_not_allowed": (lambda: f"Bearer {USERS_RSA.token(algorithm='PS256')}", "algorithm"),
    "es384_not_allowed": (lambda: f"Bearer {P384.token()}", "algorithm"),
    "alg_none": (lambda: f"Bearer {unsigned()}", "algorithm"),
    "hs_rs_confusion": (lambda: f"Bearer {_confusion('rsa1')}", "algorithm"),
    # Without a kid no key is picked (the set has two): refused all the same.
    "hs_rs_confusion_no_kid": (lambda: f"Bearer {_confusion(None)}", "unknown_key"),
    "es256_with_an_rsa_kid": (lambda: f"Bearer {USERS_EC.token(kid='rsa1')}", "algorithm"),
    "unknown_kid": (lambda: f"Bearer {STRANGER.token()}", "unknown_key"),
    # Headers PyJWT's header parsing refuses (it raises InvalidTokenError, the
    # base class, not DecodeError): a refusal like any malformed token.
    "kid_not_a_string": (lambda: f"Bearer {_with_header(kid=1)}", "malformed"),
    "crit_not_understood": (
        lambda: f"Bearer {_with_header(kid='rsa1', crit=['exp'], exp=1)}",
        "malformed",
    ),
    "crit_empty": (lambda: f"Bearer {_with_header(kid='rsa1', crit=[])}", "malformed"),
    "signed_by_a_stranger_with_a_known_kid": (
        lambda: f"Bearer {STRANGER.token(kid='rsa1')}",
        "signature",
    ),
    "tampered_payload": (lambda: f"Bearer {tampered(USERS_RSA.token(), sub='2')}", "signature"),
    "missing": (lambda: None, "missing"),
    "not_bearer": (lambda: f"Basic {USERS_RSA.token()}", "malformed"),
    "empty_bearer": (lambda: "Bearer ", "malformed"),
    "not_a_jwt": (lambda: "Bearer not-a-token", "malformed"),
}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("case", list(JWT_CASES))
def test_jwt_from_a_key_file(main: Gateway, surface: str, case: str) -> None:
    make, reason = JWT_CASES[case]
    authorization = make()
    headers = {} if authorization is None else {"Authorization": authorization}
    failures = Failures(main, "users")

    answer = attempt(main, surface, headers)

    if reason is None:
        accepted(answer, surface)
        assert failures.added() == {}
        return
    refused(answer, 401, CHALLENGE if reason == "missing" else INVALID)
    assert failures.added() == {reason: 1}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("place", ["header", "cookie", "query"])
def test_the_token_is_read_from_each_place(main: Gateway, surface: str, place: str) -> None:
    token = USERS_RSA.token()
    headers, query = {}, ""
    if place == "header":
        headers = bearer(token)
    elif place == "cookie":
        headers = {"Cookie": f"theme=dark; token={token}; lang=en"}
    else:
        query = f"?did=d1&access_token={token}"
    accepted(attempt(main, surface, headers, query), surface)


@pytest.mark.parametrize("surface", SURFACES)
def test_the_first_place_present_wins(main: Gateway, surface: str) -> None:
    good = USERS_RSA.token()
    failures = Failures(main, "users")
    # A bad header is not passed over for a good cookie or query token.
    headers = {"Authorization": "Bearer not-a-token", "Cookie": f"token={good}"}
    refused(attempt(main, surface, headers, f"?access_token={good}"), 401, INVALID)
    # The cookie comes before the query.
    answer = attempt(main, surface, {"Cookie": "token=bad"}, f"?access_token={good}")
    refused(answer, 401, INVALID)
    assert failures.added() == {"malformed": 2}
    accepted(attempt(main, surface, {"Cookie": "other=1"}, f"?access_token={good}"), surface)


def test_claims_are_required_on_rest(main: Gateway) -> None:
    failures = Failures(main, "users")
    for role, status in (
        ("admin", 200),
        ("ops", 200),
        (["viewer", "ops"], 200),
        ("viewer", 403),
        (["viewer"], 403),
        (None, 403),
        ("Admin", 403),
    ):
        token = USERS_RSA.token(role=role)
        answer = main.call("GET", PROFILE, headers=bearer(token))
        assert answer.status == status, (role, answer)
        if status == 403:
            assert answer.json()["error"]["code"] == "forbidden"
    assert failures.added() == {"claims": 4}


# ---------------------------------------------------------------- 2. api keys


def test_api_keys_on_rest(main: Gateway) -> None:
    challenge = 'ApiKey realm="tlvproxy", header="x-api-key"'
    rid = request_id()
    listing = f"/v1/users/{fresh_uid()}/messages"
    answer = main.call("GET", listing, headers={"X-Api-Key": API_KEY, "X-Request-Id": rid})
    assert answer.status == 200, answer
    assert answer.json() == {"messages": []}
    record = access_record(main, rid)
    assert (record["auth"], record["consumer"], record["route"]) == (
        "partners",
        "acme",
        "list_messages",
    )
    assert "sub" not in record

    for headers, reason in (
        ({"X-Api-Key": API_KEY + "x"}, "bad_key"),
        ({"X-Api-Key": API_KEY.upper()}, "bad_key"),
        ({}, "missing"),
        ({"Authorization": f"Bearer {API_KEY}"}, "missing"),  # not where it is read
        # A token of `users` is no API key: credentials do not cross authenticators.
        (bearer(USERS_RSA.token()), "missing"),
    ):
        failures = Failures(main, "partners")
        answer = main.call("GET", listing, headers=headers)
        assert answer.status == 401, (headers, answer)
        assert answer.json()["error"]["code"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith('ApiKey realm="tlvproxy"')
        assert answer.headers["www-authenticate"] == challenge
        assert failures.added() == {reason: 1}, headers


def test_an_api_key_claim_is_the_uid(keyed: Gateway) -> None:
    to_uid = fresh_uid()
    answer = keyed.call(
        "POST",
        "/v1/messages",
        {"to_uid": to_uid, "text": "from a partner"},
        headers={"X-Api-Key": API_KEY, "X-User-Id": "3"},
    )
    assert answer.status == 200, answer
    listing = keyed.call("GET", f"/v1/users/{to_uid}/messages?api_key={API_KEY}")
    messages = listing.json()["messages"]
    assert [(m["from_uid"], m["text"]) for m in messages] == [(42, "from a partner")]


def test_an_api_key_in_the_query(keyed: Gateway) -> None:
    listing = f"/v1/users/{fresh_uid()}/messages"
    challenge = 'ApiKey realm="tlvproxy", query="api_key"'
    rid = request_id()
    query = f"?limit=5&api_key={API_KEY}"
    answer = keyed.call("GET", listing + query, headers={"X-Request-Id": rid})
    assert answer.status == 200, answer
    record = access_record(keyed, rid)
    assert (record["auth"], record["consumer"]) == ("partners_q", "acme")
    for query, headers, reason in (
        (f"?api_key={API_KEY}x", {}, "bad_key"),
        ("?api_key=", {}, "missing"),
        ("", {"X-Api-Key": API_KEY}, "missing"),  # not where it is read
    ):
        failures = Failures(keyed, "partners_q")
        answer = keyed.call("GET", listing + query, headers=headers)
        assert answer.status == 401, (query, answer)
        assert answer.headers["www-authenticate"] == challenge
        assert failures.added() == {reason: 1}, query
    assert API_KEY not in keyed.process.text()


def test_api_keys_on_the_websocket_handshake(keyed: Gateway) -> None:
    failures = Failures(keyed, "partners")
    rid = request_id()
    opened = handshake(
        keyed.http_port, "/ws?uid=7&did=k", {"X-Api-Key": API_KEY, "X-Request-Id": rid}
    )
    assert opened.status == 101, opened
    assert opened.session is not None
    answer = opened.session.call({"cmd": "echo", "seq": 1, "body": {"via": "ws"}})
    assert (answer["seq"], answer["status"], answer["body"]) == (1, 0, {"via": "ws"})
    opened.close()
    record = access_record(keyed, rid)
    assert (record["status"], record["auth"], record["consumer"]) == (101, "partners", "acme")
    assert record["uid"] == 42  # auth.claim.uid, not ?uid=7

    challenge = 'ApiKey realm="tlvproxy", header="x-api-key"'
    refused(handshake(keyed.http_port, "/ws", {"X-Api-Key": "wrong"}), 401, challenge)
    refused(handshake(keyed.http_port, "/ws", {}), 401, challenge)
    assert failures.added() == {"bad_key": 1, "missing": 1}


def test_an_empty_origin_list_admits_only_clients_without_an_origin(keyed: Gateway) -> None:
    key = {"X-Api-Key": API_KEY}
    refused(handshake(keyed.http_port, "/ws", {**key, "Origin": ORIGIN}), 403, None)
    refused(handshake(keyed.http_port, "/ws", {**key, "Origin": "null"}), 403, None)
    opened = handshake(keyed.http_port, "/ws", key)
    assert opened.status == 101, opened
    opened.close()


# ---------------------------------------------------------------- 3. signed requests

SIGNED_PATH = "/v1/echo"
SIGNATURE = 'Signature realm="tlvproxy"'


def signed_call(gateway: Gateway, target: str, body: bytes, headers: dict[str, str]) -> Answer:
    return gateway.call("POST", target, body, headers=headers)


def test_a_signed_request_is_accepted(signed: Gateway) -> None:
    failures = Failures(signed, "signed")
    for key_id, secret in (("k1", SECRET), ("k2", LITERAL_SECRET.encode())):
        body = f'{{"signed": "{key_id}", "n": "{uuid.uuid4().hex}"}}'.encode()
        target = f"{SIGNED_PATH}?x=1&key={key_id}"
        rid = request_id()
        headers = signature_headers(secret, "POST", target, body, key_id=key_id)
        answer = signed_call(signed, target, body, {**headers, "X-Request-Id": rid})
        assert answer.status == 200, (key_id, answer)
        assert answer.body == body
        record = access_record(signed, rid)
        assert (record["auth"], record["consumer"]) == ("signed", key_id)
    assert failures.added() == {}


Sent = tuple[bytes, dict[str, str]]  # the body sent and the headers


def _signed_refusals() -> dict[str, tuple[Callable[[str, bytes], Sent], str]]:
    """name -> (make(target, body) -> (body sent, headers), reason)."""

    def right(target: str, body: bytes, **options: Any) -> dict[str, str]:
        return signature_headers(SECRET, "POST", target, body, **options)

    return {
        "wrong_secret": (
            lambda t, b: (b, signature_headers(b"not-the-secret", "POST", t, b)),
            "signature",
        ),
        "unknown_key_id": (lambda t, b: (b, right(t, b, key_id="k9")), "unknown_key"),
        "date_ten_minutes_ago": (
            lambda t, b: (b, right(t, b, date=time.time() - 600)),
            "skewed",
        ),
        "date_ten_minutes_ahead": (
            lambda t, b: (b, right(t, b, date=time.time() + 600)),
            "skewed",
        ),
        "body_changed_after_signing": (
            lambda t, b: (b.replace(b"1", b"2"), right(t, b)),
            "digest",
        ),
        "body_without_a_signed_digest": (
            lambda t, b: (b, right(t, b, sign_digest=False)),
            "malformed",
        ),
        "other_target": (
            lambda t, b: (b, right(t.replace("x=1", "x=2"), b)),
            "signature",
        ),
        "other_method": (
            lambda t, b: (b, signature_headers(SECRET, "PUT", t, b)),
            "signature",
        ),
        "other_algorithm": (
            lambda t, b: (
                b,
                _headers_with(right(t, b), 'algorithm="hmac-sha256"', 'algorithm="rsa-sha256"'),
            ),
            "algorithm",
        ),
        "headers_without_the_target": (
            lambda t, b: (b, _headers_with(right(t, b), 'headers="@request-target ', 'headers="')),
            "malformed",
        ),
        "not_a_signature": (lambda t, b: (b, {"Authorization": "Bearer abc"}), "malformed"),
        "missing": (lambda t, b: (b, {}), "missing"),
    }


def _headers_with(headers: dict[str, str], old: str, new: str) -> dict[str, str]:
    assert old in headers["Authorization"]
    return {**headers, "Authorization": headers["Authorization"].replace(old, new)}


SIGNED_REFUSALS = _signed_refusals()


@pytest.mark.parametrize("case", list(SIGNED_REFUSALS))
def test_a_bad_signed_request_is_refused(signed: Gateway, case: str) -> None:
    make, reason = SIGNED_REFUSALS[case]
    body = f'{{"n": 1, "case": "{case}", "id": "{uuid.uuid4().hex}"}}'.encode()
    target = f"{SIGNED_PATH}?x=1"
    failures = Failures(signed, "signed")
    sent, headers = make(target, body)
    answer = signed_call(signed, target, sent, headers)
    assert answer.status == 401, answer
    assert answer.json()["error"]["code"] == "unauthorized"
    assert answer.headers["www-authenticate"].startswith(SIGNATURE), answer.headers
    assert failures.added() == {reason: 1}


def test_a_replayed_signed_request_is_refused(signed: Gateway) -> None:
    body = f'{{"once": "{uuid.uuid4().hex}"}}'.encode()
    target = f"{SIGNED_PATH}?x=1"
    headers = signature_headers(SECRET, "POST", target, body)
    failures = Failures(signed, "signed")
    assert signed_call(signed, target, body, headers).status == 200
    again = signed_call(signed, target, body, headers)
    assert again.status == 401, again
    assert again.headers["www-authenticate"].startswith(SIGNATURE)
    assert failures.added() == {"replayed": 1}


def test_a_replay_is_refused_after_a_reload(signed: Gateway) -> None:
    """The replay cache outlives a reload of the same table: a reload is no
    window for replaying the signed requests of the last `clock_skew`."""
    body = f'{{"once": "{uuid.uuid4().hex}"}}'.encode()
    target = f"{SIGNED_PATH}?x=1"
    headers = signature_headers(SECRET, "POST", target, body)
    assert signed_call(signed, target, body, headers).status == 200
    reloaded = signed.admin("POST", "/admin/reload")
    assert reloaded.status == 200, reloaded
    again = signed_call(signed, target, body, headers)
    assert again.status == 401, again


def test_signed_websocket_handshakes(signed: Gateway) -> None:
    failures = Failures(signed, "signed")
    target = f"/ws?did=s&n={uuid.uuid4().hex}"
    headers = signature_headers(SECRET, "GET", target)
    rid = request_id()
    opened = handshake(signed.http_port, target, {**headers, "X-Request-Id": rid})
    assert opened.status == 101, opened
    assert opened.session is not None
    answer = opened.session.call({"cmd": "echo", "seq": 1, "body": [1]})
    assert (answer["status"], answer["body"]) == (0, [1])
    opened.close()
    record = access_record(signed, rid)
    assert (record["auth"], record["consumer"]) == ("signed", "k1")

    # The same handshake again: a replay.
    replay = handshake(signed.http_port, target, headers)
    assert replay.status == 401, replay
    assert replay.headers["www-authenticate"].startswith(SIGNATURE)
    # Signed with another secret, or for another target.
    other = f"/ws?did=s&n={uuid.uuid4().hex}"
    wrong = signature_headers(b"not-the-secret", "GET", other)
    refused(handshake(signed.http_port, other, wrong), 401, None)
    elsewhere = signature_headers(SECRET, "GET", other + "x")
    refused(handshake(signed.http_port, other, elsewhere), 401, None)
    refused(handshake(signed.http_port, other, {}), 401, None)
    assert failures.added() == {"replayed": 1, "signature": 2, "missing": 1}


# ---------------------------------------------------------------- 4. key set URLs


def test_a_key_set_url_is_fetched_again_for_an_unknown_kid(remote: Remote) -> None:
    gateway = remote.gateway
    old_token = ROTATED_OLD.token()
    assert gateway.call("POST", "/v1/echo", {"n": 1}, headers=bearer(old_token)).status == 200

    # Rotation: the new key replaces the old one at the URL.
    remote.rotating.documents["/jwks.json"] = jwks(ROTATED_NEW)
    failures = Failures(gateway, "rotating")
    new_token = ROTATED_NEW.token()
    first = gateway.call("POST", "/v1/echo", {"n": 2}, headers=bearer(new_token))
    assert first.status == 401, first  # and the gateway fetches the set again
    assert failures.added() == {"unknown_key": 1}

    def new_key_works() -> bool:
        answer = gateway.call("POST", "/v1/echo", {"n": 3}, headers=bearer(new_token))
        assert answer.status in (200, 401), answer
        return answer.status == 200

    wait_for(new_key_works, "the new key", deadline=5.0)
    # The old key is gone: its tokens, even one accepted before, are refused.
    for token in (old_token, ROTATED_OLD.token()):
        answer = gateway.call("POST", "/v1/echo", {"n": 4}, headers=bearer(token))
        assert answer.status == 401, answer
        assert answer.headers["www-authenticate"] == INVALID

    # Unknown kids fetch the set again at most once per 30 s: a flood of them
    # (forged, or a key published too late) costs the key server nothing.
    fetches = remote.rotating.fetches
    for _ in range(10):
        stranger = gateway.call("POST", "/v1/echo", {"n": 5}, headers=bearer(STRANGER.token()))
        assert stranger.status == 401, stranger
    time.sleep(0.5)
    assert remote.rotating.fetches == fetches


def test_a_failing_key_set_url_keeps_the_last_good_set(remote: Remote) -> None:
    """`failing` is fetched every second: a set that does not parse, a new set,
    then no server at all."""
    gateway = remote.gateway
    server = remote.failing

    def works(signer: Signer) -> bool:
        # A fresh token each time: none is in the gateway's cache of verified ones.
        answer = gateway.call("GET", PROFILE, headers=bearer(signer.token()))
        assert answer.status in (200, 401), answer
        return answer.status == 200

    def failed_fetches() -> int:
        return sum(
            record.get("message", "").startswith("fetching a JWT key set failed")
            and record.get("url") == server.url("/keys")
            for record in gateway.process.records()
        )

    assert works(FAILING_KEY)
    server.documents["/keys"] = '{"keys": [{"kty": "RSA"'
    wait_for(lambda: failed_fetches() >= 1, "a fetch of a broken set", deadline=10.0)
    assert works(FAILING_KEY)

    # The next refresh drops the old key, though no token named an unknown kid.
    server.documents["/keys"] = jwks(FAILING_NEXT)
    wait_for(lambda: not works(FAILING_KEY), "the refresh", deadline=10.0)
    assert works(FAILING_NEXT)

    server.stop()
    failed = failed_fetches()
    wait_for(lambda: failed_fetches() > failed, "a fetch from no server", deadline=10.0)
    assert works(FAILING_NEXT)
    assert not works(FAILING_KEY)
    assert not works(STRANGER)


def test_no_key_set_fetched_yet_refuses_tokens(remote: Remote) -> None:
    gateway = remote.gateway
    failures = Failures(gateway, "unreachable")
    answer = gateway.call("GET", "/v1/users/3/messages", headers=bearer(USERS_RSA.token()))
    assert answer.status == 401, answer
    assert failures.added() == {"keys_unavailable": 1}


# ---------------------------------------------------------------- 5. session expiry


def test_the_session_closes_when_its_token_expires(main: Gateway) -> None:
    token = USERS_RSA.token(lifetime=2, sub="11")
    rid = request_id()
    opened = handshake(main.http_port, "/ws?did=exp", {**bearer(token), "X-Request-Id": rid})
    assert opened.status == 101, opened
    session = opened.session
    assert session is not None
    started = time.monotonic()
    answer = session.call({"cmd": "echo", "seq": 1, "body": "still valid"})
    assert answer["body"] == "still valid"

    closed = session.receive()
    waited = time.monotonic() - started
    assert not isinstance(closed, dict), closed
    assert closed.code == 1008, closed
    assert waited < 5.0
    session.close()
    record = access_record(main, rid)
    assert (record["close_code"], record["auth"], record["sub"]) == (1008, "users", "11")
    # A new session with the expired token is refused at the handshake.
    refused(handshake(main.http_port, "/ws", bearer(token)), 401, INVALID)


# ---------------------------------------------------------------- 6. origins


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (ORIGIN, 101),
        (None, 101),
        ("https://evil.example.com", 403),
        ("https://web.example.com:8443", 403),
        ("http://web.example.com", 403),
        ("null", 403),
    ],
)
def test_allowed_origins(main: Gateway, origin: str | None, status: int) -> None:
    headers = bearer(USERS_RSA.token())
    if origin is not None:
        headers["Origin"] = origin
    result = handshake(main.http_port, "/ws", headers)
    if status == 101:
        assert result.status == 101, result
        result.close()
    else:
        refused(result, 403, None)


def test_a_refused_origin_needs_no_credentials_to_be_refused(main: Gateway) -> None:
    failures = Failures(main, "users")
    refused(handshake(main.http_port, "/ws", {"Origin": "https://evil.example.com"}), 403, None)
    assert failures.added() == {}


# ---------------------------------------------------------------- 7. identity into the frame


def test_the_rest_uid_is_the_tokens_sub_not_a_header(main: Gateway) -> None:
    to_uid = fresh_uid()
    token = USERS_RSA.token(sub="7")
    answer = main.call(
        "POST",
        "/v1/messages",
        {"to_uid": to_uid, "text": "from seven"},
        headers={**bearer(token), "X-User-Id": "2"},
    )
    assert answer.status == 200, answer
    listing = main.call("GET", f"/v1/users/{to_uid}/messages", headers={"X-Api-Key": API_KEY})
    messages = listing.json()["messages"]
    assert [(m["from_uid"], m["text"]) for m in messages] == [(7, "from seven")]


def test_a_sub_that_is_no_user_id_is_refused(main: Gateway) -> None:
    token = USERS_RSA.token(sub="alice")
    answer = main.call("POST", "/v1/messages", {"to_uid": 5, "text": "x"}, headers=bearer(token))
    assert answer.status == 400, answer
    refused(handshake(main.http_port, "/ws", bearer(token)), 400, None)


def test_a_token_without_a_sub_gets_no_uid(main: Gateway) -> None:
    """`uid: auth.sub` with no sub: 403, not the uid 0 of nobody."""
    token = USERS_RSA.token(sub=None)
    answer = main.call("POST", "/v1/messages", {"to_uid": 5, "text": "x"}, headers=bearer(token))
    refused(answer, 403, None)
    refused(handshake(main.http_port, "/ws", bearer(token)), 403, None)
    # A command that takes no uid from it is fine.
    accepted(attempt(main, "rest", bearer(token)), "rest")


def test_the_session_uid_is_the_tokens_sub_not_the_query(main: Gateway) -> None:
    me, other, sender = fresh_uid(), fresh_uid(), fresh_uid()
    rid = request_id()
    opened = handshake(
        main.http_port,
        f"/ws?uid={other}&did=me",
        {**bearer(USERS_RSA.token(sub=str(me))), "X-Request-Id": rid},
    )
    assert opened.status == 101, opened
    session = opened.session
    assert session is not None
    # The session's first request tells the upstream whose connection it is.
    assert session.call({"cmd": "echo", "seq": 1, "body": {}})["status"] == 0

    token = bearer(USERS_RSA.token(sub=str(sender)))
    for to_uid, text in ((other, "for the query's user"), (me, "for the token's user")):
        answer = main.call("POST", "/v1/messages", {"to_uid": to_uid, "text": text}, headers=token)
        assert answer.status == 200, answer
    push = session.receive()
    assert isinstance(push, dict), push
    assert push["cmd"] == "new_message"
    body = push["body"]
    assert (body["to_uid"], body["from_uid"], body["text"]) == (me, sender, "for the token's user")
    opened.close()
    record = access_record(main, rid)
    assert (record["auth"], record["sub"], record["uid"]) == ("users", str(me), me)


# ---------------------------------------------------------------- 8. numbers read once


def test_a_header_uid_is_one_number_however_it_is_spelled(keyed: Gateway) -> None:
    """get_profile's uid and its rate limit's key are header.X-User-Id: 1/m, burst 0."""

    def echo(user: str) -> Answer:
        return keyed.call("GET", PROFILE, headers={"X-User-Id": user})

    base = fresh_uid()
    first = echo(f"0{base}")
    assert first.status == 200, first
    for spelling in (f"+{base}", f"{base}", f"00{base}"):
        answer = echo(spelling)
        assert answer.status == 429, (spelling, answer)
    assert echo(f"{base + 1}").status == 200  # another user: another bucket
    for spelling in (f"{base // 10}_{base % 10}", "1_0", "1e3", "0x10", "12a", "-5"):
        answer = echo(spelling)
        assert answer.status == 400, (spelling, answer)


# ---------------------------------------------------------------- 9. per-message checks


def test_per_message_authenticator_and_claims_on_a_session(main: Gateway) -> None:
    failures = Failures(main, "users")
    opened = handshake(main.http_port, "/ws?did=pm", bearer(USERS_RSA.token(sub="21")))
    assert opened.status == 101, opened
    session = opened.session
    assert session is not None

    # A command of another authenticator (list_messages: partners): this
    # message only is refused.
    answer = session.call({"cmd": "list_messages", "seq": 1, "body": {"user_id": 21}})
    assert (answer["seq"], answer["error"]["code"]) == (1, "forbidden"), answer
    # A command whose claims the token lacks (get_profile: a role).
    answer = session.call({"cmd": "get_profile", "seq": 2, "body": {"user_id": 5}})
    assert (answer["seq"], answer["error"]["code"]) == (2, "forbidden"), answer
    # The session goes on: its authenticator's commands work.
    answer = session.call({"cmd": "echo", "seq": 3, "body": {"a": 3}})
    assert (answer["seq"], answer["status"], answer["body"]) == (3, 0, {"a": 3})
    answer = session.call({"cmd": "send_message", "seq": 4, "body": {"to_uid": 9, "text": "x"}})
    assert (answer["seq"], answer["status"]) == (4, 0), answer
    opened.close()
    assert failures.added() == {"claims": 1}

    opened = handshake(
        main.http_port, "/ws?did=pm2", bearer(USERS_RSA.token(sub="22", role=["ops"]))
    )
    assert opened.status == 101, opened
    assert opened.session is not None
    answer = opened.session.call({"cmd": "get_profile", "seq": 1, "body": {"user_id": 5}})
    assert (answer["status"], answer["body"]["user_id"]) == (0, 5), answer
    opened.close()


# ---------------------------------------------------------------- 10. access records


def test_access_records_name_the_authenticator_and_the_subject(
    main: Gateway, signed: Gateway
) -> None:
    rid = request_id()
    token = USERS_RSA.token(sub="31")
    answer = main.call("POST", "/v1/echo", {"n": 1}, headers={**bearer(token), "X-Request-Id": rid})
    assert answer.status == 200, answer
    record = access_record(main, rid)
    assert (record["route"], record["status"], record["auth"], record["sub"]) == (
        "echo",
        200,
        "users",
        "31",
    )
    assert "consumer" not in record

    # A public route's record names no identity; neither does a refused request's.
    rid = request_id()
    assert signed.call("GET", PROFILE, headers={"X-Request-Id": rid}).status == 200
    record = access_record(signed, rid)
    assert record["route"] == "get_profile"
    assert "auth" not in record
    assert "sub" not in record
    rid = request_id()
    answer = main.call("POST", "/v1/echo", {"n": 1}, headers={"X-Request-Id": rid})
    assert answer.status == 401
    record = access_record(main, rid)
    assert (record["route"], record["status"]) == ("echo", 401)
    assert "auth" not in record
    assert "sub" not in record
    # No token is ever logged, not even one sent in the query string.
    assert token not in main.process.text()
    assert ".eyJ" not in main.process.text()


# ---------------------------------------------------------------- reloads


def test_a_key_file_is_read_again_on_reload(procs: Processes, upstream: str) -> None:
    before, after = Signer("before"), Signer("after")
    gateway = start_gateway(
        procs,
        upstream,
        "reloading",
        files={"keys/jwks.json": jwks(before)},
        auth=[USERS],
        default_auth="users",
        commands=commands(send=PUBLIC, echo={}, profile=PUBLIC, listing=PUBLIC),
        websocket=websocket(auth="users"),
        rate_limits=[],
    )
    old_token = before.token()
    assert attempt(gateway, "rest", bearer(old_token)).status == 200

    (gateway.table.parent / "keys" / "jwks.json").write_text(jwks(after))
    reloaded = gateway.admin("POST", "/admin/reload")
    assert reloaded.status == 200, reloaded

    for surface in SURFACES:
        accepted(attempt(gateway, surface, bearer(after.token())), surface)
        for token in (old_token, before.token()):
            refused(attempt(gateway, surface, bearer(token)), 401, INVALID)


# ---------------------------------------------------------------- more


def test_a_rate_limit_keyed_by_the_tokens_sub(main: Gateway) -> None:
    """main's `per_sub` rule: send_message at 1/m per `auth.sub`, burst 3."""
    me, to_uid = fresh_uid(), fresh_uid()

    def send(sub: int, user_header: str) -> Answer:
        headers = {**bearer(USERS_RSA.token(sub=str(sub))), "X-User-Id": user_header}
        return main.call("POST", "/v1/messages", {"to_uid": to_uid, "text": "x"}, headers=headers)

    # The X-User-Id header changes nothing: the bucket is the token's.
    for n in range(PER_SUB_BURST + 1):
        assert send(me, str(n)).status == 200
    limited = send(me, "99")
    assert limited.status == 429, limited
    assert int(limited.headers["retry-after"]) >= 1
    assert send(fresh_uid(), "99").status == 200  # another sub

    # On a session, the same rule refuses the message, not the session.
    other = fresh_uid()
    opened = handshake(main.http_port, "/ws?did=rl", bearer(USERS_RSA.token(sub=str(other))))
    assert opened.status == 101, opened
    session = opened.session
    assert session is not None
    for seq in range(PER_SUB_BURST + 1):
        answer = session.call({"cmd": "send_message", "seq": seq, "body": {"to_uid": to_uid}})
        assert (answer["seq"], answer["status"]) == (seq, 0), answer
    answer = session.call({"cmd": "send_message", "seq": 9, "body": {"to_uid": to_uid}})
    assert (answer["seq"], answer["error"]["code"]) == (9, "rate_limited"), answer
    answer = session.call({"cmd": "echo", "seq": 10, "body": 1})
    assert (answer["seq"], answer["status"]) == (10, 0), answer
    opened.close()


def test_each_request_of_a_keep_alive_connection_is_authenticated(main: Gateway) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", main.http_port, timeout=DEADLINE)
    try:
        sent = []
        for headers in (
            bearer(USERS_RSA.token(sub="41")),
            {},
            bearer(USERS_RSA.token(sub="42")),
            {"Authorization": "Bearer nope"},
            bearer(USERS_RSA.token(sub="41")),
        ):
            rid = request_id()
            connection.request("POST", "/v1/echo", b"{}", {**headers, "X-Request-Id": rid})
            response = connection.getresponse()
            response.read()
            sent.append((rid, response.status))
    finally:
        connection.close()
    assert [status for _, status in sent] == [200, 401, 200, 401, 200]
    subs = [access_record(main, rid).get("sub") for rid, _ in sent]
    assert subs == ["41", None, "42", None, "41"]


@pytest.mark.parametrize(
    ("claims", "status", "reason"),
    [
        ({"lifetime": -10}, 200, None),  # expired 10 s ago: within the leeway
        ({"lifetime": -60}, 401, "expired"),
        ({"nbf": "+10"}, 200, None),
        ({"nbf": "+60"}, 401, "not_yet_valid"),
    ],
)
def test_the_leeway(signed: Gateway, claims: dict[str, Any], status: int, reason: str) -> None:
    """`lenient`: leeway 30s."""
    options = dict(claims)
    if "nbf" in options:
        options["nbf"] = int(time.time()) + int(options["nbf"])
    token = USERS_RSA.token(sub="5", **options)
    failures = Failures(signed, "lenient")
    answer = signed.call(
        "POST", "/v1/messages", {"to_uid": fresh_uid(), "text": "x"}, headers=bearer(token)
    )
    assert answer.status == status, answer
    assert failures.added() == ({} if reason is None else {reason: 1})


def test_hs256_outside_the_allow_list(signed: Gateway) -> None:
    """`lenient` takes RS256 and ES256 only."""
    failures = Failures(signed, "lenient")
    for token in (
        jwt.encode(claims_of(sub="5"), "a-shared-secret-of-32-bytes-or-more", algorithm="HS256"),
        hmac_signed(USERS_RSA.public_pem(), {"alg": "HS256", "kid": "rsa1"}, claims_of(sub="5")),
    ):
        answer = signed.call(
            "POST", "/v1/messages", {"to_uid": 5, "text": "x"}, headers=bearer(token)
        )
        refused(answer, 401, INVALID)
    assert (
        signed.call(
            "POST",
            "/v1/messages",
            {"to_uid": 5, "text": "x"},
            headers=bearer(USERS_EC.token(sub="5")),
        ).status
        == 200
    )
    assert failures.added() == {"algorithm": 2}


def test_admin_config_names_authenticators_but_shows_no_secret(signed: Gateway) -> None:
    answer = signed.admin("GET", "/admin/config")
    assert answer.status == 200
    config = answer.json()
    assert {"name": "signed", "type": "hmac"} in config["auth"]
    assert LITERAL_SECRET not in answer.body.decode()
    assert SECRET.decode() not in answer.body.decode()

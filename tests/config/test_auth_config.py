"""Loading `auth`, `default_auth` and the commands' `auth`, `claims` and
`allowed_origins` (docs/configuration.md "auth"): every mistake located."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.auth.keys import RSA_KEY, ec_jwk, jwks, rsa_jwk, sha256_hex
from tlvproxy.config.keys import KeyExpr
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import ApiKeyAuthSpec, HmacAuthSpec, JwtAuthSpec

REPO = Path(__file__).resolve().parents[2]
DEMO_PROTO = REPO / "proto" / "demo" / "im.proto"

HEAD = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {nodes: [127.0.0.1:7001]}
"""
USERS = """\
auth:
  - name: users
    type: jwt
    keys: keys.json
    algorithms: [RS256, ES256]
    issuer: https://login.example
    audience: [im, web]
    leeway: 30s
    token_from: [header.Authorization, query.access_token]
"""
KEYS_ONLY = """\
auth:
  - name: users
    type: jwt
    keys: keys.json
"""
SEND = """\
commands:
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.SendMessageRequest
    response: demo.im.SendMessageResponse
    http: {method: POST, path: /v1/messages}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "proto" / "demo").mkdir(parents=True)
    shutil.copy(DEMO_PROTO, tmp_path / "proto" / "demo" / "im.proto")
    (tmp_path / "keys.json").write_text(jwks(rsa_jwk(), ec_jwk()))
    return tmp_path


def load(workdir: Path, *parts: str):
    path = workdir / "commands.yaml"
    path.write_text("".join(parts))
    return load_table(path)


def problems(workdir: Path, *parts: str) -> list[str]:
    with pytest.raises(TableError) as caught:
        load(workdir, *parts)
    return caught.value.problems


def test_every_authenticator_type_loads(workdir, monkeypatch):
    monkeypatch.setenv("PARTNER_SECRET", "s3cret")
    table = load(
        workdir,
        HEAD,
        USERS,
        "  - name: partners\n"
        "    type: api_key\n"
        "    header: X-Api-Key\n"
        "    keys:\n"
        f"      acme: {{sha256: {sha256_hex('k').upper()}, uid: 42, tier: gold}}\n"
        "  - name: signed\n"
        "    type: hmac\n"
        "    secrets: {k1: env.PARTNER_SECRET, k2: literal}\n"
        "    clock_skew: 2m\n"
        "default_auth: users\n",
        SEND,
        "    uid: auth.sub\n"
        "    claims: {tier: [gold, silver], admin: true}\n"
        "  - name: get_profile\n"
        "    command: 0x1002\n"
        "    upstream: im\n"
        "    request: demo.im.GetProfileRequest\n"
        "    response: demo.im.Profile\n"
        '    http: {method: GET, path: "/v1/users/{user_id}/profile"}\n'
        "    auth: none\n"
        "websocket:\n"
        "  upstream: im\n"
        "  auth: partners\n"
        "  uid: auth.claim.uid\n"
        '  allowed_origins: [https://web.example.com, "http://localhost:8080"]\n',
    )
    users = table.auth["users"]
    assert isinstance(users, JwtAuthSpec)
    assert users.keys == str(workdir / "keys.json")
    assert users.key_set is not None
    assert not users.remote
    assert users.algorithms == ("RS256", "ES256")
    assert users.audience == ("im", "web")
    assert users.leeway == 30
    assert users.token_from == (
        KeyExpr("header", "authorization"),
        KeyExpr("query", "access_token"),
    )
    partners = table.auth["partners"]
    assert isinstance(partners, ApiKeyAuthSpec)
    assert partners.keys[0].sha256 == sha256_hex("k")
    assert partners.keys[0].claims == {"uid": 42, "tier": "gold"}
    signed = table.auth["signed"]
    assert isinstance(signed, HmacAuthSpec)
    assert signed.secrets == {"k1": b"s3cret", "k2": b"literal"}
    assert "s3cret" not in repr(signed)
    assert signed.clock_skew == 120
    send = table.commands_by_name["send_message"]
    assert send.auth == "users"  # from default_auth
    assert send.claims == {"tier": ("gold", "silver"), "admin": (True,)}
    assert send.numeric_keys == (KeyExpr("auth", "sub"),)
    assert table.commands_by_name["get_profile"].auth is None
    assert table.websocket is not None
    assert table.websocket.auth == "partners"
    assert table.websocket.allowed_origins == ("https://web.example.com", "http://localhost:8080")
    assert table.warnings == ()


def test_a_url_key_set_is_not_read_at_load(workdir):
    table = load(workdir, HEAD, USERS.replace("keys.json", "https://login.example/jwks"), SEND)
    users = table.auth["users"]
    assert isinstance(users, JwtAuthSpec)
    assert users.remote
    assert users.keys == "https://login.example/jwks"


def test_numeric_fields_are_read_as_numbers(workdir):
    table = load(
        workdir,
        HEAD,
        SEND,
        "    uid: header.X-User-Id\n    fields: {to_uid: query.to, text: query.text}\n",
    )
    keys = table.commands_by_name["send_message"].numeric_keys
    assert keys == (KeyExpr("header", "x-user-id"), KeyExpr("query", "to"))


@pytest.mark.parametrize(
    ("auth_text", "where", "message"),
    [
        ("algorithms: [none]", "auth[0].algorithms[0]", "`none` is never accepted"),
        ("algorithms: [RS999]", "auth[0].algorithms[0]", "expected one of HS256"),
        ("algorithms: []", "auth[0].algorithms", "name at least one algorithm"),
        ("token_from: [remote_addr]", "auth[0].token_from[0]", "a token is read from"),
        ("leeway: -1s", "auth[0].leeway", "expected a duration"),
        ("refresh: 0s", "auth[0].refresh", "above zero"),
        ("colour: red", "auth[0].colour", "unknown key for a jwt authenticator"),
    ],
)
def test_jwt_mistakes_are_located(workdir, auth_text, where, message):
    text = KEYS_ONLY + f"    {auth_text}\n"
    found = problems(workdir, HEAD, text, SEND)
    assert len(found) == 1, found
    assert f": {where}: " in found[0], found
    assert message in found[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"nokeys": []}', 'a JSON object with a "keys" list'),
        (jwks({"kty": "RSA", "kid": "x", "n": "AQAB", "e": 5}), "keys[0]"),
        (jwks(rsa_jwk(), rsa_jwk()), "kid 'r1' appears twice"),
        (jwks(ec_jwk(alg="ES384")), "no key usable with RS256, ES256"),
        (jwks({**rsa_jwk(), "d": "AQAB"}), "a private key"),
    ],
)
def test_a_bad_key_file_fails_the_load(workdir, content, message):
    (workdir / "keys.json").write_text(content)
    found = problems(workdir, HEAD, USERS, SEND)
    assert len(found) == 1, found
    assert ": auth[0].keys: " in found[0]
    assert message in found[0]


def test_a_missing_key_file_is_named(workdir):
    (workdir / "keys.json").unlink()
    (found,) = problems(workdir, HEAD, USERS, SEND)
    assert "keys.json" in found
    assert "No such file" in found


@pytest.mark.parametrize(
    ("parts", "where", "message"),
    [
        (
            (USERS, "default_auth: nobody\n", SEND),
            "default_auth",
            "undefined authenticator 'nobody'",
        ),
        ((USERS, SEND, "    auth: nobody\n"), "commands[0].auth", "undefined authenticator"),
        ((SEND, "    claims: {role: admin}\n"), "commands[0].claims", "need an authenticator"),
        (
            (USERS, SEND, "    auth: users\n    claims: {role: []}\n"),
            "commands[0].claims.role",
            "at least one",
        ),
        (
            (USERS, SEND, "    auth: users\n    claims: {role: {a: 1}}\n"),
            "commands[0].claims.role",
            "expected",
        ),
        (
            (USERS, SEND, "    uid: auth.nope\n"),
            "commands[0].uid",
            "auth.sub, auth.consumer or auth.claim.NAME",
        ),
        (
            (USERS, "  - name: users\n    type: hmac\n    secrets: {k: x}\n", SEND),
            "auth[1].name",
            "duplicate authenticator name",
        ),
        (
            ("auth:\n  - name: none\n    type: hmac\n    secrets: {k: x}\n", SEND),
            "auth[0].name",
            "not 'none'",
        ),
        (("auth:\n  - name: x\n    type: saml\n", SEND), "auth[0].type", "expected one of jwt"),
        (
            ("auth:\n  - name: x\n    type: api_key\n    keys: {a: {sha256: abc}}\n", SEND),
            "auth[0].keys.a.sha256",
            "64 hex digits",
        ),
        (
            (
                "auth:\n  - name: x\n    type: hmac\n    secrets: {k: env.TLVPROXY_UNSET_VAR}\n",
                SEND,
            ),
            "auth[0].secrets.k",
            "TLVPROXY_UNSET_VAR",
        ),
        (
            (SEND, "websocket: {upstream: im, allowed_origins: [https://a.example/]}\n"),
            "websocket.allowed_origins[0]",
            "no path",
        ),
    ],
)
def test_auth_mistakes_are_located(workdir, parts, where, message):
    found = problems(workdir, HEAD, *parts)
    assert any(f": {where}: " in line and message in line for line in found), found


def test_check_warns_about_the_callers_word_on_an_authenticated_command(workdir):
    table = load(
        workdir,
        HEAD,
        USERS,
        SEND,
        "    auth: users\n    uid: header.X-User-Id\n    fields: {text: header.X-Text}\n",
    )
    assert len(table.warnings) == 2
    assert "commands[0].uid: the uid comes from header.x-user-id" in table.warnings[0]
    assert "commands[0].fields.text" in table.warnings[1]
    result = subprocess.run(
        [sys.executable, "-m", "tlvproxy", "check", "-c", str(workdir / "commands.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "warning:" in result.stderr
    assert "header.x-user-id" in result.stderr


def test_check_warns_about_a_websocket_uid_the_client_writes(workdir):
    table = load(
        workdir,
        HEAD,
        USERS,
        SEND,
        "websocket: {upstream: im, auth: users, uid: query.uid}\n",
    )
    (warning,) = table.warnings
    assert "websocket.uid: the session's uid comes from query.uid" in warning


def test_check_warns_about_binary_frames_carrying_their_own_uid(workdir):
    table = load(
        workdir, HEAD, USERS, SEND, "websocket: {upstream: im, auth: users, mode: binary}\n"
    )
    (warning,) = table.warnings
    assert "websocket.uid: without it, the uid of each binary frame is the client's own" in warning


def test_origins_are_compared_in_lower_case(workdir):
    table = load(
        workdir,
        HEAD,
        SEND,
        "websocket: {upstream: im, allowed_origins: [HTTPS://Chat.Example.com]}\n",
    )
    assert table.websocket is not None
    assert table.websocket.allowed_origins == ("https://chat.example.com",)


def test_a_new_key_file_is_a_new_table_version(workdir):
    before = load(workdir, HEAD, USERS, SEND).version
    (workdir / "keys.json").write_text(jwks(rsa_jwk()))
    assert load(workdir, HEAD, USERS, SEND).version != before


def test_no_warning_without_an_authenticator(workdir):
    table = load(workdir, HEAD, SEND, "    uid: header.X-User-Id\n")
    assert table.warnings == ()


def test_rsa_key_object_is_what_the_tests_sign_with():
    # Guards the fixtures: the JWK the tables carry is RSA_KEY's public half.
    assert rsa_jwk()["n"]
    assert RSA_KEY.key_size == 2048


def test_cors_loads_with_its_defaults(workdir):
    table = load(workdir, HEAD, SEND, "cors: {origins: [HTTPS://Partner.example], max_age: 1m}\n")
    assert table.cors is not None
    assert table.cors.origins == ("https://partner.example",)
    assert table.cors.methods == ("GET", "POST", "PUT", "PATCH", "DELETE")
    assert table.cors.max_age == 60
    assert not table.cors.credentials
    assert load(workdir, HEAD, SEND, "cors: null\n").cors is None


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('cors: {origins: ["*"], credentials: true}\n', "cors.credentials", "list the origins"),
        ("cors: {origins: [https://a.example/x]}\n", "cors.origins[0]", "no path"),
        ("cors: {origins: [https://a.example], methods: [TRACE]}\n", "cors.methods[0]", "TRACE"),
        ("cors: {origins: [https://a.example], headers: [a b]}\n", "cors.headers[0]", "header"),
        ("cors: {methods: [GET]}\n", "cors.origins", "required key is missing"),
    ],
)
def test_cors_mistakes_are_located(workdir, text, where, message):
    found = problems(workdir, HEAD, SEND, text)
    assert any(f": {where}: " in line and message in line for line in found), found

"""Key expressions: the `auth.*` forms and numbers read once (docs/configuration.md)."""

from __future__ import annotations

import pytest

from tlvproxy.auth.identity import Identity
from tlvproxy.config.keys import KeyExpr, parse_key, parse_number
from tlvproxy.server.view import RequestContext


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auth.sub", KeyExpr("auth", "sub")),
        ("auth.consumer", KeyExpr("auth", "consumer")),
        ("auth.claim.tenant", KeyExpr("auth", "claim.tenant")),
        ("auth.claim.a.b", KeyExpr("auth", "claim.a.b")),
    ],
)
def test_identity_key_expressions(text, expected):
    assert parse_key(text) == expected
    assert str(parse_key(text)) == text


@pytest.mark.parametrize("text", ["auth", "auth.", "auth.claim.", "auth.claim", "auth.uid"])
def test_bad_identity_key_expressions(text):
    with pytest.raises(ValueError, match=r"auth\.sub, auth\.consumer or auth\.claim\.NAME"):
        parse_key(text)


def test_identity_values_read_through_a_request():
    context = RequestContext(remote_addr="10.0.0.1", headers=[], query_string="")
    key = parse_key("auth.claim.roles")
    assert key.evaluate(context) is None  # no identity: absent
    context.identity = Identity(
        authenticator="users", sub="7", claims={"roles": ["a", "b"], "n": 4.0, "ok": False}
    )
    assert key.evaluate(context) == '["a","b"]'
    assert parse_key("auth.claim.n").evaluate(context) == "4"
    assert parse_key("auth.claim.ok").evaluate(context) == "false"
    assert parse_key("auth.sub").evaluate(context) == "7"
    assert parse_key("auth.consumer").evaluate(context) is None


@pytest.mark.parametrize(("text", "number"), [("10", 10), ("010", 10), ("+10", 10), ("-3", -3)])
def test_numbers_in_any_plain_spelling(text, number):
    assert parse_number(parse_key("header.x-user-id"), text) == number


@pytest.mark.parametrize(
    "text", ["1_0", " 10", "10 ", "", "+", "0x10", "1e3", "\uff11\uff10", "9" * 21]
)
def test_what_int_would_take_but_a_number_key_refuses(text):
    with pytest.raises(ValueError, match=r"header\.x-user-id: expected a whole number"):
        parse_number(parse_key("header.x-user-id"), text)


def test_a_normalised_number_is_what_every_reader_sees():
    key = parse_key("header.x-user-id")
    context = RequestContext(
        remote_addr="10.0.0.1", headers=[("x-user-id", "+010")], query_string=""
    )
    assert key.evaluate(context) == "+010"
    context.numbers = {key: "10"}
    assert key.evaluate(context) == "10"
    assert parse_key("header.other").evaluate(context) is None

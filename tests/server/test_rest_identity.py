"""What a REST request reads of its identity and its numbers (docs/security.md)."""

from __future__ import annotations

import pytest

from tlvproxy.auth.identity import Identity
from tlvproxy.config.keys import parse_key
from tlvproxy.config.model import CommandSpec
from tlvproxy.errors import BadRequest, Forbidden
from tlvproxy.server.fill import field_values, read_numbers, uid_of
from tlvproxy.server.view import RequestContext


def command(**options) -> CommandSpec:
    return CommandSpec(name="list_messages", command=0x1004, upstream="im", **options)


def context(identity: Identity | None = None, **headers: str) -> RequestContext:
    made = RequestContext(
        remote_addr="10.0.0.1",
        headers=[(k.replace("_", "-"), v) for k, v in headers.items()],
        query_string="",
    )
    made.identity = identity
    return made


def test_a_field_the_identity_lacks_is_refused_not_left_to_the_caller():
    # Found by the docs review: the caller's own `user_id` in the body stood in.
    spec = command(fields={"user_id": parse_key("auth.claim.uid")})
    with pytest.raises(Forbidden, match=r"auth\.claim\.uid, which this command's user_id needs"):
        field_values(spec, context(Identity(authenticator="users", sub="7")))
    found = field_values(spec, context(Identity(authenticator="users", claims={"uid": 9})))
    assert found == {"user_id": "9"}


def test_a_header_field_that_is_absent_is_simply_absent():
    spec = command(fields={"text": parse_key("header.x-text")})
    assert field_values(spec, context()) == {}


def test_uid_from_an_identity_without_it_is_forbidden():
    key = parse_key("auth.sub")
    spec = command(uid=key, numeric_keys=(key,))
    request = context(Identity(authenticator="partners", consumer="acme"))
    read_numbers(spec, request)
    with pytest.raises(Forbidden):
        uid_of(spec, request)


@pytest.mark.parametrize(("given", "uid"), [("010", 10), ("+10", 10), ("10", 10), ("0", 0)])
def test_uid_spellings_read_as_one_number(given, uid):
    key = parse_key("header.x-user-id")
    spec = command(uid=key, numeric_keys=(key,))
    request = context(x_user_id=given)
    read_numbers(spec, request)
    assert uid_of(spec, request) == uid
    assert key.evaluate(request) == str(uid)  # what a rate limit or hash key reads


@pytest.mark.parametrize("given", ["1_0", "ten", "4294967296", "-1"])
def test_bad_uids_are_bad_requests(given):
    key = parse_key("header.x-user-id")
    spec = command(uid=key, numeric_keys=(key,))
    request = context(x_user_id=given)

    def read() -> int:
        read_numbers(spec, request)
        return uid_of(spec, request)

    with pytest.raises(BadRequest):
        read()

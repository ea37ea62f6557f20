"""How `split` and `last_good` read their keys (SPEC 3, 4.6), through `tlvproxy
serve` and two demo services: an empty value is absent, a key that fills a
number for the command reads as that number on REST and on a json-mode
WebSocket alike, a `last_good` answer is served only to a request that
would have sent the upstream the same frame, and `tlvproxy_split_total`
counts only the requests sent."""

from __future__ import annotations

import pytest

from tests.ops.procs import Processes, WebSocket
from tests.ops.test_traffic import (
    CURRENT,
    NEXT,
    PROFILE,
    PROFILE_NEXT,
    commands,
    counted,
    start,
    who,
)

pytestmark = pytest.mark.slow


def test_an_empty_key_is_absent_for_split_and_last_good(procs: Processes) -> None:
    current, address = procs.upstream_process()
    rules = {
        "get_profile": {
            "split": [{"key": "query.did", "percent": 100, "to": "get_profile_next"}],
        },
        "list_messages": {"fallback": {"last_good": {"key": "query.did", "ttl": "10m"}}},
    }
    gateway = start(procs, address, commands=commands(PROFILE_NEXT, **rules))
    assert who(gateway.call("GET", f"{PROFILE}?did=a")) == "next"
    assert who(gateway.call("GET", f"{PROFILE}?did=")) == "current"
    assert who(gateway.call("GET", PROFILE)) == "current"
    split = counted(gateway, "tlvproxy_split_total", command="get_profile", to="get_profile_next")
    assert split == 1

    messages = "/v1/users/7/messages"
    assert gateway.call("GET", f"{messages}?did=").status == 200
    assert gateway.call("GET", f"{messages}?did=b").status == 200
    current.kill()
    # Kept for `b`; nothing was kept for an empty key.
    assert gateway.call("GET", f"{messages}?did=b").headers.get("x-fallback") == "last_good"
    refused = gateway.call("GET", f"{messages}?did=")
    assert refused.status == 502
    assert "x-fallback" not in refused.headers


def test_a_key_that_fills_a_number_routes_alike_on_rest_and_websocket(
    procs: Processes, upstream: str
) -> None:
    # `query.account` fills get_profile's uid, a number: `007` is 7.
    rules = {
        "get_profile": {
            "uid": "query.account",
            "split": [{"key": "query.account", "values": [7], "to": "get_profile_next"}],
        }
    }
    gateway = start(procs, upstream, commands=commands(PROFILE_NEXT, **rules))
    for account in ("7", "007", "%2B7"):
        assert who(gateway.call("GET", f"{PROFILE}?account={account}")) == "next", account
    assert who(gateway.call("GET", f"{PROFILE}?account=70")) == "current"
    for account, nickname in (("7", NEXT), ("007", NEXT), ("%2B7", NEXT), ("70", CURRENT)):
        session = WebSocket(gateway.http_port, f"/ws?uid=1&did=a&account={account}")
        try:
            session.send({"cmd": "get_profile", "seq": 1, "body": {"user_id": 7}})
            answer = session.receive()
            assert isinstance(answer, dict)
            assert answer["body"]["nickname"] == nickname, account
        finally:
            session.close()


def test_a_last_good_answer_is_served_only_to_the_same_request(procs: Processes) -> None:
    current, address = procs.upstream_process()
    rules = {
        "get_profile": {"fallback": {"last_good": {"key": "header.X-Account", "ttl": "10m"}}},
        "list_messages": {
            "uid": "header.X-Uid",
            "fallback": {"last_good": {"key": "path.user_id", "ttl": "10m"}},
        },
    }
    gateway = procs.gateway(address, commands=commands(**rules))
    account, first = {"X-Account": "alice"}, {"X-Uid": "1"}
    messages = "/v1/users/7/messages"
    profile = gateway.call("GET", "/v1/users/5/profile", headers=account)
    assert profile.status == 200
    assert gateway.call("GET", f"{messages}?limit=5", headers=first).status == 200
    current.kill()

    # The same requests: the answers they got stand in.
    again = gateway.call("GET", "/v1/users/5/profile", headers=account)
    assert (again.status, again.headers["x-fallback"], again.body) == (
        200,
        "last_good",
        profile.body,
    )
    same = gateway.call("GET", f"{messages}?limit=5", headers={"X-Uid": "01"})
    assert (same.status, same.headers["x-fallback"]) == (200, "last_good")
    for path, headers in (
        ("/v1/users/7/profile", account),  # the same key, another user's profile
        (f"{messages}?limit=6", first),  # the same key, another request field
        (messages, first),
        (f"{messages}?limit=5", {"X-Uid": "2"}),  # the same key and body, another uid
    ):
        refused = gateway.call("GET", path, headers=headers)
        assert refused.status == 502, (path, headers)
        assert "x-fallback" not in refused.headers


def test_a_request_refused_before_it_is_sent_is_not_counted_as_split(
    procs: Processes, upstream: str
) -> None:
    rules = {
        "get_profile": {
            "uid": "header.X-Uid",
            "split": [{"key": "header.X-Group", "values": ["beta"], "to": "get_profile_next"}],
        }
    }
    gateway = start(procs, upstream, commands=commands(PROFILE_NEXT, **rules))
    beta = {"X-Group": "beta"}
    assert gateway.call("GET", "/v1/users/abc/profile", headers=beta).status == 400
    assert gateway.call("GET", PROFILE, headers={**beta, "X-Uid": "x"}).status == 400
    assert gateway.call("GET", PROFILE, headers={**beta, "X-Uid": "99999999999"}).status == 400
    assert who(gateway.call("GET", PROFILE, headers=beta)) == "next"
    split = counted(gateway, "tlvproxy_split_total", command="get_profile", to="get_profile_next")
    assert split == 1

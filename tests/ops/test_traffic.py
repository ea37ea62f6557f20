"""Split, mirror and fallback through the real gateway (SPEC 3, 4.6): `tlvproxy
serve` in front of two real demo services on different ports, the second one
playing the next version (`mock-upstream --upstream im_next --variant next`,
whose profiles say `User N` where the current one says `userN`)."""

from __future__ import annotations

import http.client
import json
import selectors
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import DEMO
from tests.ops.procs import (
    Answer,
    Gateway,
    Processes,
    WebSocket,
    answer_of,
    free_port,
    metric,
    wait_for,
)
from tlvproxy.policy.split import bucket

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

PROFILE = "/v1/users/7/profile"
CURRENT, NEXT = "user7", "User 7"

PROFILE_NEXT = {
    "name": "get_profile_next",
    "command": 0x1002,  # get_profile's word, on another upstream
    "upstream": "im_next",
    "request": "demo.im.GetProfileRequest",
    "response": "demo.im.Profile",
    "idempotent": True,
}
LIST_NEXT = {
    "name": "list_messages_next",
    "command": 0x1004,
    "upstream": "im_next",
    "request": "demo.im.ListMessagesRequest",
    "response": "demo.im.ListMessagesResponse",
}
PROFILE_HANG = {**PROFILE_NEXT, "name": "get_profile_hang", "upstream": "im_hang"}


def commands(*extra: dict[str, Any], **rules: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo commands, `rules[name]` laid over each, then `extra` commands."""
    listed: list[dict[str, Any]] = DEMO["commands"]
    return [{**c, **rules.get(c["name"], {})} for c in listed] + list(extra)


def start(
    procs: Processes, current: str, upstreams: dict[str, Any] | None = None, **overrides: Any
) -> Gateway:
    """A gateway whose `im` is `current` and whose `im_next` is a new demo
    service playing the next version, on the same table."""
    next_port = free_port()
    path, http_port, admin_port = procs.table(
        current,
        f"traffic{next_port}",
        upstreams={"im_next": {"nodes": [f"127.0.0.1:{next_port}"]}, **(upstreams or {})},
        **overrides,
    )
    procs.upstream("--upstream", "im_next", "--variant", "next", table=path, port=next_port)
    return procs.serve(path, http_port, admin_port)


def who(answer: Answer) -> str:
    """Which service answered a profile of user 7."""
    assert answer.status == 200, answer
    nickname: str = answer.json()["nickname"]
    assert nickname in (CURRENT, NEXT), answer
    return "next" if nickname == NEXT else "current"


class Client:
    """One kept-alive HTTP connection, for many requests in a row."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        self.connection.request("GET", path, headers=headers or {})
        return answer_of(self.connection.getresponse())

    def close(self) -> None:
        self.connection.close()


def choices(gateway: Gateway, dids: list[str]) -> dict[str, str]:
    """Which service answered each device id's request."""
    client = Client(gateway.http_port)
    try:
        return {did: who(client.get(f"{PROFILE}?did={did}")) for did in dids}
    finally:
        client.close()


def records(gateway: Gateway, message: str) -> list[dict[str, Any]]:
    return [r for r in gateway.process.records() if r.get("message") == message]


def log_lines(gateway: Gateway, message: str) -> list[str]:
    return [line for line in gateway.process.text().splitlines() if message in line]


def counted(gateway: Gateway, name: str, **labels: str) -> float:
    return metric(gateway.metrics(), name, **labels)


# ---------------------------------------------------------------- split


def test_tail_values_and_percent_route_as_configured(procs: Processes, upstream: str) -> None:
    split = [
        {"key": "header.X-Group", "values": ["beta", "staff"], "to": "get_profile_next"},
        {"key": "header.X-Account", "tail": [0, 1], "to": "get_profile_next"},
        {"key": "query.did", "percent": 30, "to": "get_profile_next"},
    ]
    gateway = start(procs, upstream, commands=commands(PROFILE_NEXT, get_profile={"split": split}))
    assert who(gateway.call("GET", PROFILE)) == "current"  # no key: no rule matches
    assert who(gateway.call("GET", PROFILE, headers={"X-Group": "beta"})) == "next"
    assert who(gateway.call("GET", PROFILE, headers={"X-Group": "gamma"})) == "current"
    for account, expected in (
        ("1230", "next"),
        ("41", "next"),
        ("42", "current"),
        ("x", "current"),
    ):
        answer = gateway.call("GET", PROFILE, headers={"X-Account": account})
        assert who(answer) == expected, account
    dids = [f"device-{n}" for n in range(200)]
    found = choices(gateway, dids)
    expected_dids = {did: "next" if bucket(did) < 3000 else "current" for did in dids}
    assert found == expected_dids
    # The first matching rule wins: a listed group goes, whatever its device.
    staying = next(did for did in dids if found[did] == "current")
    group = {"X-Group": "staff", "X-Account": "42"}
    assert who(gateway.call("GET", f"{PROFILE}?did={staying}", headers=group)) == "next"

    sent = 1 + 2 + 1 + sum(1 for v in found.values() if v == "next")
    wait_for(
        lambda: (
            counted(gateway, "tlvproxy_split_total", command="get_profile", to="get_profile_next")
            == sent
        ),
        "the split count",
    )
    access = [r for r in records(gateway, "request") if r.get("route") == "get_profile"]
    assert sum(1 for r in access if r.get("sent_command") == "get_profile_next") == sent
    assert all(r["command"] == "0x1002" for r in access)


def test_percent_is_stable_across_gateways_and_restarts(
    procs: Processes, upstream: str, tmp_path: Any
) -> None:
    split = [{"key": "query.did", "percent": 25, "to": "get_profile_next"}]
    table = commands(PROFILE_NEXT, get_profile={"split": split})
    first = start(procs, upstream, commands=table)
    second = start(procs, upstream, commands=table)  # another process, another hash seed
    dids = [f"{n:x}-device" for n in range(10_000)]

    found = choices(first, dids)
    share = sum(1 for v in found.values() if v == "next") / len(dids)
    assert abs(share - 0.25) <= 0.01, share
    sample = dids[::10]
    assert choices(second, sample) == {did: found[did] for did in sample}

    first.process.send(signal.SIGTERM)
    assert first.process.wait() == 0
    restarted = procs.serve(first.table, first.http_port, first.admin_port)
    assert choices(restarted, sample) == {did: found[did] for did in sample}


# ---------------------------------------------------------------- mirror


def test_mirrored_copies_reach_the_second_service_and_are_compared(
    procs: Processes, upstream: str
) -> None:
    mirror_profile = {"mirror": {"to": "get_profile_next", "compare": True}}
    mirror_list = {"mirror": {"to": "list_messages_next", "percent": 100, "compare": True}}
    gateway = start(
        procs,
        upstream,
        commands=commands(
            PROFILE_NEXT, LIST_NEXT, get_profile=mirror_profile, list_messages=mirror_list
        ),
    )
    plain = procs.gateway(upstream)  # the same service, no mirror
    for _ in range(5):
        answer = gateway.call("GET", PROFILE)
        assert (answer.status, answer.body) == (200, plain.call("GET", PROFILE).body)
        assert "x-fallback" not in answer.headers
    for _ in range(3):
        answer = gateway.call("GET", "/v1/users/4242/messages")
        assert (answer.status, answer.json()) == (200, {"messages": []})

    def outcome(command: str, name: str) -> float:
        return counted(gateway, "tlvproxy_mirror_total", command=command, outcome=name)

    wait_for(lambda: outcome("get_profile", "different") == 5, "5 different profiles")
    wait_for(lambda: outcome("list_messages", "same") == 3, "3 same lists")
    assert outcome("get_profile", "same") == outcome("get_profile", "failed") == 0
    assert outcome("list_messages", "different") == 0
    differ = records(gateway, "mirrored answers differ")
    assert len(differ) == 5
    assert {(r["command"], r["to"]) for r in differ} == {("get_profile", "get_profile_next")}
    assert all(r["paths"] == ["nickname", "tags[1]"] for r in differ)
    # Paths only: the values (the users' data) stay out of the log.
    lines = log_lines(gateway, "mirrored answers differ")
    assert lines
    assert not any(NEXT in line or CURRENT in line for line in lines)
    access = {r["request_id"] for r in records(gateway, "request")}
    assert {r["request_id"] for r in differ} <= access


def test_compare_logs_the_values_only_when_asked(procs: Processes, upstream: str) -> None:
    mirror = {"mirror": {"to": "get_profile_next", "compare": True, "log_values": True}}
    gateway = start(procs, upstream, commands=commands(PROFILE_NEXT, get_profile=mirror))
    gateway.call("GET", PROFILE)
    wait_for(lambda: records(gateway, "mirrored answers differ"), "the compare's log line")
    [line] = records(gateway, "mirrored answers differ")
    assert line["values"] == {
        "nickname": [json.dumps(CURRENT), json.dumps(NEXT)],
        "tags[1]": [None, json.dumps("next")],
    }


class Hanging:
    """A TCP node that accepts connections and reads them, and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    accepted, _ = self.listener.accept()
                    self._selector.register(accepted, selectors.EVENT_READ)
                elif data := sock.recv(65536):
                    self.received += len(data)
                else:
                    self._selector.unregister(sock)
                    sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


@pytest.fixture
def hanging() -> Iterator[Hanging]:
    node = Hanging()
    try:
        yield node
    finally:
        node.close()


def hang_table(hanging: Hanging, timeout: str) -> dict[str, Any]:
    """Overrides: get_profile mirrored, all of it, to a node that never answers."""
    hang = {**PROFILE_HANG, "timeout": timeout}
    mirror = {"mirror": {"to": "get_profile_hang", "compare": True}}
    return {
        "upstreams": {"im_hang": {"nodes": [hanging.address], "connections": 2}},
        "commands": commands(PROFILE_NEXT, hang, get_profile=mirror),
    }


def test_a_mirror_target_that_hangs_does_not_slow_the_caller(
    procs: Processes, upstream: str, hanging: Hanging
) -> None:
    overrides = hang_table(hanging, "3s")
    gateway = start(procs, upstream, upstreams=overrides.pop("upstreams"), **overrides)
    plain = procs.gateway(upstream)
    client = Client(gateway.http_port)
    try:
        slowest = 0.0
        for _ in range(30):
            started = time.monotonic()
            answer = client.get(PROFILE)
            slowest = max(slowest, time.monotonic() - started)
            assert (answer.status, answer.body) == (200, plain.call("GET", PROFILE).body)
    finally:
        client.close()
    # Had a copy held its caller, the caller would have waited its 3 s.
    assert slowest < 1.0, slowest
    wait_for(lambda: hanging.received > 0, "the copies at the hanging node")
    assert counted(gateway, "tlvproxy_mirror_total", command="get_profile", outcome="failed") == 0
    wait_for(
        lambda: (
            counted(gateway, "tlvproxy_mirror_total", command="get_profile", outcome="failed") == 30
        ),
        "the copies' timeouts",
    )


def test_copies_beyond_1000_outstanding_are_dropped_and_counted(
    procs: Processes, upstream: str, hanging: Hanging
) -> None:
    overrides = hang_table(hanging, "120s")
    gateway = start(procs, upstream, upstreams=overrides.pop("upstreams"), **overrides)
    client = Client(gateway.http_port)
    try:
        statuses = {client.get(PROFILE).status for _ in range(1100)}
    finally:
        client.close()
    assert statuses == {200}

    def outcome(name: str) -> float:
        return counted(gateway, "tlvproxy_mirror_total", command="get_profile", outcome=name)

    assert outcome("dropped") == 100
    assert outcome("failed") == outcome("different") == outcome("same") == 0


# ---------------------------------------------------------------- fallback


def test_fallback_answers_when_the_service_is_down(procs: Processes) -> None:
    current, address = procs.upstream_process()
    rules = {
        "get_profile": {"fallback": {"last_good": {"key": "path.user_id", "ttl": "10m"}}},
        "list_messages": {"fallback": {"body": {"messages": []}}},
    }
    gateway = start(procs, address, commands=commands(PROFILE_NEXT, **rules))
    kept = gateway.call("GET", PROFILE)
    assert kept.status == 200
    assert "x-fallback" not in kept.headers
    current.kill()

    answer = gateway.call("GET", PROFILE)
    assert (answer.status, answer.headers["x-fallback"]) == (200, "last_good")
    assert answer.body == kept.body
    # No answer kept for this key: the error stands.
    refused = gateway.call("GET", "/v1/users/8/profile")
    assert refused.status == 502
    assert refused.json()["error"]["code"] == "upstream_unavailable"
    assert "x-fallback" not in refused.headers
    static = gateway.call("GET", "/v1/users/8/messages")
    assert (static.status, static.headers["x-fallback"]) == (200, "static")
    assert static.json() == {"messages": []}

    def fallbacks(command: str, kind: str) -> float:
        return counted(gateway, "tlvproxy_fallbacks_total", command=command, kind=kind)

    assert fallbacks("get_profile", "last_good") == 1
    assert fallbacks("list_messages", "static") == 1
    assert fallbacks("get_profile", "static") == 0
    wait_for(lambda: len(records(gateway, "request")) >= 4, "the access records")
    served = [r for r in records(gateway, "request") if "fallback" in r]
    assert [(r["route"], r["fallback"], r["upstream_error"]) for r in served] == [
        ("get_profile", "last_good", "upstream_unavailable"),
        ("list_messages", "static", "upstream_unavailable"),
    ]

    # A reload that keeps the rule keeps the answers; one that changes it starts afresh.
    assert gateway.admin("POST", "/admin/reload").status == 200
    assert gateway.call("GET", PROFILE).headers.get("x-fallback") == "last_good"
    changed = {"fallback": {"last_good": {"key": "path.user_id", "ttl": "9m"}}}
    gateway.rewrite_table(commands=commands(PROFILE_NEXT, get_profile=changed))
    assert gateway.admin("POST", "/admin/reload").status == 200
    assert gateway.call("GET", PROFILE).status == 502


def test_a_last_good_answer_older_than_ttl_is_not_served(procs: Processes) -> None:
    current, address = procs.upstream_process()
    rules = {"get_profile": {"fallback": {"last_good": {"key": "path.user_id", "ttl": "2s"}}}}
    gateway = procs.gateway(address, commands=commands(**rules))
    assert gateway.call("GET", PROFILE).status == 200
    kept_until = time.monotonic() + 2.0  # the answer was kept before this
    current.kill()
    answer = gateway.call("GET", PROFILE)
    assert (answer.status, answer.headers["x-fallback"]) == (200, "last_good")
    time.sleep(max(0.0, kept_until - time.monotonic()) + 0.2)
    stale = gateway.call("GET", PROFILE)
    assert stale.status == 502
    assert "x-fallback" not in stale.headers


def test_fallback_answers_a_timeout_but_never_an_upstream_status(
    procs: Processes, upstream: str
) -> None:
    echo = {"timeout": "300ms", "fallback": {"body": {"fallback": True}}}
    gateway = procs.gateway(upstream, commands=commands(echo=echo))
    late = gateway.call("POST", "/v1/echo", {"_delay_ms": 2000})
    assert (late.status, late.headers["x-fallback"], late.json()) == (
        200,
        "static",
        {"fallback": True},
    )
    refused = gateway.call("POST", "/v1/echo", {"_status": 2})
    assert refused.status == 404
    assert "x-fallback" not in refused.headers
    assert gateway.call("POST", "/v1/echo", {"a": 1}).json() == {"a": 1}


# ---------------------------------------------------------------- WebSocket json mode


def test_json_mode_messages_are_split_mirrored_and_fall_back(
    procs: Processes, upstream: str
) -> None:
    rules = {
        "get_profile": {
            "split": [{"key": "query.uid", "tail": [1], "to": "get_profile_next"}],
            "mirror": {"to": "get_profile_next", "compare": True},
        },
        "echo": {"timeout": "300ms", "fallback": {"body": {"fallback": True}}},
    }
    gateway = start(procs, upstream, commands=commands(PROFILE_NEXT, **rules))
    split = WebSocket(gateway.http_port, "/ws?uid=11&did=a")
    stays = WebSocket(gateway.http_port, "/ws?uid=12&did=b")
    try:
        split.send({"cmd": "get_profile", "seq": 1, "body": {"user_id": 7}})
        stays.send({"cmd": "get_profile", "seq": 1, "body": {"user_id": 7}})
        moved, kept = split.receive(), stays.receive()
        assert isinstance(moved, dict)
        assert isinstance(kept, dict)
        assert (moved["cmd"], moved["seq"], moved["status"]) == ("get_profile", 1, 0)
        assert moved["body"]["nickname"] == NEXT
        assert kept["body"]["nickname"] == CURRENT
        assert "fallback" not in kept

        stays.send({"cmd": "echo", "seq": 2, "body": {"_delay_ms": 2000}})
        late = stays.receive()
        assert late == {
            "cmd": "echo",
            "seq": 2,
            "status": 0,
            "body": {"fallback": True},
            "fallback": "static",
        }
        stays.send({"cmd": "echo", "seq": 3, "body": {"a": 1}})
        assert stays.receive() == {"cmd": "echo", "seq": 3, "status": 0, "body": {"a": 1}}
    finally:
        split.close()
        stays.close()

    def count(name: str, **labels: str) -> float:
        return counted(gateway, name, **labels)

    assert count("tlvproxy_split_total", command="get_profile", to="get_profile_next") == 1
    assert count("tlvproxy_fallbacks_total", command="echo", kind="static") == 1
    # The split message went to the mirror's `to` already: only the other is copied.
    wait_for(
        lambda: count("tlvproxy_mirror_total", command="get_profile", outcome="different") == 1,
        "the compare of the copied message",
    )


# ---------------------------------------------------------------- admin


def test_admin_config_shows_the_rules(procs: Processes, upstream: str) -> None:
    rules = {
        "get_profile": {
            "split": [{"key": "auth.sub", "percent": 12.5, "to": "get_profile_next"}],
            "mirror": {"to": "get_profile_next", "percent": 5, "compare": True},
            "fallback": {
                "last_good": {"key": "path.user_id", "ttl": "10m", "max_entries": 100},
                "body": {"nickname": "?"},
            },
        }
    }
    gateway = start(procs, upstream, commands=commands(PROFILE_NEXT, **rules))
    shown = {c["name"]: c for c in gateway.admin("GET", "/admin/config").json()["commands"]}
    profile = shown["get_profile"]
    assert profile["split"] == [{"key": "auth.sub", "percent": 12.5, "to": "get_profile_next"}]
    assert profile["mirror"] == {
        "to": "get_profile_next",
        "percent": 5.0,
        "compare": True,
        "log_values": False,
    }
    assert profile["fallback"]["last_good"] == {
        "key": "path.user_id",
        "ttl": 600.0,
        "max_entries": 100,
        "max_bytes": 64 * 1024 * 1024,
    }
    assert profile["fallback"]["body"]["nickname"] == "?"
    assert shown["get_profile_next"]["command"] == shown["get_profile"]["command"] == "0x1002"
    assert shown["echo"]["split"] == []
    assert shown["echo"]["mirror"] is shown["echo"]["fallback"] is None

"""Split and mirror of session messages after a reload retires the pool of
their upstream (docs/operations.md "Reload"), through the real gateway: `tlvproxy
serve` in front of two real demo services, the second one (`im_next`) playing
the next version. A push session or a WebSocket session opened before the
reload keeps its table, and its messages for another upstream go through
that upstream's pool in force: a changed upstream's new pool, or none once a
reload removed it (`upstream_unavailable`), never the retired pool, closed
by then."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.ops.procs import WebSocket, free_port, rewrite, wait_for
from tests.ops.push_client import Session
from tests.ops.test_mirror_slots import outcomes
from tests.ops.test_push_traffic import SESSIONS, profile, who
from tests.ops.test_traffic import LIST_NEXT, NEXT, PROFILE_NEXT, commands, counted
from tlvproxy.server.push_sessions import MAX_IN_FLIGHT

if TYPE_CHECKING:
    from tests.ops.procs import Answer, Gateway, Processes
    from tests.stores.redis_server import RedisServer

pytestmark = pytest.mark.slow

# Every timeout of the table is 1 s: a pool the reload retires closes 2 s
# after it (the old table's longest timeout and a second).
RETIRED = 2.0 + 1.5  # and a margin for a busy box
UPSTREAMS = {"im": {"timeout": "1s"}, "im_next": {"timeout": "1s"}}


def moved(to: str) -> dict[str, Any]:
    """A session whose uid ends in 1 sends the command's messages as `to`;
    the others' are copied to `to`."""
    return {
        "split": [{"key": "query.uid", "tail": [1], "to": to}],
        "mirror": {"to": to, "compare": True},
    }


RULES = commands(
    PROFILE_NEXT,
    LIST_NEXT,
    get_profile=moved("get_profile_next"),
    list_messages=moved("list_messages_next"),
    send_message={"timeout": "1s"},
)


def start(procs: Processes, current: str, **overrides: Any) -> Gateway:
    """A gateway with RULES and push sessions, whose `im` is `current` and whose
    `im_next` is a new demo service playing the next version."""
    next_port = free_port()
    upstreams = {
        **UPSTREAMS,
        "im_next": {**UPSTREAMS["im_next"], "nodes": [f"127.0.0.1:{next_port}"]},
    }
    path, http_port, admin_port = procs.table(
        current,
        f"reload{next_port}",
        upstreams=upstreams,
        commands=RULES,
        sessions=SESSIONS,
        **overrides,
    )
    procs.upstream("--upstream", "im_next", "--variant", "next", table=path, port=next_port)
    return procs.serve(path, http_port, admin_port)


def reload(gateway: Gateway, **overrides: Any) -> None:
    """Reload the gateway's table with `overrides`, then wait until the pools
    it retires are closed."""
    rewrite(gateway.table, **overrides)
    answer = gateway.admin("POST", "/admin/reload")
    assert answer.status == 200, answer
    time.sleep(RETIRED)


def upstreams_now(gateway: Gateway) -> dict[str, Any]:
    """The `upstreams` of the gateway's table file."""
    upstreams: dict[str, Any] = yaml.safe_load(gateway.table.read_text())["upstreams"]
    return upstreams


def lists(session: Session, seq: int) -> Answer:
    return session.send({"cmd": "list_messages", "seq": seq, "body": {"user_id": 4242}})


def test_push_session_messages_go_through_the_pools_in_force_after_a_reload(
    procs: Processes, upstream: str, redis: RedisServer
) -> None:
    # list_messages waits for Redis's verdict, get_profile does not.
    limit = {
        "name": "lists",
        "commands": ["list_messages"],
        "key": "query.did",
        "rate": "1000/s",
        "burst": 1000,
        "store": "redis",
    }
    gateway = start(procs, upstream, redis={"url": redis.url}, rate_limits=[limit])
    split = Session(gateway.http_port, "uid=11&did=a")
    mirrored = Session(gateway.http_port, "uid=12&did=b")
    assert who(profile(split, seq=1)) == "next"
    assert who(profile(mirrored, seq=1)) == "current"
    wait_for(lambda: outcomes(gateway, "get_profile") == {"different": 1}, "the first copy")

    # A new connect_timeout: the reload builds a new pool for im_next and
    # retires the old one, which the sessions' table named.
    table = upstreams_now(gateway)
    table["im_next"] = {**table["im_next"], "connect_timeout": "1500ms"}
    reload(gateway, upstreams=table)
    # More than a session's in-flight bound: each message was settled.
    for seq in range(2, MAX_IN_FLIGHT + 10):
        assert who(profile(split, seq=seq)) == "next", seq
    for seq in range(2, 5):
        answer = lists(split, seq)
        assert (answer.status, answer.json()["body"]) == (200, {"messages": []})
        assert who(profile(mirrored, seq=seq)) == "current"
        answer = lists(mirrored, seq)
        assert (answer.status, answer.json()["body"]) == (200, {"messages": []})
    split_count = counted(
        gateway, "tlvproxy_split_total", command="get_profile", to="get_profile_next"
    )
    assert split_count == MAX_IN_FLIGHT + 9
    wait_for(
        lambda: (
            outcomes(gateway, "get_profile") == {"different": 4}
            and outcomes(gateway, "list_messages") == {"same": 3}
        ),
        "the copies' comparisons",
    )
    assert counted(gateway, "tlvproxy_mirror_outstanding") == 0

    # A table without im_next: a message for it is not sent, and a copy to it
    # fails; the sessions go on.
    reload(
        gateway,
        upstreams={"im": table["im"]},
        commands=commands(send_message={"timeout": "1s"}),
        rate_limits=[],
    )
    gone = profile(split, seq=50)
    assert gone.status == 200
    assert gone.json()["error"]["code"] == "upstream_unavailable", gone
    assert who(profile(mirrored, seq=50)) == "current"
    gone = lists(split, seq=51)
    assert gone.json()["error"]["code"] == "upstream_unavailable", gone
    wait_for(
        lambda: outcomes(gateway, "get_profile") == {"different": 4, "failed": 1}, "the failed copy"
    )
    assert counted(gateway, "tlvproxy_mirror_outstanding") == 0
    assert split.send({"cmd": "echo", "seq": 52, "body": {"a": 1}}).json()["body"] == {"a": 1}


def test_websocket_messages_go_through_the_pools_in_force_after_a_reload(
    procs: Processes, upstream: str
) -> None:
    gateway = start(procs, upstream)
    split = WebSocket(gateway.http_port, "/ws?uid=11&did=a")
    mirrored = WebSocket(gateway.http_port, "/ws?uid=12&did=b")

    def nickname(session: WebSocket, seq: int) -> str:
        session.send({"cmd": "get_profile", "seq": seq, "body": {"user_id": 7}})
        answer = session.receive()
        assert isinstance(answer, dict), answer
        assert (answer["seq"], answer["status"]) == (seq, 0), answer
        found: str = answer["body"]["nickname"]
        return found

    try:
        assert nickname(split, 1) == NEXT
        assert nickname(mirrored, 1) != NEXT
        table = upstreams_now(gateway)
        table["im_next"] = {**table["im_next"], "connect_timeout": "1500ms"}
        reload(gateway, upstreams=table)
        for seq in range(2, 6):
            assert nickname(split, seq) == NEXT
            assert nickname(mirrored, seq) != NEXT
    finally:
        split.close()
        mirrored.close()
    wait_for(
        lambda: outcomes(gateway, "get_profile") == {"different": 5}, "the copies' comparisons"
    )
    assert counted(gateway, "tlvproxy_mirror_outstanding") == 0


def test_sessions_keep_their_own_connection_when_their_pool_is_retired(
    procs: Processes, upstream: str
) -> None:
    gateway = start(procs, upstream)
    websocket = WebSocket(gateway.http_port, "/ws?uid=13&did=c")
    push = Session(gateway.http_port, "uid=14&did=d")

    def both_echo(seq: int) -> None:
        websocket.send({"cmd": "echo", "seq": seq, "body": {"n": seq}})
        answer = websocket.receive()
        assert isinstance(answer, dict), answer
        assert (answer["seq"], answer["body"]) == (seq, {"n": seq}), answer
        assert push.send({"cmd": "echo", "seq": seq, "body": {"n": seq}}).json()["body"] == {
            "n": seq
        }

    try:
        both_echo(1)
        # A new connect_timeout for the sessions' upstream: the reload retires
        # the pool they were opened on, and their connections stay theirs
        # (docs/operations.md "Reload").
        table = upstreams_now(gateway)
        table["im"] = {**table["im"], "connect_timeout": "1500ms"}
        reload(gateway, upstreams=table)
        for seq in range(2, 5):
            both_echo(seq)
    finally:
        websocket.close()

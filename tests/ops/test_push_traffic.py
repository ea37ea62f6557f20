"""Split, mirror and fallback on push-session messages (SPEC 3, 4.6, 8) through
the real gateway: `tlvproxy serve` in front of two real demo services on
different ports, the second one playing the next version (`mock-upstream
--upstream im_next --variant next`, whose profiles say `User N` where the
current one says `userN`), each message sent by `POST .../messages` on a
connection of its own."""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.ops.procs import free_port, wait_for
from tests.ops.push_client import PATH, Session
from tests.ops.test_answer_bound import GET_PROFILE, LIST_MESSAGES, TlvServer
from tests.ops.test_mirror_slots import outcomes
from tests.ops.test_traffic import (
    CURRENT,
    LIST_NEXT,
    NEXT,
    PROFILE_NEXT,
    Hanging,
    commands,
    counted,
    hang_table,
    hanging,
    records,
)
from tlvproxy.policy.split import bucket

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.ops.procs import Answer, Gateway, Process, Processes

pytestmark = pytest.mark.slow

__all__ = ["hanging"]  # the fixture, used by name

SESSIONS = {
    "path": PATH,
    "upstream": "im",
    "hash_on": "query.did",
    "uid": "query.uid",
    "idle_timeout": "60s",
}
# A command of the session's own upstream, which the demo service does not
# know: it answers status 1. A split to it is sent on the session's connection.
ECHO_HERE = {"name": "echo_here", "command": 0x1009, "upstream": "im", "codec": "json"}
SEND_NEXT = {
    "name": "send_message_next",
    "command": 0x1001,
    "upstream": "im_next",
    "request": "demo.im.SendMessageRequest",
    "response": "demo.im.SendMessageResponse",
}


def start(
    procs: Processes, current: str, upstreams: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Gateway, Process]:
    """A gateway with push sessions on `im`, whose `current`, and whose
    `im_next` is a new demo service playing the next version (returned, to
    stop it)."""
    next_port = free_port()
    path, http_port, admin_port = procs.table(
        current,
        f"push{next_port}",
        upstreams={"im_next": {"nodes": [f"127.0.0.1:{next_port}"]}, **(upstreams or {})},
        sessions=SESSIONS,
        **overrides,
    )
    following, _ = procs.upstream_process(
        "--upstream", "im_next", "--variant", "next", table=path, port=next_port
    )
    return procs.serve(path, http_port, admin_port), following


def profile(session: Session, seq: int = 1, user_id: int = 7) -> Answer:
    return session.send({"cmd": "get_profile", "seq": seq, "body": {"user_id": user_id}})


def who(answer: Answer) -> str:
    """Which service answered a profile of user 7, under the `cmd` the client sent."""
    assert answer.status == 200, answer
    value = answer.json()
    assert (value["cmd"], value["status"]) == ("get_profile", 0), answer
    nickname: str = value["body"]["nickname"]
    assert nickname in (CURRENT, NEXT), answer
    return "next" if nickname == NEXT else "current"


# ---------------------------------------------------------------- split


def test_split_rules_send_push_session_messages_to_their_to_command(
    procs: Processes, upstream: str
) -> None:
    split = [
        {"key": "header.X-Group", "values": ["beta", "staff"], "to": "get_profile_next"},
        {"key": "query.uid", "tail": [0, 1], "to": "get_profile_next"},
        {"key": "query.did", "percent": 30, "to": "get_profile_next"},
    ]
    echo_split = [{"key": "query.uid", "values": [41], "to": "echo_here"}]
    table = commands(
        PROFILE_NEXT, ECHO_HERE, get_profile={"split": split}, echo={"split": echo_split}
    )
    gateway, _ = start(procs, upstream, commands=table)
    port = gateway.http_port
    dids = [f"device-{n}" for n in range(40)]
    inside = [did for did in dids if bucket(did) < 3000][:2]
    outside = [did for did in dids if bucket(did) >= 3000][:3]
    assert len(inside) == 2
    # What each session's opening request says decides, not the message's request.
    cases = [
        (f"uid=2&did={outside[0]}", {}, "current"),
        (f"uid=2&did={outside[0]}", {"X-Group": "beta"}, "next"),
        (f"uid=2&did={outside[0]}", {"X-Group": "gamma"}, "current"),
        (f"uid=1230&did={outside[1]}", {}, "next"),
        (f"uid=41&did={outside[1]}", {}, "next"),
        (f"uid=42&did={outside[2]}", {}, "current"),
        (f"uid=42&did={inside[0]}", {}, "next"),
        (f"uid=2&did={inside[1]}", {}, "next"),
    ]
    for query, headers, expected in cases:
        session = Session(port, query, headers)
        assert who(profile(session, seq=3)) == expected, (query, headers)
        # Every message of the session goes the same way.
        assert who(profile(session, seq=4)) == expected, (query, headers)
        assert profile(session, seq=5).json()["seq"] == 5
    sent = 3 * sum(1 for case in cases if case[2] == "next")
    assert (
        counted(gateway, "tlvproxy_split_total", command="get_profile", to="get_profile_next")
        == sent
    )

    # A `to` on the session's own upstream goes on its own connection: the
    # demo service answers echo_here with status 1, under the client's `cmd`.
    moved = Session(port, "uid=41&did=a")
    answer = moved.send({"cmd": "echo", "seq": 9, "body": {"a": 1}})
    assert answer.json() == {"cmd": "echo", "seq": 9, "status": 1, "body": None}
    stays = Session(port, "uid=42&did=a")
    answer = stays.send({"cmd": "echo", "seq": 9, "body": {"a": 1}})
    assert answer.json() == {"cmd": "echo", "seq": 9, "status": 0, "body": {"a": 1}}
    assert counted(gateway, "tlvproxy_split_total", command="echo", to="echo_here") == 1


# ---------------------------------------------------------------- mirror


def test_mirrored_push_messages_reach_the_second_service_and_are_compared(
    procs: Processes, upstream: str
) -> None:
    # A session of uid 11 sends its profiles to the mirror's `to` already.
    to_next = [{"key": "query.uid", "values": [11], "to": "get_profile_next"}]
    table = commands(
        PROFILE_NEXT,
        LIST_NEXT,
        get_profile={"split": to_next, "mirror": {"to": "get_profile_next", "compare": True}},
        list_messages={"mirror": {"to": "list_messages_next", "compare": True}},
    )
    gateway, _ = start(procs, upstream, commands=table)
    plain = procs.gateway(upstream, sessions=SESSIONS)  # the same service, no rules
    session = Session(gateway.http_port, "uid=2&did=a")
    unmirrored = Session(plain.http_port, "uid=2&did=a")
    for seq in range(5):
        answer = profile(session, seq)
        assert (answer.status, answer.body) == (200, profile(unmirrored, seq).body)
        assert "x-fallback" not in answer.headers
        assert who(answer) == "current"
    for seq in range(3):
        answer = session.send({"cmd": "list_messages", "seq": seq, "body": {"user_id": 4242}})
        assert (answer.status, answer.json()["body"]) == (200, {"messages": []})
    # Not copied: the split sent it as the mirror's `to` already.
    split = Session(gateway.http_port, "uid=11&did=b")
    assert who(profile(split)) == "next"

    wait_for(
        lambda: (
            outcomes(gateway, "get_profile") == {"different": 5}
            and outcomes(gateway, "list_messages") == {"same": 3}
        ),
        "5 different profiles and 3 same lists",
    )
    wait_for(lambda: counted(gateway, "tlvproxy_mirror_outstanding") == 0, "no copy outstanding")
    differ = records(gateway, "mirrored answers differ")
    assert len(differ) == 5
    assert all(r["paths"] == ["nickname", "tags[1]"] for r in differ)
    # The session's request id: the one its access record will have.
    assert {r["request_id"] for r in differ} == {session.created.headers["x-request-id"]}


def test_a_hanging_mirror_target_does_not_slow_push_messages(
    procs: Processes, upstream: str, hanging: Hanging
) -> None:
    overrides = hang_table(hanging, "3s")
    gateway, _ = start(procs, upstream, upstreams=overrides.pop("upstreams"), **overrides)
    session = Session(gateway.http_port, "uid=2&did=a")
    slowest = 0.0
    for seq in range(30):
        began = time.monotonic()
        answer = profile(session, seq)
        slowest = max(slowest, time.monotonic() - began)
        assert who(answer) == "current"
    # Had a copy held its caller, the caller would have waited its 3 s.
    assert slowest < 1.0, slowest
    wait_for(lambda: hanging.received > 0, "the copies at the hanging node")
    wait_for(
        lambda: (
            counted(gateway, "tlvproxy_mirror_total", command="get_profile", outcome="failed") == 30
        ),
        "the copies' timeouts",
    )
    assert counted(gateway, "tlvproxy_mirror_outstanding") == 0


# ---------------------------------------------------------------- fallback


def test_fallback_answers_push_messages_when_the_service_is_down(
    procs: Processes, upstream: str
) -> None:
    def moved(to: str, **rules: Any) -> dict[str, Any]:
        """A session whose uid ends in 1 sends the command's messages as `to`."""
        return {"split": [{"key": "query.uid", "tail": [1], "to": to}], **rules}

    rules = {
        "get_profile": moved(
            "get_profile_next", fallback={"last_good": {"key": "query.did", "ttl": "3s"}}
        ),
        "list_messages": moved("list_messages_next", fallback={"body": {"messages": []}}),
        "send_message": moved("send_message_next"),
    }
    gateway, following = start(
        procs, upstream, commands=commands(PROFILE_NEXT, LIST_NEXT, SEND_NEXT, **rules)
    )
    session = Session(gateway.http_port, "uid=11&did=a")
    kept = profile(session, seq=1)
    assert who(kept) == "next"
    assert "x-fallback" not in kept.headers
    kept_until = time.monotonic() + 3.0  # the answer was kept before this
    following.kill()

    answer = profile(session, seq=2)
    assert (answer.status, answer.headers["x-fallback"]) == (200, "last_good")
    assert answer.json() == {**kept.json(), "seq": 2, "fallback": "last_good"}
    # No answer kept for this request (another body): the error stands.
    refused = profile(session, seq=3, user_id=8)
    assert refused.status == 200
    assert refused.json() == {
        "seq": 3,
        "error": {"code": "upstream_unavailable", "message": refused.json()["error"]["message"]},
    }
    assert "x-fallback" not in refused.headers
    # Nor under another session's key.
    elsewhere = Session(gateway.http_port, "uid=21&did=b")
    assert profile(elsewhere, seq=4).json()["error"]["code"] == "upstream_unavailable"
    static = session.send({"cmd": "list_messages", "seq": 5, "body": {"user_id": 8}})
    assert (static.status, static.headers["x-fallback"]) == (200, "static")
    assert static.json() == {
        "cmd": "list_messages",
        "seq": 5,
        "status": 0,
        "body": {"messages": []},
        "fallback": "static",
    }
    # A command that changes something, with no fallback (and no `last_good`
    # allowed): its error stands.
    sent = session.send({"cmd": "send_message", "seq": 6, "body": {"to_uid": 3, "text": "hi"}})
    assert sent.json()["error"]["code"] == "upstream_unavailable"
    assert "x-fallback" not in sent.headers

    def fallbacks(command: str, kind: str) -> float:
        return counted(gateway, "tlvproxy_fallbacks_total", command=command, kind=kind)

    assert fallbacks("get_profile", "last_good") == 1
    assert fallbacks("list_messages", "static") == 1
    assert fallbacks("get_profile", "static") == 0

    # Older than its ttl, the kept answer is not served.
    time.sleep(max(0.0, kept_until - time.monotonic()) + 0.2)
    stale = profile(session, seq=7)
    assert stale.json()["error"]["code"] == "upstream_unavailable"
    assert "x-fallback" not in stale.headers
    # The session's own upstream is up: messages not split go on.
    stays = Session(gateway.http_port, "uid=12&did=a")
    assert who(profile(stays, seq=8)) == "current"


def test_fallback_answers_a_timeout_or_a_lost_connection_of_the_session_itself(
    procs: Processes,
) -> None:
    current, address = procs.upstream_process()
    echo = {"timeout": "3s", "fallback": {"body": {"fallback": True}}}
    gateway = procs.gateway(address, sessions=SESSIONS, commands=commands(echo=echo))
    session = Session(gateway.http_port, "uid=2&did=a")
    late = session.send({"cmd": "echo", "seq": 1, "body": {"_delay_ms": 4000}})
    assert (late.status, late.headers["x-fallback"], late.json()) == (
        200,
        "static",
        {"cmd": "echo", "seq": 1, "status": 0, "body": {"fallback": True}, "fallback": "static"},
    )
    # An upstream status is the service's answer, not a failure.
    refused = session.send({"cmd": "echo", "seq": 2, "body": {"_status": 2}})
    assert refused.json() == {"cmd": "echo", "seq": 2, "status": 2, "body": {"_status": 2}}
    assert "x-fallback" not in refused.headers

    # The session's connection lost with a message on it, long before its
    # deadline: the message is answered by the fallback, and the session ends.
    waiting: list[Answer] = []
    thread = threading.Thread(
        target=lambda: waiting.append(
            session.send({"cmd": "echo", "seq": 3, "body": {"_delay_ms": 2900}})
        )
    )
    thread.start()
    wait_for(
        lambda: counted(gateway, "tlvproxy_push_messages_total", direction="in") == 3,
        "the message on its way",
    )
    time.sleep(0.2)
    killed = time.monotonic()
    current.kill()
    thread.join(20)
    answered = time.monotonic() - killed
    [lost] = waiting
    assert (lost.status, lost.headers["x-fallback"]) == (200, "static")
    assert lost.json()["seq"] == 3
    assert answered < 1.5, answered  # not its timeout: the connection's end
    assert counted(gateway, "tlvproxy_fallbacks_total", command="echo", kind="static") == 2
    wait_for(lambda: records(gateway, "push session"), "the session's access record")
    [record] = records(gateway, "push session")
    assert record["closed"] == "upstream_lost"
    assert session.send({"cmd": "echo", "seq": 4}).status == 404


def test_a_message_waiting_when_the_session_ends_gets_its_error_not_a_fallback(
    procs: Processes, upstream: str
) -> None:
    echo = {"timeout": "5s", "fallback": {"body": {"fallback": True}}}
    gateway = procs.gateway(upstream, sessions=SESSIONS, commands=commands(echo=echo))
    sent = 0

    def answer_when(session: Session, end: Callable[[], object]) -> Answer:
        """The answer to a message still waiting on the session's connection
        when `end` ends the session."""
        nonlocal sent
        waiting: list[Answer] = []
        message = {"cmd": "echo", "seq": 3, "body": {"_delay_ms": 3000}}
        thread = threading.Thread(target=lambda: waiting.append(session.send(message)))
        thread.start()
        sent += 1
        wait_for(
            lambda: counted(gateway, "tlvproxy_push_messages_total", direction="in") == sent,
            "the message on its way",
        )
        time.sleep(0.2)
        ended = time.monotonic()
        end()
        thread.join(20)
        assert time.monotonic() - ended < 1.5  # not its delay: the session's end
        [answer] = waiting
        return answer

    def unanswered(answer: Answer) -> None:
        # No upstream failed: the per-message error, as for a command without rules.
        assert answer.status == 200
        assert "x-fallback" not in answer.headers
        assert answer.json()["seq"] == 3
        assert answer.json()["error"]["code"] == "upstream_unavailable", answer

    deleted = Session(gateway.http_port, "uid=2&did=a")
    unanswered(answer_when(deleted, deleted.delete))
    assert counted(gateway, "tlvproxy_fallbacks_total", command="echo", kind="static") == 0
    wait_for(lambda: records(gateway, "push session"), "the session's access record")
    [record] = records(gateway, "push session")
    assert (record["closed"], record["messages_in"], record["messages_out"]) == ("deleted", 1, 1)

    drained = Session(gateway.http_port, "uid=3&did=b")
    unanswered(answer_when(drained, lambda: gateway.process.send(signal.SIGTERM)))
    assert gateway.process.wait() == 0


def test_a_malformed_frame_on_the_session_connection_is_upstream_protocol_error(
    procs: Processes,
) -> None:
    # Answers one byte over framing.max_body: the header alone breaks the
    # connection (docs/push-sessions.md "Split, mirror, fallback").
    too_large = b"\x00" * (1024 * 1024 + 1)
    server = TlvServer({GET_PROFILE: too_large, LIST_MESSAGES: too_large})
    try:
        lists = {"fallback": {"body": {"messages": []}}}
        table = commands(list_messages=lists)
        gateway = procs.gateway(server.address, sessions=SESSIONS, commands=table)
        plain = Session(gateway.http_port, "uid=2&did=a")
        answer = profile(plain, seq=1)
        assert answer.status == 200
        assert answer.json()["error"]["code"] == "upstream_protocol_error", answer
        # An upstream's failure: the fallback of a command that has one answers.
        ruled = Session(gateway.http_port, "uid=3&did=b")
        answer = ruled.send({"cmd": "list_messages", "seq": 2, "body": {"user_id": 3}})
        assert (answer.status, answer.headers["x-fallback"]) == (200, "static")
        assert answer.json()["body"] == {"messages": []}
        wait_for(lambda: len(records(gateway, "push session")) == 2, "the access records")
        assert {r["closed"] for r in records(gateway, "push session")} == {"upstream_lost"}
    finally:
        server.close()


def test_a_split_message_answered_after_the_session_ended_is_in_its_record(
    procs: Processes, upstream: str
) -> None:
    split = [{"key": "query.uid", "tail": [1], "to": "send_message_next"}]
    table = commands(SEND_NEXT, send_message={"split": split})
    gateway, _ = start(procs, upstream, commands=table)
    session = Session(gateway.http_port, "uid=11&did=a")
    waiting: list[Answer] = []
    # The demo service answers a text starting `/delay MS` that late.
    message = {"cmd": "send_message", "seq": 1, "body": {"to_uid": 3, "text": "/delay 1000 hi"}}
    thread = threading.Thread(target=lambda: waiting.append(session.send(message)))
    thread.start()
    wait_for(
        lambda: (
            counted(gateway, "tlvproxy_split_total", command="send_message", to="send_message_next")
            == 1
        ),
        "the message on im_next's pool",
    )
    assert session.delete().status == 204
    # The record is written now; the answer, not on the session's connection, comes later.
    wait_for(lambda: records(gateway, "push session"), "the session's access record")
    thread.join(20)
    [answer] = waiting
    assert (answer.json()["seq"], answer.json()["status"]) == (1, 0), answer
    assert "msg_id" in answer.json()["body"]
    [record] = records(gateway, "push session")
    assert (record["closed"], record["messages_in"], record["messages_out"]) == ("deleted", 1, 1)
    assert counted(gateway, "tlvproxy_push_messages_total", direction="out") == 1

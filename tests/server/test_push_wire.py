"""The bytes of push sessions (docs/push-sessions.md), sans I/O: session ids,
targets under the sessions path, resume points, events and poll answers;
events read back by the tests' own parser of text/event-stream."""

from __future__ import annotations

import json

import pytest

from tests.ops.push_client import EventParser
from tlvproxy.errors import BadRequest
from tlvproxy.server import push_wire
from tlvproxy.server.push_wire import SessionTarget, parse_after, parse_target


def test_a_session_id_names_its_worker_and_128_random_bits() -> None:
    ids = {push_wire.new_session_id(5) for _ in range(1000)}
    assert len(ids) == 1000
    for session_id in ids:
        owner, token = session_id.split("-", 1)
        assert owner == "5"
        assert len(token) == 22  # 16 bytes, URL-safe base64 without padding
        assert push_wire.owner_of(session_id) == 5
    assert push_wire.owner_of(push_wire.new_session_id(1023)) == 1023


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "5-",
        "5-short",
        "g-AAAAAAAAAAAAAAAAAAAAAA",
        "12345-AAAAAAAAAAAAAAAAAAAAAA",
        "5-AAAAAAAAAAAAAAAAAAAAA=",
        "5-AAAAAAAAAAAAAAAAAAAAAAA",
        "5-AAAAAAAAAAAAAAAAAAAA/A",
        "5-AAAAAAAAAAAAAAAAAAAAAA\n",
    ],
)
def test_text_that_is_not_a_session_id_has_no_owner(text: str) -> None:
    assert push_wire.owner_of(text) is None


def test_targets_under_the_sessions_path() -> None:
    prefix = "/v1/sessions"
    assert parse_target(prefix, "/v1/sessions") == SessionTarget("create", None)
    assert parse_target(prefix, "/v1/sessions/ID") == SessionTarget("delete", "ID")
    for action in ("events", "poll", "messages"):
        assert parse_target(prefix, f"/v1/sessions/ID/{action}") == SessionTarget(action, "ID")
    assert parse_target(prefix, "/v1/sessionsX") is None  # not under it: REST routes it
    for path in (
        "/v1/sessions/",
        "/v1/sessions//poll",
        "/v1/sessions/ID/",
        "/v1/sessions/ID/x",
        "/v1/sessions/ID/poll/x",
    ):
        with pytest.raises(LookupError):
            parse_target(prefix, path)


def test_resume_points() -> None:
    assert parse_after(None, "after") == 0
    assert parse_after("", "after") == 0
    assert parse_after("42", "after") == 42
    for bad in ("-1", "1.5", "1e3", " 1", "\u0661", "99999999999999999"):
        with pytest.raises(BadRequest, match="Last-Event-ID must be a push id"):
            parse_after(bad, "Last-Event-ID")


def test_events_as_a_client_reads_them() -> None:
    text = b'{"cmd":"new_message","push":true,"body":{"text":"a\\nb"}}'
    stream = (
        push_wire.push_event(7, text)
        + push_wire.KEEP_ALIVE
        + push_wire.gap_event(8, 9)
        + push_wire.push_event(10, b'{\r\n  "pretty": 1\n}')
        + push_wire.close_event("upstream_lost")
    )
    parser = EventParser()
    # One byte at a time: the parser must not care how the bytes come.
    events = [event for byte in stream for event in parser.feed(bytes([byte]))]
    assert [(e.kind, e.id) for e in events] == [
        ("message", "7"),
        ("gap", "7"),
        ("message", "10"),
        ("close", "10"),
    ]
    assert json.loads(events[0].data)["body"]["text"] == "a\nb"
    assert json.loads(events[1].data) == {"missed_from": 8, "missed_to": 9}
    assert json.loads(events[2].data) == {"pretty": 1}  # one data line per line
    assert json.loads(events[3].data) == {"closed": "upstream_lost"}
    assert parser.comments == 1


def test_the_stream_head() -> None:
    head = push_wire.stream_head([("X-Request-Id", "r1")]).decode()
    lines = head.split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Content-Type: text/event-stream; charset=utf-8" in lines
    assert "Cache-Control: no-cache" in lines
    assert "X-Accel-Buffering: no" in lines
    assert "X-Request-Id: r1" in lines
    assert "Connection: close" in lines
    assert head.endswith("\r\n\r\n")
    assert "Content-Length" not in head


def test_poll_answers() -> None:
    pushes = [(4, b'{"cmd":"n","push":true,"body":{}}'), (5, b'{"cmd":"n","push":true,"body":1}')]
    assert json.loads(push_wire.poll_body(pushes, 5, gap=False, closed=None)) == {
        "messages": [
            {"id": 4, "cmd": "n", "push": True, "body": {}},
            {"id": 5, "cmd": "n", "push": True, "body": 1},
        ],
        "next": 5,
    }
    assert json.loads(push_wire.poll_body(pushes, 5, gap=True, closed=None))["gap"] is True
    assert json.loads(push_wire.poll_body([], 9, gap=False, closed="deleted")) == {
        "messages": [],
        "next": 9,
        "closed": "deleted",
    }

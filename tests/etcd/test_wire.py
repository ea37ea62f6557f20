"""etcd's JSON answers read strictly: whatever comes back is untrusted (tlvproxy.etcd.wire)."""

from __future__ import annotations

import base64

import orjson
import pytest

from tlvproxy.etcd import wire
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HEADER = {"header": {"revision": "7"}}


def test_a_range_answer_is_read_with_its_revision_and_keys() -> None:
    answer = {
        **HEADER,
        "kvs": [{"key": b64(b"/t/table"), "value": b64(b"x: 1"), "mod_revision": "5"}],
        "count": "1",
    }
    parsed = wire.parse_range(answer)
    assert parsed.revision == 7
    assert parsed.kvs[0].key == b"/t/table"
    assert parsed.kvs[0].value == b"x: 1"
    assert parsed.kvs[0].mod_revision == 5
    assert not parsed.more


def test_fields_left_out_are_their_zero_values() -> None:
    parsed = wire.parse_range({**HEADER, "kvs": [{"key": b64(b"/t/empty")}]})
    assert parsed.kvs[0].value == b""
    assert parsed.kvs[0].mod_revision == 0


@pytest.mark.parametrize(
    ("kv", "reason"),
    [
        ({"key": "not base64!"}, "key is not valid base64"),
        ({"key": b64(b"/k"), "value": "@@@@"}, "value is not valid base64"),
        ({"key": b64(b"/k"), "value": 12}, "value is not a base64 string"),
        ({"key": ""}, "without a key"),
        ({"key": b64(b"/k"), "mod_revision": "12a"}, "mod_revision is not a number"),
        ({"key": b64(b"/k"), "mod_revision": "1" * 25}, "mod_revision is not a number"),
        ({"key": b64(b"/k"), "mod_revision": 2**70}, "mod_revision is not an int64"),
        ({"key": b64(b"/k"), "mod_revision": True}, "mod_revision is not a number"),
        ("a string", "not an object"),
    ],
)
def test_a_malformed_key_value_is_refused_saying_why(kv: object, reason: str) -> None:
    with pytest.raises(MalformedAnswer, match=reason):
        wire.parse_range({**HEADER, "kvs": [kv]})


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"{}", "no header"),
        (b'{"header": {"revision": "1"}, "kvs": {}}', "kvs is not a list"),
        (b'{"header": {"revision": "1"}, "more": "yes"}', "more is not true or false"),
    ],
)
def test_a_malformed_answer_is_refused_saying_why(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedAnswer, match=reason):
        wire.parse_range(wire.parse_json(body))


def test_an_error_answer_is_etcds_refusal_with_its_code() -> None:
    body = orjson.dumps({"error": "required revision has been compacted", "code": 11})
    with pytest.raises(EtcdRefused, match="compacted") as caught:
        wire.parse_json(body)
    assert caught.value.code == wire.CODE_OUT_OF_RANGE


def test_watch_lines_give_events_in_order() -> None:
    line = orjson.dumps(
        {
            "result": {
                "header": {"revision": "9"},
                "events": [
                    {"kv": {"key": b64(b"/t/a"), "value": b64(b"1"), "mod_revision": "8"}},
                    {"type": "DELETE", "kv": {"key": b64(b"/t/b"), "mod_revision": "8"}},
                ],
            }
        }
    )
    answer = wire.parse_watch_line(line)
    assert answer.revision == 9
    assert [(e.kv.key, e.deleted) for e in answer.events] == [(b"/t/a", False), (b"/t/b", True)]


def test_a_compacted_watch_says_so() -> None:
    line = orjson.dumps(
        {"result": {"header": {"revision": "4"}, "canceled": True, "compact_revision": "4"}}
    )
    answer = wire.parse_watch_line(line)
    assert answer.canceled
    assert answer.compact_revision == 4


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"result": {"header": {"revision": "1"}, "events": [{"type": "CHOWN"}]}}', "type"),
        (b'{"result": {"header": {"revision": "1"}, "events": "x"}}', "events is not a list"),
        (b'{"nothing": 1}', "without a result"),
        (b'{"error": {"grpc_code": 14, "message": "closing"}}', "closing"),
    ],
)
def test_a_malformed_watch_line_is_refused(line: bytes, error: str) -> None:
    with pytest.raises((MalformedAnswer, EtcdRefused), match=error):
        wire.parse_watch_line(line)


def test_the_range_of_a_prefix_ends_past_every_key_under_it() -> None:
    assert wire.prefix_end(b"/t/") == b"/t0"
    assert wire.prefix_end(b"a\xff") == b"b"
    assert wire.prefix_end(b"\xff\xff") == b"\0"


@pytest.mark.parametrize(
    "number", ["--5", "-", "", "+5", " 5", "5 ", "1_000", "٣", "1" * 20, "9223372036854775808"]
)
def test_a_number_is_a_plain_int64_or_malformed(number: str) -> None:
    body = orjson.dumps({"header": {"revision": number}})
    with pytest.raises(MalformedAnswer, match="revision"):
        wire.parse_range(wire.parse_json(body))


def test_int64_numbers_are_read_as_strings_or_json_numbers() -> None:
    for number, value in (("-5", -5), ("0", 0), ("9223372036854775807", 2**63 - 1), (7, 7)):
        body = orjson.dumps({"header": {"revision": number}})
        assert wire.parse_range(wire.parse_json(body)).revision == value

"""The json-mode message protocol (SPEC 5), as a pure module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tlvproxy.config.loader import parse_table
from tlvproxy.errors import UpstreamTimeout
from tlvproxy.server import ws_json
from tlvproxy.server.view import RequestContext

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"

TABLE = f"""
proto: {{paths: [{PROTO_ROOT}], files: [demo/im.proto]}}
upstreams:
  im: {{nodes: [127.0.0.1:7001]}}
  other: {{nodes: [127.0.0.1:7002]}}
commands:
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.SendMessageRequest
    response: demo.im.SendMessageResponse
    fields: {{client_ip: remote_addr}}
  - name: echo
    command: 0x1003
    upstream: im
    codec: json
  - name: elsewhere
    command: 0x3000
    upstream: other
    codec: json
  - name: echo_other
    command: 0x1003
    upstream: other
    codec: json
  - name: new_message
    command: 0x2001
    push: demo.im.MessagePush
websocket: {{path: /ws, upstream: im}}
"""


@pytest.fixture(scope="module")
def table():
    return parse_table(TABLE, Path("commands.yaml"))


VIEW = RequestContext(remote_addr="10.1.2.3", headers=(), query_string="")


def test_parses_a_request_by_name_or_number(table) -> None:
    by_name = ws_json.parse_request('{"cmd": "echo", "seq": 1, "body": [1]}', table, "im", VIEW)
    assert (by_name.command.name, by_name.seq, by_name.body) == ("echo", 1, b"[1]")
    by_number = ws_json.parse_request('{"cmd": 4099, "seq": 2}', table, "im", VIEW)
    assert (by_number.command.name, by_number.body) == ("echo", b"{}")
    by_text = ws_json.parse_request('{"cmd": "0x1003", "seq": 3, "body": 5}', table, "im", VIEW)
    assert by_text.command.name == "echo"


def test_integers_outside_64_bits_reach_the_upstream_exactly(table) -> None:
    # orjson would read them as floats; the message goes to the json module.
    parsed = ws_json.parse_request(
        '{"cmd": "echo", "seq": 1, "body": [18446744073709551617, "é"]}',
        table,
        "im",
        VIEW,
    )
    assert json.loads(parsed.body) == [2**64 + 1, "é"]


def test_a_number_names_the_command_of_the_sessions_upstream(table) -> None:
    # 0x1003 is echo on im and echo_other on other: words are unique per upstream.
    on_im = ws_json.parse_request('{"cmd": 4099, "seq": 1}', table, "im", VIEW)
    on_other = ws_json.parse_request('{"cmd": "0x1003", "seq": 1}', table, "other", VIEW)
    assert (on_im.command.name, on_other.command.name) == ("echo", "echo_other")
    with pytest.raises(ws_json.MessageRejected, match="served by upstream 'other'"):
        ws_json.parse_request('{"cmd": "echo_other", "seq": 1}', table, "im", VIEW)


def test_fields_are_filled_from_the_opening_request(table) -> None:
    parsed = ws_json.parse_request(
        '{"cmd": "send_message", "seq": 1, "body": {"to_uid": 2, "client_ip": "forged"}}',
        table,
        "im",
        VIEW,
    )
    # SendMessageRequest{to_uid: 2, client_ip: "10.1.2.3"}, as protobuf encodes it.
    assert parsed.body == b"\x08\x02\x1a\x0810.1.2.3"


@pytest.mark.parametrize(
    ("text", "seq", "expected"),
    [
        ("{", None, "not valid JSON"),
        ("[" * 100_000, None, "nested too deeply"),
        ("42", None, "JSON object"),
        ('{"cmd": "echo", "seq": true}', None, '"seq" must be an integer'),
        ('{"cmd": "echo", "seq": 1.5}', None, '"seq" must be an integer'),
        ('{"cmd": "echo", "seq": "a"}', "a", '"seq" must be an integer'),
        ('{"cmd": true, "seq": 1}', 1, '"cmd" must be a command name or number'),
        ('{"cmd": "elsewhere", "seq": 1}', 1, "served by upstream 'other'"),
        ('{"cmd": "new_message", "seq": 1}', 1, "push command"),
        ('{"cmd": "send_message", "seq": 1, "body": {"to_uid": -1}}', 1, "to_uid"),
        ('{"cmd": "send_message", "seq": 1, "body": []}', 1, "object"),
        # Not JSON, as over REST, whatever the command.
        ('{"cmd": "echo", "seq": 1, "body": [NaN]}', None, "NaN is not valid JSON"),
        ('{"cmd": "send_message", "seq": 1, "body": {"to_uid": -Infinity}}', None, "Infinity"),
        # Bodies nested deeper than the json module writes, with and without
        # `fields` (whose body is written out again).
        ('{"cmd": "echo", "seq": 1, "body": ' + "[" * 1000 + "]" * 1000 + "}", 1, "too deeply"),
        (
            '{"cmd": "send_message", "seq": 1, "body": {"x": ' + "[" * 1000 + "]" * 1000 + "}}",
            1,
            "too deeply",
        ),
    ],
)
def test_rejections_carry_the_seq_and_a_bad_request(table, text, seq, expected) -> None:
    with pytest.raises(ws_json.MessageRejected) as info:
        ws_json.parse_request(text, table, "im", VIEW)
    assert info.value.seq == seq
    assert info.value.error.code == "bad_request"
    assert expected in info.value.error.message


def test_renders_responses_pushes_and_errors(table) -> None:
    echo = table.commands_by_name["echo"]
    push = table.commands_by_name["new_message"]
    assert json.loads(ws_json.render_response(echo, 7, 0, {"a": "é"})) == {
        "cmd": "echo",
        "seq": 7,
        "status": 0,
        "body": {"a": "é"},
    }
    assert json.loads(ws_json.render_push(push, {"text": "hi"})) == {
        "cmd": "new_message",
        "push": True,
        "body": {"text": "hi"},
    }
    assert json.loads(ws_json.render_error(UpstreamTimeout("too slow"), 9)) == {
        "seq": 9,
        "error": {"code": "upstream_timeout", "message": "too slow"},
    }


def test_the_module_is_pure() -> None:
    code = "import sys, tlvproxy.server.ws_json; assert 'trio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

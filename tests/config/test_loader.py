"""Loading commands.yaml (SPEC 3): the tests' demo table, every kind of mistake with its
location, reloads with changed .proto files, and the `tlvproxy check` listing."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures import FIXTURE_TABLE
from tlvproxy.config.keys import KeyExpr
from tlvproxy.config.listing import route_lines
from tlvproxy.config.loader import TableError, load_table, parse_table
from tlvproxy.config.model import Address, JsonOptions
from tlvproxy.errors import BadRequest
from tlvproxy.schema.codec import JsonCodec, ProtobufCodec, RawCodec

REPO = Path(__file__).resolve().parents[2]
DEMO_TABLE = FIXTURE_TABLE  # the tests' copy of the demo table, not the shipped one
DEMO_PROTO = REPO / "proto" / "demo" / "im.proto"

MINIMAL = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {nodes: [127.0.0.1:7001]}
commands:
  - name: get_profile
    command: 0x1002
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v1/users/{user_id}/profile"}
"""


@pytest.fixture
def workdir(tmp_path):
    """A directory holding proto/demo/im.proto, for tables written in tests."""
    (tmp_path / "proto" / "demo").mkdir(parents=True)
    shutil.copy(DEMO_PROTO, tmp_path / "proto" / "demo" / "im.proto")
    return tmp_path


def load(workdir, text, name="commands.yaml"):
    path = workdir / name
    path.write_text(textwrap.dedent(text))
    return load_table(path)


def problems(workdir, text):
    with pytest.raises(TableError) as caught:
        load(workdir, text)
    return caught.value.problems


def one_problem(workdir, text):
    found = problems(workdir, text)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------- the demo table


def test_demo_table_loads_with_everything_compiled():
    table = load_table(DEMO_TABLE)
    assert table.source == DEMO_TABLE
    assert re.fullmatch(r"[0-9a-f]{16}", table.version)
    assert table.listen.http == Address("127.0.0.1", 8080)
    assert table.listen.admin == Address("127.0.0.1", 9180)
    assert table.demo is True
    assert table.shutdown_timeout == 30.0
    assert table.proto.files == ("demo/im.proto",)
    assert table.proto.paths == (DEMO_TABLE.parent / "../../proto",)
    assert table.proto.paths[0].resolve() == REPO / "proto"

    im = table.upstreams["im"]
    assert [str(n.address) for n in im.nodes] == ["127.0.0.1:7001"]
    assert im.heartbeat is not None
    assert (im.heartbeat.command, im.heartbeat.interval) == (0x0001, 5.0)
    assert (im.timeout, im.connect_timeout, im.retries) == (3.0, 1.0, 1)

    names = [c.name for c in table.commands]
    assert names == ["send_message", "get_profile", "echo", "list_messages", "new_message"]
    send = table.commands_by_name["send_message"]
    assert send.command == 0x1001
    assert send.uid == KeyExpr("header", "x-user-id")
    assert send.fields == {"client_ip": KeyExpr("remote_addr")}
    assert send.timeout == 2.0
    assert table.command_at("im", 0x2001).push == "demo.im.MessagePush"
    assert table.find_command("0x1003") is table.commands_by_name["echo"]

    assert set(table.codecs) == set(names)
    assert isinstance(table.codecs["send_message"], ProtobufCodec)
    assert isinstance(table.codecs["echo"], JsonCodec)
    push = table.codecs["new_message"]
    assert push.decode_response(push.encode_response({"msg_id": "5", "text": "hi"}))["text"] == "hi"

    assert table.router is not None
    match = table.router.match("GET", "/v1/users/42/profile")
    assert match.route.command.name == "get_profile"
    assert match.params == {"user_id": "42"}

    assert table.json == JsonOptions()
    assert table.status_map == {1: 400, 2: 404, 3: 409}
    assert table.websocket is not None
    assert table.websocket.path == "/ws"
    assert table.websocket.hash_on == KeyExpr("query", "did")
    assert table.websocket.max_message == 64 * 1024
    assert table.limits.max_request_body == 1024 * 1024
    (rule,) = table.rate_limits
    assert (rule.commands, rule.rate, rule.burst) == (("send_message",), 10.0, 20)
    assert [w.name for w in table.waf] == ["php_injection", "sql_injection", "path_traversal"]
    php, sql, traversal = (w.pattern for w in table.waf)
    assert php.search("a=eval ($_POST[x])")
    assert sql.search("1 UNION ALL SELECT password")
    assert traversal.search("/../../etc/passwd")
    assert not any(p.search("hello world") for p in (php, sql, traversal))


def test_demo_request_is_built_from_body_query_path_and_fields():
    table = load_table(DEMO_TABLE)
    codec = table.codecs["send_message"]
    body = codec.encode_request(
        b'{"to_uid": 42, "text": "hi"}', [{"text": "query wins"}, {}, {"client_ip": "10.0.0.1"}]
    )
    assert codec.decode_request(body) == {
        "to_uid": 42,
        "text": "query wins",
        "client_ip": "10.0.0.1",
        "from_uid": 0,
    }
    with pytest.raises(BadRequest, match="field 'to_uid': expected an integer"):
        codec.encode_request(b'{"to_uid": "x"}', [])


def test_the_same_table_gives_the_same_version(workdir):
    assert load(workdir, MINIMAL).version == load(workdir, MINIMAL).version


def test_reload_with_a_changed_proto_builds_a_new_independent_table(workdir):
    old = load(workdir, MINIMAL)
    proto = workdir / "proto" / "demo" / "im.proto"
    proto.write_text(
        proto.read_text().replace(
            "  repeated string tags = 6;\n", "  repeated string tags = 6;\n  string bio = 7;\n"
        )
    )
    new = load(workdir, MINIMAL)
    assert new.version != old.version
    assert new.schema is not None
    assert old.schema is not None
    assert new.schema.pool is not old.schema.pool
    old_codec, new_codec = old.codecs["get_profile"], new.codecs["get_profile"]
    assert new_codec.decode_response(new_codec.encode_response({"bio": "x"}))["bio"] == "x"
    with pytest.raises(BadRequest, match=r"field 'bio': unknown field of demo\.im\.Profile"):
        old_codec.encode_response({"bio": "x"})
    # The old table still works after the new one was built.
    assert (
        old_codec.decode_response(old_codec.encode_response({"nickname": "a"}))["nickname"] == "a"
    )


def test_commands_share_converters_only_under_the_same_json_options(workdir):
    table = load(
        workdir,
        MINIMAL
        + """\
  - name: profile_again
    command: 0x1003
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v2/users/{user_id}/profile"}
  - name: profile_camel
    command: 0x1005
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v3/users/{user_id}/profile"}
    json: {field_names: camel, emit_defaults: false}
""",
    )
    codecs = table.codecs
    body = codecs["get_profile"].encode_response({"user_id": 7, "created_at": 5})
    every_field = {
        "user_id": 7,
        "nickname": "",
        "gender": "GENDER_UNSPECIFIED",
        "status": "STATUS_OFFLINE",
        "created_at": "5",
        "tags": [],
    }
    assert codecs["get_profile"].decode_response(body) == every_field
    assert codecs["profile_again"].decode_response(body) == every_field
    assert codecs["profile_camel"].decode_response(body) == {"userId": 7, "createdAt": "5"}
    # The same options: one writer, compiled once for the table.
    assert codecs["get_profile"]._response.write is codecs["profile_again"]._response.write
    assert codecs["get_profile"]._response.write is not codecs["profile_camel"]._response.write


def test_defaults_when_sections_are_absent(workdir):
    table = load(workdir, "proto: {paths: [proto], files: [demo/im.proto]}\n")
    assert table.commands == ()
    assert table.upstreams == {}
    assert table.websocket is None
    assert table.listen.http == Address("0.0.0.0", 8080)
    assert table.framing.has("status")
    assert table.router is not None
    assert table.router.routes == ()


def test_proto_paths_default_to_the_table_directory(workdir):
    (workdir / "proto" / "demo" / "commands.yaml").write_text(
        "proto: {files: [im.proto]}\n"
        "upstreams: {im: {nodes: [127.0.0.1:1]}}\n"
        "commands: [{name: n, command: 1, upstream: im, request: demo.im.Heartbeat,"
        " response: demo.im.Heartbeat}]\n"
    )
    table = load_table(workdir / "proto" / "demo" / "commands.yaml")
    assert table.proto.paths == (workdir / "proto" / "demo",)
    assert table.schema is not None
    assert table.schema.has_message("demo.im.Heartbeat")


def test_parse_table_resolves_paths_from_the_source_directory(workdir):
    table = parse_table(MINIMAL, workdir / "any-name.yaml")
    assert table.proto.paths == (workdir / "proto",)


def test_every_supported_form_of_values(workdir):
    table = load(
        workdir,
        """\
        listen: {http: "[::1]:0", admin: null}
        admin_token: s3cret
        workers: 4
        http_parser: h11
        trusted_proxies: [10.0.0.0/8, "2001:db8::/32", 192.168.1.7]
        shutdown_timeout: 500ms
        envelope: true
        proto: {paths: [proto], files: [demo/im.proto]}
        framing:
          header:
            - {name: magic, type: u16, value: 0xCAFE}
            - {name: command, type: u32}
            - {name: seq, type: u64}
            - {name: length, type: u32}
          byte_order: little
          length_counts: frame
          max_body: 64 KiB
        upstreams:
          im:
            nodes: [127.0.0.1:7001, {address: "[::1]:7002", weight: 3}, "db.internal:7003"]
            balance: consistent_hash
            hash_on: cookie.sid
            connections: 4
            connect_timeout: 250ms
            timeout: 2m
            retries: 0
            heartbeat: {command: 65536, interval: 1.5}
            health: {unhealthy_after: 5, healthy_after: 1}
            max_in_flight: 64
        json: {field_names: camel, enums: number, emit_defaults: false}
        commands:
          - name: get_profile
            command: "0x10002"
            upstream: im
            request: demo.im.GetProfileRequest
            response: demo.im.Profile
            http: {method: get, path: "/v1/users/{user_id}"}
            json: {emit_defaults: true}
          - name: blob
            command: 4097
            upstream: im
            codec: raw
            http: {method: PUT, path: /v1/blob}
          - name: raw_push
            command: 0x2002
            codec: raw
            push: true
        status_map: {7: 503}
        limits: {max_header_bytes: 8 KiB, max_request_body: 2048, header_timeout: 5s,
                 keepalive_timeout: 0}
        websocket: {upstream: im, mode: binary}
        rate_limits:
          - {name: all, key: remote_addr, rate: 600/m}
        waf:
          - {name: log_only, pattern: 'x', action: log, in: [body]}
        """,
    )
    assert table.listen.http == Address("::1", 0)
    assert str(table.listen.http) == "[::1]:0"
    assert table.listen.admin is None
    assert table.admin_token == "s3cret"
    assert (table.workers, table.http_parser, table.envelope) == (4, "h11", True)
    assert table.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert table.shutdown_timeout == 0.5
    layout = table.framing
    assert layout.byte_order == "little"
    assert layout.length_counts == "frame"
    assert layout.max_body == 64 * 1024
    assert layout.header_size == 2 + 4 + 8 + 4
    assert not layout.has("status")
    im = table.upstreams["im"]
    assert [(str(n.address), n.weight) for n in im.nodes] == [
        ("127.0.0.1:7001", 1),
        ("[::1]:7002", 3),
        ("db.internal:7003", 1),
    ]
    assert im.balance == "consistent_hash"
    assert im.hash_on == KeyExpr("cookie", "sid")
    assert (im.connections, im.connect_timeout, im.timeout, im.retries) == (4, 0.25, 120.0, 0)
    assert im.heartbeat is not None
    assert (im.heartbeat.command, im.heartbeat.interval) == (65536, 1.5)
    assert (im.health.unhealthy_after, im.health.healthy_after) == (5, 1)
    assert im.max_in_flight == 64
    profile = table.commands_by_name["get_profile"]
    assert profile.command == 0x10002
    assert profile.http is not None
    assert profile.http.method == "GET"
    assert profile.json == JsonOptions(field_names="camel", enums="number", emit_defaults=True)
    assert table.json == JsonOptions(field_names="camel", enums="number", emit_defaults=False)
    codec = table.codecs["get_profile"]
    assert codec.decode_response(codec.encode_response({"user_id": 1}))["createdAt"] == "0"
    assert isinstance(table.codecs["blob"], RawCodec)
    assert table.commands_by_name["raw_push"].push == ""
    assert table.status_map == {7: 503}
    assert table.limits.max_header_bytes == 8192
    assert table.limits.keepalive_timeout == 0.0
    assert table.websocket is not None
    assert table.websocket.mode == "binary"
    assert table.rate_limits[0].commands is None
    assert table.rate_limits[0].rate == 10.0
    assert table.waf[0].locations == frozenset({"body"})
    assert table.waf[0].action == "log"


def test_yaml_merge_keys_are_followed(workdir):
    table = load(
        workdir,
        """\
        proto: {paths: [proto], files: [demo/im.proto]}
        upstreams:
          im: &im {nodes: [127.0.0.1:7001], timeout: 9s}
          im2:
            <<: *im
            retries: 3
        """,
    )
    assert table.upstreams["im2"].timeout == 9.0
    assert table.upstreams["im2"].retries == 3


# ---------------------------------------------------------------- one broken table

BROKEN = """\
listen:
  http: 0.0.0.0:99999
  admin: localhost
workers: 0
colour: blue
shutdown_timeout: soon
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im:
    nodes: [127.0.0.1:7001]
    balance: consistent_hash
    timeout: 3s
    timeout: 4s
  empty: {nodes: []}
commands:
  - name: send_message
    command: 0x1001
    upstream: imm
    request: demo.im.SendMessageReq
    response: demo.im.SendMessageResponse
    http: {method: POST, path: /v1/messages}
    fields: {client_ip: remote_adr}
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v1/users/{user_id}"}
  - name: get2
    command: "0x1001"
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v1/users/{id}"}
  - name: echo
    command: 0x10003
    upstream: im
    codec: jsn
    http: {method: FETCH, path: v1/echo}
  - name: pushy
    command: 0x2001
    push: demo.im.MessagePush
    http: {method: GET, path: /push}
  - name: no_types
    command: 0x1006
    upstream: im
json: {field_names: snake}
status_map: {0: 200, 1: 999}
websocket:
  path: /ws
  upstream: nowhere
  mode: text
limits: {max_request_body: lots}
rate_limits:
  - name: r
    commands: [nope]
    key: body.x
    rate: 10/fortnight
waf:
  - {name: bad_regex, pattern: '(unclosed'}
  - {name: redos, pattern: '(a+)+$'}
"""

# (line, path, a fragment of the message): every mistake above, in file order.
EXPECTED = [
    (2, "listen.http", "port 99999 is not between 0 and 65535"),
    (3, "listen.admin", "expected HOST:PORT, got 'localhost'"),
    (4, "workers", "expected a number between 1 and 1024, got 0"),
    (5, "colour", "unknown key (expected one of: listen, tls, admin_token,"),
    (6, "shutdown_timeout", "expected a duration like 500ms, 3s or 2m, got 'soon'"),
    (10, "upstreams.im.hash_on", "required when balance is consistent_hash"),
    (13, "upstreams.im.timeout", "duplicate key"),
    (14, "upstreams.empty.nodes", "an upstream needs at least one node"),
    (
        18,
        "commands[0].upstream",
        "undefined upstream 'imm' (defined: im, empty); did you mean 'im'?",
    ),
    (
        19,
        "commands[0].request",
        "undefined message 'demo.im.SendMessageReq' (not in proto.files);"
        " did you mean 'demo.im.SendMessageRequest'?",
    ),
    (22, "commands[0].fields.client_ip", "invalid key expression 'remote_adr'"),
    (23, "commands[1].name", "duplicate command name 'send_message' (first at commands[0])"),
    (
        30,
        "commands[2].command",
        "duplicate command word 0x1001 on upstream 'im' (first at commands[1], 'send_message')"
        ": a command word is unique per upstream",
    ),
    (
        34,
        "commands[2].http.path",
        "path parameter 'id' is not a field of demo.im.GetProfileRequest",
    ),
    (
        34,
        "commands[2].http.path",
        "GET /v1/users/{id} (get2) duplicates GET /v1/users/{user_id} (send_message)",
    ),
    (36, "commands[3].command", "expected a number between 0 and 65535, got 65539"),
    (38, "commands[3].codec", "expected one of protobuf, json, raw; got 'jsn'"),
    (
        39,
        "commands[3].http.method",
        "expected an HTTP method (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS), got 'FETCH'",
    ),
    (39, "commands[3].http.path", "path 'v1/echo' must start with '/'"),
    (43, "commands[4].http", "a push command cannot have http"),
    (44, "commands[5].request", "required for a protobuf command"),
    (44, "commands[5].response", "required for a protobuf command"),
    (47, "json.field_names", "expected one of proto, camel; got 'snake'"),
    (48, "status_map", "status 0 means success; it cannot be mapped"),
    (48, "status_map[1]", "expected a number between 100 and 599, got 999"),
    (51, "websocket.upstream", "undefined upstream 'nowhere' (defined: im, empty)"),
    (52, "websocket.mode", "expected one of json, binary; got 'text'"),
    (53, "limits.max_request_body", "expected a size like 65536, 64 KiB or 1 MiB, got 'lots'"),
    (56, "rate_limits[0].commands[0]", "unknown command 'nope'"),
    (57, "rate_limits[0].key", "invalid key expression 'body.x'"),
    (58, "rate_limits[0].rate", "unknown rate unit 'fortnight'"),
    (
        60,
        "waf[0].pattern",
        "invalid regular expression: missing ), unterminated subpattern at position 0",
    ),
    (61, "waf[1].pattern", "the pattern can backtrack catastrophically: "),
]


def test_a_broken_table_reports_every_mistake_with_its_location(workdir):
    found = problems(workdir, BROKEN)
    table = str(workdir / "commands.yaml")
    parsed = []
    for problem in found:
        match = re.fullmatch(r"(.+):(\d+):(\d+): ([^:]+): (.+)", problem)
        assert match is not None, problem
        assert match.group(1) == table
        parsed.append((int(match.group(2)), match.group(4), match.group(5)))
    assert len(parsed) == len(EXPECTED), "\n".join(found)
    for (line, path, message), (want_line, want_path, fragment) in zip(
        parsed, EXPECTED, strict=True
    ):
        assert (line, path) == (want_line, want_path), (line, path, message)
        assert fragment in message, message


def test_fields_must_name_request_fields(workdir):
    problem = one_problem(
        workdir,
        MINIMAL + "    fields: {user: header.X-User, user_id: query.n}\n",
    )
    assert problem.endswith(
        "commands[0].fields.user: field 'user' is not a field of demo.im.GetProfileRequest;"
        " did you mean 'user_id'?"
    )
    assert ":11:20: " in problem


# ---------------------------------------------------------------- one mistake at a time


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("listen: [1]\n", "1:9", "listen: expected a mapping, got a list"),
        ("listen: {http: '::1:80'}\n", "1:16", "listen.http: write an IPv6 address as [HOST]:PORT"),
        ("listen: {http: '[zz]:80'}\n", "1:16", "listen.http: 'zz' is not an IPv6 address"),
        ("trusted_proxies: [10.0.0.0/33]\n", "1:19", "trusted_proxies[0]: expected a CIDR"),
        ("http_parser: fast\n", "1:14", "http_parser: expected one of auto, h11, httptools;"),
        ("admin_token: ''\n", "1:14", "admin_token: expected a non-empty string, got ''"),
        ("envelope: 'yes'\n", "1:11", "envelope: expected true or false, got 'yes'"),
        ("demo: 1\n", "1:7", "demo: expected true or false, got 1"),
        ("proto: {paths: [nowhere]}\n", "1:17", "proto.paths[0]: no such directory: "),
        (
            "proto: {files: [missing.proto]}\n",
            "1:17",
            "proto.files[0]: missing.proto is not in the import paths",
        ),
        (
            "proto: {files: demo/im.proto}\n",
            "1:16",
            "proto.files: expected a list, got 'demo/im.proto'",
        ),
        (
            "framing: {header: [{name: command, type: u16}, {name: length, type: u32}]}\n",
            "1:19",
            "framing.header: the header needs a 'seq' field",
        ),
        (
            "framing: {header: [{name: command}]}\n",
            "1:20",
            "framing.header[0].type: required key is missing",
        ),
        (
            "framing: {byte_order: middle}\n",
            "1:23",
            "framing.byte_order: expected one of big, little; got 'middle'",
        ),
        (
            "upstreams: {im: {nodes: [127.0.0.1:7001, 127.0.0.1:7001]}}\n",
            "1:42",
            "upstreams.im.nodes[1]: node 127.0.0.1:7001 is listed twice",
        ),
        (
            "upstreams: {im: {nodes: ['127.0.0.1:0']}}\n",
            "1:26",
            "upstreams.im.nodes[0]: port 0 is not between 1 and 65535",
        ),
        (
            "upstreams: {im: {nodes: [{address: 127.0.0.1:1, weight: 0}]}}\n",
            "1:57",
            "upstreams.im.nodes[0].weight: expected a number between 1 and 1000, got 0",
        ),
        (
            "upstreams: {im: {nodes: [127.0.0.1:1], heartbeat: {command: 1}}}\n",
            "1:51",
            "upstreams.im.heartbeat.interval: required key is missing",
        ),
        (
            "upstreams: {im: {nodes: [127.0.0.1:1],"
            " heartbeat: {command: 0x10000, interval: 1s}}}\n",
            "1:61",
            "upstreams.im.heartbeat.command: expected a number between 0 and 65535",
        ),
        (
            "upstreams: {im: {nodes: [127.0.0.1:1], timeout: 0s}}\n",
            "1:49",
            "upstreams.im.timeout: expected a duration above zero, got '0s'",
        ),
        (
            "upstreams: {'i m': {nodes: [127.0.0.1:1]}}\n",
            "1:20",
            "upstreams.i m: an upstream name uses letters, digits, _ . -",
        ),
        (
            "upstreams: {im: {nodes: [127.0.0.1:1], hash: query.x}}\n",
            "1:40",
            "upstreams.im.hash: unknown key (expected one of: nodes, balance, hash_on,",
        ),
        (
            "websocket: {upstream: im, path: '/ws/{x}'}\n",
            "1:33",
            "websocket.path: the websocket path cannot have parameters",
        ),
        (
            "rate_limits: [{name: r, key: remote_addr, rate: 1/s, burst: -1}]\n",
            "1:61",
            "rate_limits[0].burst: expected a number at least 0, got -1",
        ),
        (
            "rate_limits: [{name: r, key: remote_addr, rate: 1/s, commands: []}]\n",
            "1:64",
            "rate_limits[0].commands: name at least one command, or omit it for all",
        ),
        (
            "rate_limits: [{name: r, key: remote_addr}]\n",
            "1:15",
            "rate_limits[0].rate: required key is missing",
        ),
        (
            "waf: [{name: w, pattern: x, in: [cookies]}]\n",
            "1:34",
            "waf[0].in[0]: expected one of path, query, body, headers; got 'cookies'",
        ),
        (
            "waf: [{name: w, pattern: x, in: []}]\n",
            "1:33",
            "waf[0].in: name at least one of path, query, body, headers",
        ),
        (
            "waf: [{name: w, pattern: x}, {name: w, pattern: y}]\n",
            "1:37",
            "waf[1].name: duplicate rule name 'w'",
        ),
        ("commands: {name: x}\n", "1:11", "commands: expected a list, got a mapping"),
        (
            "commands: [{name: 1x, command: 1}]\n",
            "1:19",
            "commands[0].name: a command name starts with a letter",
        ),
        (
            "commands: [{name: x, command: true, upstream: im}]\n",
            "1:31",
            "commands[0].command: expected a whole number, got true",
        ),
        (
            "commands: [{name: x, command: '0xZZ'}]\n",
            "1:31",
            "commands[0].command: expected a whole number, got '0xZZ'",
        ),
        ("commands: [{command: 1}]\n", "1:12", "commands[0].name: required key is missing"),
        (
            "upstreams: {im: {nodes: [127.0.0.1:1]}}\n"
            "readiness: {require_healthy_upstreams: [imm]}\n",
            "2:41",
            "readiness.require_healthy_upstreams[0]: undefined upstream 'imm' (defined: im);"
            " did you mean 'im'?",
        ),
    ],
)
def test_each_mistake_is_located(workdir, text, where, message):
    offset = 0
    if not text.startswith("proto:"):
        text = "proto: {paths: [proto], files: [demo/im.proto]}\n" + text
        offset = 1
    found = problems(workdir, text)
    line, column = where.split(":")
    prefix = f"{workdir / 'commands.yaml'}:{int(line) + offset}:{column}: "
    assert any(p.startswith(prefix) and message in p for p in found), found


COMMAND_BASE = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams: {im: {nodes: [127.0.0.1:7001]}}
commands:
"""


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            "{name: e, command: 1, upstream: im, codec: json, fields: {a: remote_addr}}",
            "commands[0].fields: a json command passes its body through; it has no fields",
        ),
        (
            "{name: e, command: 1, upstream: im, codec: raw, request: demo.im.Heartbeat}",
            "commands[0].request: only a protobuf command has request",
        ),
        (
            "{name: p, command: 1, codec: json, push: demo.im.MessagePush}",
            "commands[0].push: a json push command is written `push: true`",
        ),
        (
            "{name: p, command: 1, push: true}",
            "commands[0].push: expected a non-empty string, got true",
        ),
        (
            "{name: c, command: 1, request: demo.im.Heartbeat, response: demo.im.Heartbeat}",
            "commands[0].upstream: required (a push command has push)",
        ),
        (
            "{name: c, command: 1, upstream: im, request: demo.im.SendMessageRequest,"
            " response: demo.im.Heartbeat, http: {method: POST, path: '/v1/{text}/{to}'}}",
            "commands[0].http.path: path parameter 'to' is not a field of"
            " demo.im.SendMessageRequest",
        ),
        (
            "{name: c, command: 1, upstream: im, request: demo.im.ListMessagesResponse,"
            " response: demo.im.Heartbeat, fields: {messages: remote_addr}}",
            "commands[0].fields.messages: field 'messages' is a message field; it cannot take"
            " a string",
        ),
        (
            "{name: c, command: 1, upstream: im, request: 'demo..X', response: demo.im.Heartbeat}",
            "commands[0].request: expected a full message name like demo.im.Profile, got 'demo..X'",
        ),
        (
            "{name: c, command: 1, upstream: im, request: demo.im.Heartbeat,"
            " response: demo.im.Heartbeat, json: {enums: loud}}",
            "commands[0].json.enums: expected one of name, number; got 'loud'",
        ),
        (
            "{name: c, command: 1, upstream: im, request: demo.im.Heartbeat,"
            " response: demo.im.Heartbeat, http: {method: GET, path: /v1/x, verb: GET}}",
            "commands[0].http.verb: unknown key (expected one of: method, path)",
        ),
        (
            "{name: c, command: 1, upstream: im, request: demo.im.Heartbeat,"
            " response: demo.im.Heartbeat, uid: user}",
            "commands[0].uid: invalid key expression 'user'",
        ),
        (
            "{name: c, command: 1, upstream: im, request: demo.im.Heartbeat,"
            " response: demo.im.Heartbeat, idempotent: maybe}",
            "commands[0].idempotent: expected true or false, got 'maybe'",
        ),
    ],
)
def test_command_mistakes(workdir, command, message):
    found = problems(workdir, COMMAND_BASE + f"  - {command}\n")
    assert len(found) == 1, found
    assert found[0].split(": ", 1)[1].startswith(message), found


def test_ambiguous_routes_and_websocket_clash(workdir):
    found = problems(
        workdir,
        COMMAND_BASE
        + """\
  - {name: a, command: 1, upstream: im, codec: raw, http: {method: GET, path: "/a/{x}/c"}}
  - {name: b, command: 2, upstream: im, codec: raw, http: {method: GET, path: "/a/b/{y}"}}
  - {name: w, command: 3, upstream: im, codec: raw, http: {method: GET, path: /ws}}
websocket: {path: /ws, upstream: im}
""",
    )
    assert [p.split(": ", 1)[1] for p in found] == [
        "commands[1].http.path: GET /a/b/{y} (b) and GET /a/{x}/c (a) are ambiguous: both"
        " match some paths and neither is more specific",
        "websocket.path: /ws is also the GET route of command 'w'",
    ]
    assert found[0].startswith(f"{workdir / 'commands.yaml'}:5:")
    assert found[1].startswith(f"{workdir / 'commands.yaml'}:7:19: ")


def test_invalid_template_is_located(workdir):
    line = "  - {name: a, command: 1, upstream: im, codec: raw, http: {method: GET, path: 'x/{y}'}}"
    problem = one_problem(workdir, COMMAND_BASE + line + "\n")
    column = line.index("'x/{y}'") + 1
    assert problem == (
        f"{workdir / 'commands.yaml'}:4:{column}: commands[0].http.path: path 'x/{{y}}' must"
        " start with '/'"
    )


def test_protoc_errors_name_the_proto_file_and_line(workdir):
    (workdir / "proto" / "broken.proto").write_text(
        'syntax = "proto3";\npackage b;\n\nmessage B {\n  Nope n = 1;\n}\n'
    )
    found = problems(
        workdir,
        """\
        proto: {paths: [proto], files: [broken.proto]}
        workers: zero
        """,
    )
    assert found == [
        f"{workdir / 'commands.yaml'}:2:10: workers: expected a whole number, got 'zero'",
        f'{workdir / "proto" / "broken.proto"}:5:3: "Nope" is not defined.',
    ]


def test_invalid_yaml_is_located(workdir):
    problem = one_problem(workdir, "listen:\n  http: [unclosed\nworkers: 1\n")
    assert problem.startswith(f"{workdir / 'commands.yaml'}:3:")
    assert "invalid YAML" in problem


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the table is empty"),
        ("# only a comment\n", "the table is empty"),
        ("- a\n- b\n", "1:1: (table): expected a mapping, got a list"),
        ("a: 1\n---\nb: 2\n", "invalid YAML"),
        ("? [a]\n: 1\n", "(table): a key must be a string"),
    ],
)
def test_tables_that_are_not_a_mapping(workdir, text, message):
    assert message in one_problem(workdir, text)


def test_unreadable_tables(tmp_path):
    with pytest.raises(TableError) as caught:
        load_table(tmp_path / "absent.yaml")
    assert caught.value.problems == [
        f"{tmp_path / 'absent.yaml'}: cannot read the table: No such file or directory"
    ]
    (tmp_path / "latin1.yaml").write_bytes(b"workers: \xe9\n")
    with pytest.raises(TableError, match="not UTF-8"):
        load_table(tmp_path / "latin1.yaml")


# ---------------------------------------------------------------- the check listing


def test_route_lines_of_the_demo():
    lines = route_lines(load_table(DEMO_TABLE))
    assert lines[0].split() == ["NAME", "COMMAND", "METHOD", "PATH", "UPSTREAM", "TYPES"]
    rows = {line.split()[0]: line.split() for line in lines[1:6]}
    assert rows["send_message"] == [
        "send_message",
        "0x1001",
        "POST",
        "/v1/messages",
        "im",
        "demo.im.SendMessageRequest",
        "->",
        "demo.im.SendMessageResponse",
    ]
    assert rows["get_profile"][:5] == [
        "get_profile",
        "0x1002",
        "GET",
        "/v1/users/{user_id}/profile",
        "im",
    ]
    assert rows["echo"][2:] == ["POST", "/v1/echo", "im", "json", "->", "json"]
    assert rows["new_message"][1:] == ["0x2001", "PUSH", "-", "-", "->", "demo.im.MessagePush"]
    assert lines[6] == "websocket: /ws -> upstream im (json mode, hash_on query.did, uid query.uid)"
    # Columns line up: every TYPES cell starts under the TYPES heading.
    column = lines[0].index("TYPES")
    for line in lines[1:6]:
        assert line[column - 2 : column] == "  "
        assert line[column] != " "


def test_loading_stays_pure():
    code = (
        "import sys; from pathlib import Path; from tlvproxy.config.loader import load_table; "
        f"load_table(Path({str(DEMO_TABLE)!r})); assert 'trio' not in sys.modules, 'trio'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

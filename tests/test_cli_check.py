"""`tlvproxy check` (SPEC 2): the routes of a good table, every error of a bad one."""

from __future__ import annotations

import shutil

from tests.cli import REPO, run_cli
from tests.fixtures import FIXTURE_TABLE


def check(*args, cwd=REPO):
    return run_cli("check", *args, cwd=cwd)


def test_the_shipped_demo_table_passes():
    # The one test that reads the shipped commands.yaml (the others read
    # tests/fixtures/table.yaml): whatever the demo becomes, it must load.
    keys = REPO / "build" / "demo-keys" / "jwks.json"
    assert keys.is_file(), f"{keys} is missing: `make demo-keys` (or `make test`) makes it"
    result = check("-c", "commands.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:7]}
    assert rows["login"][2:4] == ["POST", "/v1/login"]
    assert rows["send_message"][2:4] == ["POST", "/v1/messages"]
    assert rows["list_messages"][2:4] == ["GET", "/v1/me/messages"]
    assert "uid auth.sub" in result.stdout


def test_demo_table_passes_and_prints_its_routes():
    result = check("-c", str(FIXTURE_TABLE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "COMMAND", "METHOD", "PATH", "UPSTREAM", "TYPES"]
    assert lines[1].split() == [
        "send_message",
        "0x1001",
        "POST",
        "/v1/messages",
        "im",
        "demo.im.SendMessageRequest",
        "->",
        "demo.im.SendMessageResponse",
    ]
    assert "/v1/users/{user_id}/profile" in lines[2]
    assert lines[3].split() == ["echo", "0x1003", "POST", "/v1/echo", "im", "json", "->", "json"]
    assert lines[5].split() == [
        "new_message",
        "0x2001",
        "PUSH",
        "-",
        "-",
        "->",
        "demo.im.MessagePush",
    ]
    assert lines[6] == "websocket: /ws -> upstream im (json mode, hash_on query.did, uid query.uid)"
    assert lines[7].startswith("5 commands, table version ")


def test_default_table_is_commands_yaml_in_the_working_directory(tmp_path):
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    text = FIXTURE_TABLE.read_text().replace("paths: [../../proto]", "paths: [proto]")
    (tmp_path / "commands.yaml").write_text(text)
    result = check(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "send_message" in result.stdout


BROKEN = """\
listen: {http: "localhost"}
workers: -1
unknown_section: {}
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {nodes: [127.0.0.1:7001], balance: consistent_hash}
commands:
  - {name: a, command: 1, upstream: nope, request: demo.im.Nope, response: demo.im.Profile}
  - {name: a, command: 1, upstream: im, codec: raw, http: {method: GET, path: /x}}
  - {name: b, command: 1, upstream: im, codec: raw, http: {method: GET, path: /x}}
rate_limits: [{name: r, key: remote_addr, rate: fast}]
waf: [{name: w, pattern: "[unclosed"}]
"""


def test_broken_table_fails_with_every_error_on_stderr(tmp_path):
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    (tmp_path / "bad.yaml").write_text(BROKEN)
    result = check("-c", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "bad.yaml:1:16: listen.http: expected HOST:PORT, got 'localhost'",
        "bad.yaml:2:10: workers: expected a number between 1 and 1024, got -1",
        "bad.yaml:3:1: unknown_section: unknown key (expected one of: listen, tls, admin_token,"
        " workers, http_parser, trusted_proxies, shutdown_timeout, readiness, cors, proto,"
        " framing,"
        " upstreams,"
        " commands, json, status_map, envelope, websocket, sessions, limits, rate_limits, redis,"
        " waf,"
        " auth, default_auth, demo, etcd)",
        "bad.yaml:6:7: upstreams.im.hash_on: required when balance is consistent_hash",
        "bad.yaml:8:37: commands[0].upstream: undefined upstream 'nope' (defined: im)",
        "bad.yaml:8:52: commands[0].request: undefined message 'demo.im.Nope' (not in"
        " proto.files); did you mean 'demo.im.Profile'?",
        "bad.yaml:9:12: commands[1].name: duplicate command name 'a' (first at commands[0])",
        "bad.yaml:10:24: commands[2].command: duplicate command word 0x0001 on upstream 'im'"
        " (first at commands[1], 'a'): a command word is unique per upstream (the answers of"
        " 'im' are told apart by it); another upstream may reuse it",
        "bad.yaml:10:79: commands[2].http.path: GET /x (b) duplicates GET /x (a)",
        "bad.yaml:11:49: rate_limits[0].rate: expected a rate like 10/s or 600/m, got 'fast'",
        "bad.yaml:12:26: waf[0].pattern: invalid regular expression: unterminated character"
        " set at position 0",
        "11 error(s) in bad.yaml",
    ]


def test_missing_table(tmp_path):
    result = check("-c", str(tmp_path / "none.yaml"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"{tmp_path / 'none.yaml'}: cannot read the table: No such file or directory"
    )


DISCOVERED = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {discovery: {etcd: /services/im}}
commands:
  - {name: a, command: 1, upstream: im, codec: raw, http: {method: GET, path: /x}}
"""


def test_a_discovery_upstream_without_an_etcd_section_is_a_warning(tmp_path):
    # Its nodes are read from the etcd of `serve --etcd`: a gateway serving
    # this file would find none (docs/configuration.md "etcd").
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    (tmp_path / "discovered.yaml").write_text(DISCOVERED)
    result = check("-c", "discovered.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: discovered.yaml:3:3: upstreams.im.discovery: the table has no etcd section:"
        " the nodes are read from the etcd of `serve --etcd`, and a gateway serving a file"
        " finds none"
    ]
    with_etcd = DISCOVERED + 'etcd: {endpoints: ["http://127.0.0.1:2379"]}\n'
    (tmp_path / "discovered.yaml").write_text(with_etcd)
    result = check("-c", "discovered.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")

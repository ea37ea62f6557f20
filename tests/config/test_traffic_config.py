"""A command's `split`, `mirror` and `fallback` in the table (SPEC 3, 4.6), and
command words unique per upstream: what loads, what `tlvproxy check` says,
and every mistake with its place."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from tests.cli import run_cli
from tlvproxy.config.keys import KeyExpr
from tlvproxy.config.listing import route_lines
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import LastGoodSpec, MirrorSpec, SplitRule, Table

REPO = Path(__file__).resolve().parents[2]

HEAD = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {nodes: [127.0.0.1:7001]}
  im_next: {nodes: [127.0.0.1:7002]}
commands:
"""
NEXT = """\
  - name: get_profile_next
    command: 0x1002
    upstream: im_next
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
"""

GOOD = (
    HEAD
    + """\
  - name: get_profile
    command: 0x1002
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v1/users/{user_id}/profile"}
    idempotent: true
    uid: header.X-User-Id
    split:
      - {key: header.X-User-Id, tail: [0, 1], to: get_profile_next}
      - {key: header.X-User-Id, values: ["007", 42, "+8"], to: get_profile_next}
      - {key: query.group, values: [beta, 10], to: get_profile_next}
      - {key: query.did, percent: 12.5, to: get_profile_next}
    mirror: {to: get_profile_next, percent: 5, compare: true, log_values: true}
    fallback:
      last_good: {key: path.user_id, ttl: 10m, max_entries: 500, max_bytes: 1 MiB}
      body: {nickname: "?", tags: [offline]}
"""
    + NEXT
    + """\
  - name: echo
    command: 0x1003
    upstream: im
    codec: json
    http: {method: POST, path: /v1/echo}
    fallback: {body: {down: true}}
    mirror: {to: echo_next}
  - {name: echo_next, command: 0x1003, upstream: im_next, codec: json}
  - {name: new_message, command: 0x2001, push: demo.im.MessagePush}
"""
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    return tmp_path


def load(workdir: Path, text: str) -> Table:
    path = workdir / "commands.yaml"
    path.write_text(textwrap.dedent(text))
    return load_table(path)


def problems(workdir: Path, text: str) -> list[tuple[int, str, str]]:
    """(line, path, message) of each problem, in file order."""
    with pytest.raises(TableError) as caught:
        load(workdir, text)
    found = []
    for problem in caught.value.problems:
        match = re.fullmatch(r".+?:(\d+):\d+: ([^:]+): (.+)", problem)
        assert match is not None, problem
        found.append((int(match.group(1)), match.group(2), match.group(3)))
    return found


def test_every_form_loads(workdir: Path) -> None:
    table = load(workdir, GOOD)
    profile = table.commands_by_name["get_profile"]
    assert profile.traffic is not None
    user = KeyExpr("header", "x-user-id")
    assert profile.traffic.split == (
        SplitRule(key=user, to="get_profile_next", tail=frozenset({0, 1})),
        # The uid's key reads as a number, so its values are numbers too.
        SplitRule(key=user, to="get_profile_next", values=frozenset({"7", "42", "8"})),
        SplitRule(
            key=KeyExpr("query", "group"), to="get_profile_next", values=frozenset({"beta", "10"})
        ),
        SplitRule(key=KeyExpr("query", "did"), to="get_profile_next", percent=1250),
    )
    assert profile.traffic.mirror == MirrorSpec(
        to="get_profile_next", percent=500, compare=True, log_values=True
    )
    fallback = profile.traffic.fallback
    assert fallback is not None
    assert fallback.last_good == LastGoodSpec(
        key=KeyExpr("path", "user_id"), ttl=600.0, max_entries=500, max_bytes=1024 * 1024
    )
    assert fallback.body is not None
    assert table.codecs["get_profile"].decode_response(fallback.body)["tags"] == ["offline"]
    echo = table.commands_by_name["echo"]
    assert echo.traffic is not None
    assert echo.traffic.mirror == MirrorSpec(to="echo_next")  # all of them, not compared
    assert echo.traffic.fallback is not None
    assert echo.traffic.fallback.body == b'{"down":true}'
    assert table.commands_by_name["get_profile_next"].traffic is None


def test_words_are_looked_up_per_upstream(workdir: Path) -> None:
    table = load(workdir, GOOD)
    assert table.command_at("im", 0x1002) is table.commands_by_name["get_profile"]
    assert table.command_at("im_next", 0x1002) is table.commands_by_name["get_profile_next"]
    assert table.command_at("im_next", 0x2001) is table.commands_by_name["new_message"]
    assert table.command_at("im_next", 0x1004) is None
    # A number shared by two upstreams names a command only with its upstream.
    assert table.find_command(0x1002) is None
    assert table.find_command("0x1002", "im_next") is table.commands_by_name["get_profile_next"]
    assert table.find_command("get_profile_next") is table.commands_by_name["get_profile_next"]
    assert [c.name for c in table.commands_with_word(0x1003)] == ["echo", "echo_next"]


def test_check_lists_the_rules(workdir: Path) -> None:
    lines = route_lines(load(workdir, GOOD))
    assert (
        "get_profile: split header.x-user-id tail [0, 1] -> get_profile_next, "
        "header.x-user-id values ['42', '7', '8'] -> get_profile_next, "
        "query.group values ['10', 'beta'] -> get_profile_next, "
        "query.did 12.5% -> get_profile_next; mirror 5% -> get_profile_next, compared; "
        "fallback last_good by path.user_id for 600 s, else static body"
    ) in lines
    assert "echo: mirror 100% -> echo_next; fallback static body" in lines


BROKEN = (
    HEAD
    + """\
  - name: get_profile
    command: 0x1002
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v1/users/{user_id}/profile"}
    uid: header.X-User-Id
    split:
      - {key: header.X-User-Id, tail: [0, 10], to: get_profile_nxt}
      - {key: header.X-User-Id, values: [abc], to: get_profile_next}
      - {key: query.did, percent: 10.555, to: get_profile_next}
      - {key: query.did, percent: 1, tail: [1], to: get_profile_next}
      - {key: query.did, to: get_profile_next}
      - {key: query.did, percent: 1, to: new_message}
      - {key: query.did, percent: 1, to: get_profile}
      - {key: query.did, percent: 1, to: echo}
      - {key: query.did, percent: 1, to: send_message}
      - {key: body.x, percent: 1, to: get_profile_next}
    mirror: {to: get_profile_next, percent: 500, log_values: true}
    fallback:
      last_good: {key: path.user_id, ttl: 0s}
      body: {nickname: 3}
"""
    + NEXT
    + """\
  - {name: echo, command: 0x1003, upstream: im, codec: json, split: [], fallback: {}}
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.SendMessageRequest
    response: demo.im.SendMessageResponse
  - {name: dup, command: 0x1002, upstream: im_next, codec: raw, fallback: {body: "!!"}}
  - {name: new_message, command: 0x2001, push: demo.im.MessagePush, mirror: {to: echo}}
  - {name: echo2, command: 0x2001, upstream: im_next, codec: json}
"""
)

EXPECTED = [
    (14, "commands[0].split[0].tail[1]", "expected a number between 0 and 9, got 10"),
    (
        14,
        "commands[0].split[0].to",
        "unknown command 'get_profile_nxt'; did you mean 'get_profile_next'?",
    ),
    (
        15,
        "commands[0].split[1].values[0]",
        "header.x-user-id fills a number for this command, so it reads as a whole number; "
        "got 'abc'",
    ),
    (16, "commands[0].split[2].percent", "a percentage has at most two decimals, got 10.555"),
    (
        17,
        "commands[0].split[3].percent",
        "give one of tail, values or percent, not both tail and percent",
    ),
    (18, "commands[0].split[4]", "give one of tail, values or percent"),
    (19, "commands[0].split[5].to", "'new_message' is a push command: only the upstream sends it"),
    (20, "commands[0].split[6].to", "a command cannot send its own requests to itself"),
    (
        21,
        "commands[0].split[7].to",
        "'echo' is a json command and 'get_profile' a protobuf one: the request is built from "
        "the same JSON, so the codecs must agree",
    ),
    (
        22,
        "commands[0].split[8].to",
        "the request of 'send_message' (demo.im.SendMessageRequest) has no field 'user_id', "
        "which 'get_profile' fills from its path or `fields`",
    ),
    (23, "commands[0].split[9].key", "invalid key expression 'body.x'"),
    (24, "commands[0].mirror.percent", "expected a percentage from 0 to 100, got 500"),
    (24, "commands[0].mirror.log_values", "needs compare: true"),
    (
        26,
        "commands[0].fallback.last_good",
        "'get_profile' is not idempotent: answering it with an earlier answer could hide that "
        "it was not done; set idempotent: true if repeating it changes nothing",
    ),
    (26, "commands[0].fallback.last_good.ttl", "expected a duration above zero, got '0s'"),
    (
        27,
        "commands[0].fallback.body",
        "does not fit demo.im.Profile: field 'nickname': expected a string, got 3",
    ),
    (33, "commands[2].split", "give at least one rule, or leave split out"),
    (33, "commands[2].fallback", "give body, last_good, or both"),
    (
        39,
        "commands[4].command",
        "duplicate command word 0x1002 on upstream 'im_next' (first at commands[1], "
        "'get_profile_next'): a command word is unique per upstream (the answers of 'im_next' "
        "are told apart by it); another upstream may reuse it",
    ),
    (39, "commands[4].fallback.body", "does not fit a raw body: a raw body must be base64"),
    (40, "commands[5].mirror", "a push command cannot have mirror"),
    (
        41,
        "commands[6].command",
        "duplicate command word 0x2001 (first at commands[5], 'new_message'): a push command's "
        "word is used by no other command, since a push may arrive from any upstream",
    ),
]


def test_every_mistake_is_reported_with_its_place(workdir: Path) -> None:
    found = problems(workdir, BROKEN)
    assert len(found) == len(EXPECTED), "\n".join(map(str, found))
    for got, (line, path, fragment) in zip(found, EXPECTED, strict=True):
        assert got[:2] == (line, path), got
        assert fragment in got[2], got


def test_a_to_command_may_reuse_the_word_on_another_upstream_only(workdir: Path) -> None:
    same = (
        HEAD
        + NEXT
        + NEXT.replace("get_profile_next", "again").replace("im_next", "im")
        + NEXT.replace("get_profile_next", "clash")
    )
    assert [(line, path) for line, path, _ in problems(workdir, same)] == [
        (17, "commands[2].command")
    ]


def test_check_explains_a_clash_and_refuses_last_good_on_a_non_idempotent_command(
    workdir: Path,
) -> None:
    text = (
        HEAD
        + NEXT
        + NEXT.replace("get_profile_next", "clash")
        + """\
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.SendMessageRequest
    response: demo.im.SendMessageResponse
    fallback: {last_good: {key: auth.sub, ttl: 1m}}
"""
    )
    (workdir / "bad.yaml").write_text(text)
    result = run_cli("check", "-c", "bad.yaml", cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "bad.yaml:12:14: commands[1].command: duplicate command word 0x1002 on upstream "
        "'im_next' (first at commands[0], 'get_profile_next'): a command word is unique per "
        "upstream (the answers of 'im_next' are told apart by it); another upstream may "
        "reuse it",
        "bad.yaml:21:27: commands[2].fallback.last_good: 'send_message' is not idempotent: "
        "answering it with an earlier answer could hide that it was not done; set "
        "idempotent: true if repeating it changes nothing",
        "2 error(s) in bad.yaml",
    ]

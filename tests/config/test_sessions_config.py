"""The `sessions` section (SPEC 3, 8): its defaults, every key, each mistake
reported with its place, and the `tlvproxy check` line."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from tlvproxy.config.keys import KeyExpr
from tlvproxy.config.listing import route_lines
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import SessionsSpec

DEMO_PROTO = Path(__file__).resolve().parents[2] / "proto" / "demo" / "im.proto"

BASE = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {nodes: [127.0.0.1:7001]}
auth:
  - {name: partners, type: api_key, header: X-Api-Key, keys: {}}
commands:
  - name: echo
    command: 0x1003
    upstream: im
    codec: json
    http: {method: POST, path: /v1/echo}
websocket: {path: /ws, upstream: im}
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "proto" / "demo").mkdir(parents=True)
    shutil.copy(DEMO_PROTO, tmp_path / "proto" / "demo" / "im.proto")
    return tmp_path


def load(workdir: Path, sessions: str):
    path = workdir / "commands.yaml"
    path.write_text(BASE + textwrap.dedent(sessions))
    return load_table(path)


def problems(workdir: Path, sessions: str) -> list[str]:
    with pytest.raises(TableError) as caught:
        load(workdir, sessions)
    return caught.value.problems


def test_defaults_and_every_key(workdir: Path) -> None:
    assert load(workdir, "").sessions is None
    table = load(workdir, "sessions: {upstream: im}\n")
    assert table.sessions == SessionsSpec(upstream="im")
    assert (table.sessions.path, table.sessions.idle_timeout) == ("/v1/sessions", 60.0)
    assert (table.sessions.poll_timeout, table.sessions.max_buffered) == (25.0, 256)
    table = load(
        workdir,
        """\
        sessions:
          path: /im/push
          upstream: im
          hash_on: query.did
          auth: partners
          uid: auth.claim.uid
          idle_timeout: 2m
          poll_timeout: 500ms
          max_buffered: 10
          max_buffered_per_worker: 64 MiB
        """,
    )
    assert table.sessions == SessionsSpec(
        path="/im/push",
        upstream="im",
        hash_on=KeyExpr("query", "did"),
        uid=KeyExpr("auth", "claim.uid"),
        auth="partners",
        idle_timeout=120.0,
        poll_timeout=0.5,
        max_buffered=10,
        max_buffered_per_worker=64 * 1024 * 1024,
    )
    assert table.warnings == ()
    assert route_lines(table)[-2] == "sessions: /im/push -> upstream im (SSE and long polling)"


@pytest.mark.parametrize(
    ("sessions", "expected"),
    [
        ("sessions: {}\n", "sessions.upstream: required key is missing"),
        ("sessions: [im]\n", "sessions: expected a mapping"),
        ("sessions: {upstream: im, ttl: 1}\n", "sessions.ttl: unknown key"),
        ("sessions: {upstream: other}\n", "sessions.upstream: undefined upstream 'other'"),
        ("sessions: {upstream: im, auth: users}\n", "sessions.auth: undefined authenticator"),
        ("sessions: {upstream: im, path: v1}\n", "sessions.path: path 'v1' must start with '/'"),
        ("sessions: {upstream: im, path: /}\n", "sessions.path: the sessions path cannot be /"),
        ("sessions: {upstream: im, path: /s/}\n", "sessions.path: the sessions path cannot end"),
        (
            "sessions: {upstream: im, path: '/s/{id}'}\n",
            "sessions.path: the sessions path cannot have parameters",
        ),
        (
            "sessions: {upstream: im, path: /v1}\n",
            "sessions.path: /v1 would hide the route POST /v1/echo of command 'echo'",
        ),
        (
            "sessions: {upstream: im, path: /v1/echo}\n",
            "sessions.path: /v1/echo would hide the route POST /v1/echo",
        ),
        ("sessions: {upstream: im, path: /ws}\n", "sessions.path: /ws would hide the WebSocket"),
        ("sessions: {upstream: im, hash_on: did}\n", "sessions.hash_on:"),
        ("sessions: {upstream: im, uid: nobody.knows}\n", "sessions.uid:"),
        ("sessions: {upstream: im, idle_timeout: 0}\n", "sessions.idle_timeout: expected a"),
        ("sessions: {upstream: im, poll_timeout: -1s}\n", "sessions.poll_timeout:"),
        ("sessions: {upstream: im, max_buffered: 0}\n", "sessions.max_buffered: expected a number"),
        ("sessions: {upstream: im, max_buffered: 70000}\n", "sessions.max_buffered: expected"),
        ("sessions: {upstream: im, max_buffered: many}\n", "sessions.max_buffered: expected"),
        (
            "sessions: {upstream: im, max_buffered_per_worker: 0}\n",
            "sessions.max_buffered_per_worker: expected a size above zero",
        ),
        (
            "sessions: {upstream: im, max_buffered_per_worker: lots}\n",
            "sessions.max_buffered_per_worker:",
        ),
    ],
)
def test_mistakes_name_their_place(workdir: Path, sessions: str, expected: str) -> None:
    found = problems(workdir, sessions)
    assert any(expected in problem for problem in found), found
    line = len(BASE.splitlines()) + 1
    assert all(f"commands.yaml:{line}:" in problem for problem in found), found


def test_a_uid_the_client_writes_on_an_authenticated_session_is_warned_about(
    workdir: Path,
) -> None:
    table = load(workdir, "sessions: {upstream: im, auth: partners, uid: query.uid}\n")
    [warning] = table.warnings
    assert "sessions.uid: the session's uid comes from query.uid" in warning


def test_rate_limits_name_session_creation_only_with_sessions(workdir: Path) -> None:
    rule = (
        "rate_limits: [{name: creates, commands: [sessions.create], key: remote_addr, rate: 1/s}]\n"
    )
    table = load(workdir, "sessions: {upstream: im}\n" + rule)
    assert table.rate_limits[0].commands == ("sessions.create",)
    [problem] = problems(workdir, rule)
    line = len(BASE.splitlines()) + 1
    assert problem.endswith(
        f"commands.yaml:{line}:42: rate_limits[0].commands[0]: sessions.create limits the "
        "creation of push sessions, but the table has no sessions section"
    )


def test_no_command_may_take_the_name_of_session_creation(workdir: Path) -> None:
    path = workdir / "commands.yaml"
    path.write_text(BASE.replace("name: echo", "name: sessions.create"))
    with pytest.raises(TableError) as caught:
        load_table(path)
    assert any(
        "commands[0].name: sessions.create is what rate_limits call the creation of push "
        "sessions" in problem
        for problem in caught.value.problems
    ), caught.value.problems

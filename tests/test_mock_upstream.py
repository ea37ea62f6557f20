"""The demo upstream (`tlvproxy mock-upstream`) and `tlvproxy call`, in process and as
processes, over real sockets."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import pytest
import trio
import yaml

import tlvproxy
from tests.fixtures import FIXTURE_TABLE
from tests.upstream.rawtlv import PushLog
from tlvproxy.config.jwks import parse_key_set
from tlvproxy.config.loader import load_table
from tlvproxy.config.model import Address, Table
from tlvproxy.demo_keys import AUDIENCE, ISSUER, TokenIssuer, make_demo_keys
from tlvproxy.errors import BadRequest
from tlvproxy.framing import FLAG_PUSH, FLAG_RESPONSE, Frame
from tlvproxy.metrics import Metrics
from tlvproxy.mock_upstream import (
    MAX_DELAY,
    MAX_MESSAGES,
    NO_SIGNING_KEY,
    MockService,
    serve_mock_upstream,
)
from tlvproxy.upstream.call import build_request, call_node, parse_address, render_reply
from tlvproxy.upstream.connection import Connection, SendFailed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table() -> Table:
    return load_table(FIXTURE_TABLE)


@asynccontextmanager
async def mock(table: Table, issuer: TokenIssuer | None = None) -> AsyncIterator[Address]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            partial(serve_mock_upstream, "127.0.0.1", 0, table, issuer=issuer)
        )
        yield parse_address(address)
        nursery.cancel_scope.cancel()


LOGIN = {
    "name": "login",
    "command": 0x1005,
    "upstream": "im",
    "request": "demo.im.LoginRequest",
    "response": "demo.im.LoginResponse",
    "http": {"method": "POST", "path": "/v1/login"},
}


@pytest.fixture(scope="module")
def login_table(tmp_path_factory: pytest.TempPathFactory) -> Table:
    """The tests' demo table with the demo's `login` command added."""
    document = yaml.safe_load(FIXTURE_TABLE.read_text())
    document["proto"]["paths"] = [str(ROOT / "proto")]
    document["commands"].append(LOGIN)
    path = tmp_path_factory.mktemp("login") / "table.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_table(path)


@asynccontextmanager
async def connect(
    table: Table, address: Address, pushes: PushLog | None = None
) -> AsyncIterator[Connection]:
    stream = await trio.open_tcp_stream(address.host, address.port)
    conn = Connection(
        stream, table.framing, Metrics(), node=str(address), max_in_flight=64, receiver=pushes
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        yield conn
        conn.close(SendFailed("the test is over"))


def body(table: Table, name: str, value: object) -> bytes:
    return table.codecs[name].encode_value(value)


def decoded(table: Table, name: str, frame: Frame) -> Any:
    return table.codecs[name].decode_response(frame.body)


async def test_heartbeat_echo_and_profiles(table: Table) -> None:
    async with mock(table) as address, connect(table, address) as conn:
        beat = await conn.request(0x0001, b"")
        assert (beat.status, beat.body, beat.flags) == (0, b"", FLAG_RESPONSE)
        echo = await conn.request(0x1003, b'{"text": "hi", "n": [1, 2]}', uid=5)
        assert (echo.status, echo.body, echo.uid) == (0, b'{"text": "hi", "n": [1, 2]}', 5)
        profile = await conn.request(0x1002, body(table, "get_profile", {"user_id": 42}))
        assert profile.status == 0
        assert decoded(table, "get_profile", profile) == {
            "user_id": 42,
            "nickname": "user42",
            "gender": "GENDER_MALE",
            "status": "STATUS_OFFLINE",
            "created_at": "1700000000000",
            "tags": ["demo"],
        }
        for unknown in (0, 1_000_000):
            missing = await conn.request(0x1002, body(table, "get_profile", {"user_id": unknown}))
            assert (missing.status, missing.body) == (2, b"")


async def test_send_message_answers_and_pushes_to_the_recipient_only(table: Table) -> None:
    pushes = PushLog()
    async with (
        mock(table) as address,
        connect(table, address) as alice,
        connect(table, address, pushes) as bob,
    ):
        # Bob's first frame carries his uid: that makes it his session.
        assert (await bob.request(0x1003, b"{}", uid=2)).status == 0
        sent = await alice.request(
            0x1001, body(table, "send_message", {"to_uid": 2, "text": "hello bob"}), uid=1
        )
        answer = decoded(table, "send_message", sent)
        assert sent.status == 0
        push = await pushes.next()
        assert (push.command, push.flags, push.uid) == (0x2001, FLAG_PUSH, 2)
        assert decoded(table, "new_message", push) == {
            "from_uid": 1,
            "to_uid": 2,
            "text": "hello bob",
            "msg_id": answer["msg_id"],
            "sent_at": answer["sent_at"],
        }
        listed = await alice.request(0x1004, body(table, "list_messages", {"user_id": 2}))
        [message] = decoded(table, "list_messages", listed)["messages"]
        assert message["text"] == "hello bob"
        online = await alice.request(0x1002, body(table, "get_profile", {"user_id": 2}))
        assert decoded(table, "get_profile", online)["status"] == "STATUS_ONLINE"


async def test_failure_switches(table: Table, autojump_clock: object) -> None:
    async with mock(table) as address, connect(table, address) as conn:
        teapot = await conn.request(0x1003, b'{"_status": 3, "x": 1}')
        assert (teapot.status, teapot.body) == (3, b'{"_status": 3, "x": 1}')
        started = trio.current_time()
        late = await conn.request(0x1003, b'{"_delay_ms": 1500}')
        assert late.status == 0
        assert trio.current_time() - started >= 1.5
        refused = await conn.request(
            0x1001, body(table, "send_message", {"to_uid": 2, "text": "/status 3"}), uid=1
        )
        assert (refused.status, refused.body) == (3, b"")
        started = trio.current_time()
        delayed = await conn.request(
            0x1001, body(table, "send_message", {"to_uid": 2, "text": "/delay 700 hi"}), uid=1
        )
        assert delayed.status == 0
        assert trio.current_time() - started >= 0.7


async def test_failure_switches_out_of_range_answer_status_1(
    table: Table, autojump_clock: object
) -> None:
    # A status the header cannot hold, or none, killed the whole service (any
    # caller reaches echo through the gateway); a delay is capped.
    async with mock(table) as address, connect(table, address) as conn:
        for wanted in (b"-1", b"65536", b"99999999999999999999"):
            answer = await conn.request(0x1003, b'{"_status": ' + wanted + b"}")
            assert (answer.status, answer.body) == (1, b"")
        bare = body(table, "send_message", {"to_uid": 2, "text": "/status "})
        assert (await conn.request(0x1001, bare, uid=1)).status == 1
        started = trio.current_time()
        assert (await conn.request(0x1003, b'{"_delay_ms": 1e12}')).status == 0
        assert trio.current_time() - started == pytest.approx(MAX_DELAY)
        assert (await conn.request(0x1003, b'{"x": 1}')).status == 0  # still serving


async def test_the_messages_kept_are_bounded(table: Table) -> None:
    service = MockService(table)
    for n in range(MAX_MESSAGES + 5):
        service._send_message(1, {"to_uid": 2, "text": f"m{n}"})
    assert len(service.messages) == MAX_MESSAGES
    assert service.messages[-1]["msg_id"] == MAX_MESSAGES + 5


async def test_bad_requests_get_status_1(table: Table) -> None:
    async with mock(table) as address, connect(table, address) as conn:
        assert (await conn.request(0x7777, b"")).status == 1  # not in the table
        assert (await conn.request(0x2001, b"")).status == 1  # a push command
        assert (await conn.request(0x1003, b"{not json")).status == 1
        assert (await conn.request(0x1002, b"\xff\xff\xff")).status == 1  # not protobuf
        no_recipient = body(table, "send_message", {"text": "to nobody"})
        assert (await conn.request(0x1001, no_recipient, uid=1)).status == 1


async def test_a_malformed_frame_closes_only_that_connection(table: Table) -> None:
    async with mock(table) as address, connect(table, address) as good:
        bad = await trio.open_tcp_stream(address.host, address.port)
        await bad.send_all(b"\x07garbage")
        assert await bad.receive_some() == b""  # closed by the mock
        await bad.aclose()
        assert (await good.request(0x1003, b"1")).body == b"1"


async def test_frames_packed_by_hand(table: Table) -> None:
    # Interop with an independent encoder: the SPEC 1 header packed with struct.
    header = struct.Struct(">BBHIIIHH")
    async with mock(table) as address:
        stream = await trio.open_tcp_stream(address.host, address.port)
        await stream.send_all(b"\x09" + header.pack(1, 0, 0x1003, 77, 9, 2, 0, 0) + b"[]\x0a")
        data = b""
        while len(data) < 24:
            data += await stream.receive_some()
        await stream.aclose()
    assert data == b"\x09" + header.pack(1, 1, 0x1003, 77, 9, 2, 0, 0) + b"[]\x0a"


async def test_call_in_process(table: Table) -> None:
    async with mock(table) as address:
        request = build_request(table, "get_profile", '{"user_id": 7}')
        assert (request.command, request.timeout, request.connect_timeout) == (0x1002, 3.0, 1.0)
        frame = await call_node(table, address, request)
        reply = render_reply(table, request, frame)
        assert reply["status"] == 0
        assert reply["body"]["nickname"] == "user7"
        by_number = build_request(table, "0x0001", None)
        assert by_number.spec is None
        beat = await call_node(table, address, by_number)
        assert render_reply(table, by_number, beat) == {
            "command": "0x0001",
            "status": 0,
            "body": None,
        }


@pytest.mark.parametrize(
    ("command", "argument", "message"),
    [
        ("nope", None, "neither a name in the table nor a number"),
        ("new_message", None, "is a push command"),
        ("echo", "{bad", "not valid JSON"),
        ("get_profile", '{"user_id": "x"}', "user_id"),
        ("0x10000", None, "does not fit"),
    ],
)
def test_call_refuses_bad_arguments(
    table: Table, command: str, argument: str | None, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        build_request(table, command, argument)


@pytest.mark.parametrize(
    ("text", "message"),
    [("localhost", "HOST:PORT"), ("h:99999", "HOST:PORT"), ("::1:80", r"as \[HOST\]:PORT")],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(text)
    assert parse_address("[::1]:7001") == Address("::1", 7001)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlvproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.slow
def test_mock_upstream_and_call_as_processes() -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "tlvproxy", "mock-upstream"),
            *("--listen", "127.0.0.1:0", "-c", str(FIXTURE_TABLE)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        record = json.loads(process.stdout.readline())
        address = record["address"]
        assert record["message"] == f"mock upstream listening on {address}"
        assert not address.endswith(":0")
        echoed = run_cli("call", address, "echo", '{"hello": ["world"]}', "-c", str(FIXTURE_TABLE))
        assert (echoed.returncode, json.loads(echoed.stdout)) == (
            0,
            {"command": "echo", "status": 0, "body": {"hello": ["world"]}},
        )
        missing = run_cli("call", address, "0x1002", '{"user_id": 0}', "-c", str(FIXTURE_TABLE))
        assert (missing.returncode, json.loads(missing.stdout)["status"]) == (1, 2)
        bad = run_cli("call", address, "nope", "-c", str(FIXTURE_TABLE))
        assert bad.returncode == 2
        assert "unknown command 'nope'" in bad.stderr
    finally:
        process.terminate()
        process.wait(10)
    gone = run_cli("call", address, "echo", "-c", str(FIXTURE_TABLE))
    assert gone.returncode == 3
    assert "upstream_unavailable" in gone.stderr


def test_mock_upstream_refuses_a_bad_listen_address() -> None:
    result = run_cli("mock-upstream", "--listen", "nowhere")
    assert result.returncode == 2
    assert "--listen: expected HOST:PORT" in result.stderr


async def test_login_answers_a_token_the_demo_key_set_verifies(
    login_table: Table, tmp_path: Path
) -> None:
    key, key_set = make_demo_keys(tmp_path)
    async with (
        mock(login_table, TokenIssuer.from_file(key)) as address,
        connect(login_table, address) as conn,
    ):
        before = int(time.time())
        answer = await conn.request(0x1005, body(login_table, "login", {"user_id": 5}))
        after = int(time.time())
    assert answer.status == 0
    login = decoded(login_table, "login", answer)
    assert login["error"] == ""
    # As the gateway's `users` authenticator will: the kid, then the signature
    # and claims against the public key set `make demo-keys` writes.
    header = jwt.get_unverified_header(login["token"])
    assert header["alg"] == "ES256"
    found = parse_key_set(key_set.read_text(), ["ES256"]).find(header["kid"], "ES256")
    assert found is not None
    claims = jwt.decode(
        login["token"], found.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER
    )
    assert claims["sub"] == "5"
    assert before <= claims["iat"] <= after
    assert claims["exp"] - claims["iat"] == 3600
    assert int(login["expires_at"]) == claims["exp"] * 1000
    # Another key set (another `make demo-keys`) does not verify it.
    _, other = make_demo_keys(tmp_path / "other")
    (stranger,) = jwt.PyJWKSet.from_json(other.read_text()).keys
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(login["token"], stranger.key, algorithms=["ES256"], audience=AUDIENCE)


async def test_login_without_a_signing_key_answers_status_4(login_table: Table) -> None:
    async with mock(login_table) as address, connect(login_table, address) as conn:
        answer = await conn.request(0x1005, body(login_table, "login", {"user_id": 5}))
    assert answer.status == 4
    assert decoded(login_table, "login", answer) == {
        "token": "",
        "expires_at": "0",
        "error": NO_SIGNING_KEY,
    }
    assert "--token-key" in NO_SIGNING_KEY


async def test_login_refuses_unknown_users(login_table: Table, tmp_path: Path) -> None:
    key, _ = make_demo_keys(tmp_path)
    async with (
        mock(login_table, TokenIssuer.from_file(key)) as address,
        connect(login_table, address) as conn,
    ):
        for unknown in (0, 1_000_000):
            request = body(login_table, "login", {"user_id": unknown})
            missing = await conn.request(0x1005, request)
            assert (missing.status, missing.body) == (2, b"")


def test_mock_upstream_refuses_a_token_key_it_cannot_use(tmp_path: Path) -> None:
    missing = run_cli("mock-upstream", "--token-key", str(tmp_path / "absent.pem"))
    assert missing.returncode == 2
    assert f"--token-key {tmp_path / 'absent.pem'}: No such file or directory" in missing.stderr
    _, key_set = make_demo_keys(tmp_path)
    public = run_cli("mock-upstream", "--token-key", str(key_set))
    assert public.returncode == 2
    assert "not an unencrypted PEM private key" in public.stderr


async def test_call_sends_the_uid_and_renders_the_reply_like_rest(table: Table) -> None:
    async with mock(table) as address:
        send = build_request(table, "send_message", '{"to_uid": 6, "text": "hi"}')
        sent = render_reply(table, send, await call_node(table, address, send, uid=5))
        assert sent["status"] == 0
        assert set(sent["body"]) == {"msg_id", "sent_at"}  # int64s as strings, as REST has them
        assert isinstance(sent["body"]["msg_id"], str)
        listing = build_request(table, "list_messages", '{"user_id": 6}')
        listed = render_reply(table, listing, await call_node(table, address, listing))
        (message,) = listed["body"]["messages"]
        assert (message["from_uid"], message["to_uid"], message["text"]) == (5, 6, "hi")


def test_version_and_the_uid_option() -> None:
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"tlvproxy {tlvproxy.__version__}"
    wide = run_cli("call", "127.0.0.1:1", "echo", "--uid", str(2**32), "-c", str(FIXTURE_TABLE))
    assert wide.returncode == 2
    assert "does not fit the header's uid field" in wide.stderr
    helped = run_cli("call", "--help")
    assert "example:" in helped.stdout


NEXT_COMMANDS = [
    {
        "name": "get_profile_next",
        "command": 0x1002,
        "upstream": "im_next",
        "request": "demo.im.GetProfileRequest",
        "response": "demo.im.Profile",
    },
    {"name": "echo_next", "command": 0x1003, "upstream": "im_next", "codec": "json"},
]


@pytest.fixture(scope="module")
def two_upstreams(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' demo table plus `im_next`, whose commands reuse the words of `im`'s."""
    document = yaml.safe_load(FIXTURE_TABLE.read_text())
    document["proto"]["paths"] = [str(ROOT / "proto")]
    document["upstreams"]["im_next"] = {"nodes": ["127.0.0.1:7002"]}
    document["commands"].extend(NEXT_COMMANDS)
    path = tmp_path_factory.mktemp("next") / "table.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("upstream", "variant", "nickname", "tags"),
    [
        (None, "current", "user7", ["demo"]),
        ("im", "next", "User 7", ["demo", "next"]),
        ("im_next", "current", "user7", ["demo"]),
        ("im_next", "next", "User 7", ["demo", "next"]),
    ],
)
async def test_the_service_plays_one_upstream_in_one_variant(
    two_upstreams: Path, upstream: str | None, variant: str, nickname: str, tags: list[str]
) -> None:
    table = load_table(two_upstreams)
    async with trio.open_nursery() as nursery:
        started = partial(
            serve_mock_upstream, "127.0.0.1", 0, table, upstream=upstream, variant=variant
        )
        address = parse_address(await nursery.start(started))
        async with connect(table, address) as conn:
            # 0x1002 is get_profile on im and get_profile_next on im_next: both
            # answer a profile (the second by its request message).
            name = "get_profile_next" if upstream == "im_next" else "get_profile"
            profile = await conn.request(0x1002, body(table, name, {"user_id": 7}))
            assert profile.status == 0
            value = decoded(table, name, profile)
            assert (value["nickname"], value["tags"]) == (nickname, tags)
            # A json command the demo does not know by name answers status 1.
            echo = await conn.request(0x1003, b"{}")
            assert echo.status == (1 if upstream == "im_next" else 0)
        nursery.cancel_scope.cancel()


def test_mock_upstream_refuses_an_upstream_the_table_lacks(two_upstreams: Path) -> None:
    result = run_cli("mock-upstream", "-c", str(two_upstreams), "--upstream", "nope")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tlvproxy mock-upstream: --upstream: the table has no upstream 'nope' "
        "(its upstreams: im, im_next)"
    )


def test_call_asks_for_a_name_when_upstreams_share_a_word(two_upstreams: Path) -> None:
    table = load_table(two_upstreams)
    with pytest.raises(BadRequest) as caught:
        build_request(table, "0x1002", '{"user_id": 7}')
    assert caught.value.message == (
        "command 0x1002 is the word of get_profile (upstream im), get_profile_next "
        "(upstream im_next): name one of them"
    )
    named = build_request(table, "get_profile_next", '{"user_id": 7}')
    assert (named.command, named.spec) == (0x1002, table.commands_by_name["get_profile_next"])

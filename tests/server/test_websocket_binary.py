"""Binary mode's message check (`ws_binary`), on frames packed by hand with `struct`."""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.fixtures import FIXTURE_TABLE
from tlvproxy.config.loader import load_table
from tlvproxy.server.ws_binary import InvalidFrame, check_frame

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable

HEADER = struct.Struct(">BBHIIIHH")  # the default header layout


def frame(command: int, seq: int, body: bytes, *, uid: int = 0) -> bytes:
    return b"\x09" + HEADER.pack(1, 0, command, seq, uid, len(body), 0, 0) + body + b"\x0a"


@pytest.fixture(scope="module")
def table() -> CompiledTable:
    return load_table(FIXTURE_TABLE)


def test_one_frame_of_a_request_command_is_taken_as_it_came(table: CompiledTable) -> None:
    sent, command = check_frame(table, "im", frame(0x1003, 77, b'{"a":1}', uid=9))
    assert command.name == "echo"
    assert (sent.command, sent.seq, sent.uid, sent.body) == (0x1003, 77, 9, b'{"a":1}')


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", "an empty message"),
        (b"hello", "start byte"),
        (frame(0x1003, 1, b"{}")[:-3], "stream ended"),
        (frame(0x1003, 1, b"{}")[:-1] + b"\x00", "end byte"),
        (frame(0x1003, 1, b"{}") * 2, "more than one frame in one message"),
        (frame(0x1003, 1, b"{}") + b"\x09", "the stream ended 1 bytes into a frame"),
        (frame(0x7777, 1, b""), "command 0x7777 is not in the table for upstream 'im'"),
        (frame(0x2001, 1, b""), "'new_message' cannot be sent: it is a push command"),
    ],
    ids=[
        "empty",
        "no start byte",
        "cut short",
        "no end byte",
        "two frames",
        "a frame and a byte",
        "unknown command",
        "push command",
    ],
)
def test_anything_else_is_an_invalid_frame(
    table: CompiledTable, message: bytes, reason: str
) -> None:
    with pytest.raises(InvalidFrame) as raised:
        check_frame(table, "im", message)
    assert reason in str(raised.value)


def test_a_command_of_another_upstream_is_not_in_the_sessions_table(
    table: CompiledTable,
) -> None:
    with pytest.raises(InvalidFrame) as raised:
        check_frame(table, "billing", frame(0x1003, 1, b"{}"))
    assert "command 0x1003 is not in the table for upstream 'billing'" in str(raised.value)


def test_the_module_is_pure() -> None:
    code = "import sys, tlvproxy.server.ws_binary; assert 'trio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""The sans-I/O RFC 6455 pieces of `ws_wire`, against wsproto's own framing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage
from wsproto.frame_protocol import FrameProtocol

from tlvproxy.server import ws_wire

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.mark.parametrize("size", SIZES)
def test_a_client_frame_is_found_and_unmasked(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    wire = bytes(FrameProtocol(client=True, extensions=[]).send_data(payload, fin=True))
    data = b"junk" + wire + b"next"
    head = ws_wire.frame_head(data, 4)
    assert head is not None
    first, plain, start, end = head
    assert (first, plain, end) == (0x80 | ws_wire.BINARY, True, 4 + len(wire))
    assert ws_wire.unmask(data[start - 4 : start], data[start:end]) == payload
    # A head cut short is not a frame yet; a payload cut short says where it ends.
    for cut in range(4, start - 4):
        assert ws_wire.frame_head(data[:cut], 4) is None
    assert ws_wire.frame_head(data[: start + 1], 4) == head


@pytest.mark.parametrize("size", SIZES)
def test_a_server_frame_is_what_wsproto_reads(size: int) -> None:
    client = Connection(ConnectionType.CLIENT)
    text = "é" * (size // 2)
    client.receive_data(ws_wire.frame(ws_wire.TEXT, text.encode()))
    client.receive_data(ws_wire.frame(ws_wire.BINARY, b"\x00" * size))
    events = list(client.events())
    assert [type(e) for e in events] == [TextMessage, BytesMessage]
    assert events[0].data == text
    assert events[0].message_finished
    assert events[1].data == b"\x00" * size


@pytest.mark.parametrize(
    ("length_bytes", "size"),
    [(b"\x7e\x00\x05", 5), (b"\x7f" + (300).to_bytes(8, "big"), 300)],
)
def test_a_length_not_in_the_fewest_bytes_is_left_to_wsproto(length_bytes, size) -> None:
    # RFC 6455 5.2 asks for the minimal length encoding; wsproto refuses others
    # (1002), so such a frame is not plain and must reach it.
    wire = bytes((0x80 | ws_wire.TEXT, 0x80 | length_bytes[0])) + length_bytes[1:]
    data = wire + b"\x00\x00\x00\x00" + b"a" * size
    head = ws_wire.frame_head(data, 0)
    assert head is not None
    assert head[1] is False  # not plain
    assert head[3] == len(data)


def test_the_module_is_pure() -> None:
    code = "import sys, tlvproxy.server.ws_wire; assert 'trio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""What one upstream answer may expand to (issue 16, finding 8; docs/reference.md
"Answers too large to render").

A `list_messages` answer of 1 MiB of `0a 00` is 524,288 empty ChatMessages; with
`emit_defaults` each renders as 63 bytes of JSON: 33 MB and +95 MiB RSS for one
request. An answer whose JSON would be over 8 x `framing.max_body` is answered
502 `upstream_protocol_error`, counted in
`tlvproxy_frames_rejected_total{reason="answer_too_large"}`, refused from an
estimate before the JSON is built; the same for WebSocket replies and pushes.
The upstream here is a TLV server written with `struct` in a thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import DEMO
from tests.ops.procs import metric
from tests.ops.rawws import RawWebSocket, rss_kib
from tests.upstream.rawtlv import HEADER, pack

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow

HEARTBEAT, GET_PROFILE, ECHO, LIST_MESSAGES, DIGEST = 0x0001, 0x1002, 0x1003, 0x1004, 0x2002
BOMB = b"\x0a\x00" * (512 * 1024)  # 1 MiB: framing.max_body exactly
# A real list of 1,000 messages: well within the bound, however it renders.
CHAT = b"\x08\x07\x10\x01\x18\x02\x22\x05hello\x28\x90\x4e"
LIST_OF_1000 = (b"\x0a" + bytes([len(CHAT)]) + CHAT) * 1000
# A push command whose message has a repeated field, so a push can be a bomb too.
COMMANDS = [
    *DEMO["commands"],
    {"name": "digest", "command": DIGEST, "push": "demo.im.ListMessagesResponse"},
]
MAX_GROWTH_KIB = 16 * 1024


class TlvServer:
    """A TLV upstream in a thread: heartbeats and echo are answered as such,
    `answers` map a command to its response body, and a get_profile request
    is preceded by the `push` frame on the same connection."""

    def __init__(self, answers: dict[int, bytes], push: bytes = b"") -> None:
        self.answers = answers
        self.push = push
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                self._conns.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = bytearray()
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                buffer += chunk
                while len(buffer) >= 22:
                    _, _, command, seq, uid, length, _, _ = HEADER.unpack_from(buffer, 1)
                    if len(buffer) < 22 + length:
                        break
                    body = bytes(buffer[21 : 21 + length])
                    del buffer[: 22 + length]
                    if command == GET_PROFILE and self.push:
                        conn.sendall(pack(DIGEST, 0, self.push, uid=uid, flags=0b11))
                    reply = body if command == ECHO else self.answers.get(command, b"")
                    conn.sendall(pack(command, seq, reply, uid=uid))

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def bomb() -> Iterator[TlvServer]:
    server = TlvServer({LIST_MESSAGES: BOMB}, push=BOMB)
    try:
        yield server
    finally:
        server.close()


def _rejected(gateway: Gateway) -> float:
    return metric(gateway.metrics(), "tlvproxy_frames_rejected_total", reason="answer_too_large")


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_an_answer_that_would_render_too_large_is_a_502(
    procs: Processes, bomb: TlvServer, parser: str
) -> None:
    gateway = procs.gateway(bomb.address, "--http-parser", parser, commands=COMMANDS)
    pid = gateway.process.pid
    assert gateway.call("GET", "/v1/users/1/profile").status == 200  # warm up
    before = rss_kib(pid)
    answer = gateway.call("GET", "/v1/users/1/messages")
    after = rss_kib(pid)
    assert answer.status == 502, answer
    error = answer.json()["error"]
    assert error["code"] == "upstream_protocol_error"
    assert "JSON" in error["message"], error
    assert _rejected(gateway) == 1
    assert after - before < MAX_GROWTH_KIB, (before, after)
    # The connection and the node are fine: the next request is answered.
    assert gateway.call("GET", "/v1/users/1/profile").status == 200


def test_a_large_answer_within_the_bound_is_rendered(procs: Processes) -> None:
    server = TlvServer({LIST_MESSAGES: LIST_OF_1000})
    try:
        gateway = procs.gateway(server.address)
        answer = gateway.call("GET", "/v1/users/1/messages")
        assert answer.status == 200, answer
        messages = answer.json()["messages"]
        assert len(messages) == 1000
        assert messages[0] == {
            "msg_id": "7",
            "from_uid": 1,
            "to_uid": 2,
            "text": "hello",
            "sent_at": "10000",
        }
    finally:
        server.close()


def test_a_websocket_reply_that_would_render_too_large_is_an_error(
    procs: Processes, bomb: TlvServer
) -> None:
    gateway = procs.gateway(bomb.address, commands=COMMANDS)
    pid = gateway.process.pid
    ws = RawWebSocket(gateway.http_port)
    ws.send_json({"cmd": "echo", "seq": 0, "body": {}})
    assert ws.receive_json()["seq"] == 0  # warm up
    before = rss_kib(pid)
    ws.send_json({"cmd": "list_messages", "seq": 1, "body": {"user_id": 1}})
    reply = ws.receive_json()
    assert reply["seq"] == 1
    assert reply["error"]["code"] == "upstream_protocol_error", reply
    assert rss_kib(pid) - before < MAX_GROWTH_KIB
    assert _rejected(gateway) == 1
    # The session goes on.
    ws.send_json({"cmd": "echo", "seq": 2, "body": {"still": "here"}})
    assert ws.receive_json() == {"cmd": "echo", "seq": 2, "status": 0, "body": {"still": "here"}}


def test_a_websocket_push_that_would_render_too_large_is_dropped(
    procs: Processes, bomb: TlvServer
) -> None:
    gateway = procs.gateway(bomb.address, commands=COMMANDS)
    ws = RawWebSocket(gateway.http_port)
    # The upstream pushes the bomb on the session's connection, then answers.
    ws.send_json({"cmd": "get_profile", "seq": 1, "body": {"user_id": 1}})
    message = ws.receive_json()
    assert message.get("push") is None, str(message)[:300]
    assert message["seq"] == 1
    assert _rejected(gateway) == 1

"""A WebSocket client that writes its frames by hand, for the hardening tests.

wsproto refuses to send what an attacker sends (empty continuations by the
million, a header declaring 2^63-1 bytes, unmasked frames), so this client
packs client frames with `struct` (RFC 6455 5.2) and reads the server's
unmasked frames the same way. Blocking sockets, like the rest of tests/ops.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import struct
import time
from typing import Any

from tests.ops.procs import DEADLINE

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN = 0x80


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, length: int | None = None
) -> bytes:
    """One masked client frame; `length` overrides the declared payload length."""
    declared = len(payload) if length is None else length
    first = (FIN if fin else 0) | opcode
    if declared < 126:
        head = struct.pack("!BB", first, 0x80 | declared)
    elif declared < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, declared)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, declared)
    key = os.urandom(4)
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return head + key + masked


def handshake(target: str = "/ws?uid=1&did=a", extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n"
        + extra
        + b"\r\n"
    )


class Closed(Exception):
    """The server's close frame arrived (`code`), or the connection ended (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


class RawWebSocket:
    """A session on a real gateway; `head` holds the 101 answer's head."""

    def __init__(
        self, port: int, target: str = "/ws?uid=1&did=a", *, receive_buffer: int | None = None
    ) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:
            # Before connect, so the window the server sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(handshake(target))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, f"connection closed during the handshake: {data!r}"
            data += chunk
        self.head, _, self._buffer = data.partition(b"\r\n\r\n")
        assert self.head.startswith(b"HTTP/1.1 101 "), self.head

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, message: dict[str, Any]) -> None:
        self.send(frame(TEXT, json.dumps(message).encode()))

    def readable(self) -> bool:
        """Whether bytes (or EOF) wait to be read, without waiting."""
        if self._buffer:
            return True
        return bool(select.select([self.sock], [], [], 0)[0])

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(1006, "connection ended without a close frame")
        self._buffer += chunk

    def receive_frame(self, timeout: float = DEADLINE) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload); raises socket.timeout."""
        deadline = time.monotonic() + timeout
        while True:
            buf = self._buffer
            if len(buf) >= 2:
                length = buf[1] & 0x7F
                start = 2
                if length == 126 and len(buf) >= 4:
                    length = struct.unpack_from("!H", buf, 2)[0]
                    start = 4
                elif length == 127 and len(buf) >= 10:
                    length = struct.unpack_from("!Q", buf, 2)[0]
                    start = 10
                if length < 126 or start > 2:
                    assert not buf[1] & 0x80, "a server frame must not be masked"
                    if len(buf) >= start + length:
                        self._buffer = buf[start + length :]
                        return buf[0] & 0x0F, buf[start : start + length]
            self._fill(deadline)

    def receive(self, timeout: float = DEADLINE) -> tuple[int, bytes]:
        """The next data frame or pong; raises Closed at the close frame."""
        while True:
            opcode, payload = self.receive_frame(timeout)
            if opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise Closed(code, payload[2:].decode(errors="replace"))
            return opcode, payload

    def receive_json(self, timeout: float = DEADLINE) -> Any:
        while True:
            opcode, payload = self.receive(timeout)
            if opcode == TEXT:
                return json.loads(payload)

    def close_code(self, timeout: float = DEADLINE) -> int:
        """Read until the server closes; the close code (1006 without a close frame)."""
        try:
            while True:
                self.receive(timeout)
        except Closed as closed:
            return closed.code

    def close(self) -> None:
        self.sock.close()


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")

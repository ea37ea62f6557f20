"""The sans-I/O pieces of RFC 6455 that WebSocket sessions use beside wsproto.

Owns: the opening handshake's checks and answers (RFC 6455 4.2), plain
data frames: a server's unmasked frame (`frame`), and the head and masking of a
client's (`frame_head`, `unmask`), which let a session read a whole, final
text or binary frame without wsproto (server/ws_reading.py), and the close
codes (RFC 6455 7.4.1).
Must not: do I/O, import trio, or keep state: wsproto owns the connection's
state (control frames, fragments, the closing handshake).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import TYPE_CHECKING, Final

from wsproto.utilities import generate_accept_token

from tlvproxy.errors import GatewayError, error_body

if TYPE_CHECKING:
    from tlvproxy.server.http_conn import Request

WS_VERSION: Final = "13"
_KEY_BYTES: Final = 16

# RFC 6455 5.2: the FIN bit, and the opcodes of data frames.
FIN: Final = 0x80
CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
MAX_CONTROL_PAYLOAD: Final = 125
_MASKED: Final = 0x80
_LENGTH_16: Final = struct.Struct("!BBH")
_LENGTH_64: Final = struct.Struct("!BBQ")

# Close codes (RFC 6455 7.4.1; which one when: docs/websocket.md "Close codes").
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
POLICY: Final = 1008
TOO_BIG: Final = 1009
INTERNAL: Final = 1011
TRY_AGAIN_LATER: Final = 1013
ABNORMAL: Final = 1006  # no close frame: the client vanished (never sent on the wire)


# ---------------------------------------------------------------- handshake


def handshake_problem(request: Request) -> str | None:
    """Why `request` is not a valid RFC 6455 opening handshake, or None."""
    connection_tokens: set[str] = set()
    upgrade = ""
    version = key = None
    for name, value in request.headers:
        if name == "connection":
            connection_tokens.update(t.strip().lower() for t in value.split(","))
        elif name == "upgrade":
            upgrade = value.strip().lower()
        elif name == "sec-websocket-version":
            version = value.strip()
        elif name == "sec-websocket-key":
            key = value.strip()
    if request.method != "GET":
        return "a WebSocket handshake must be a GET"
    if "upgrade" not in connection_tokens or upgrade != "websocket":
        return "a WebSocket handshake needs 'Connection: Upgrade' and 'Upgrade: websocket'"
    if version != WS_VERSION:
        return f"unsupported Sec-WebSocket-Version {version!r}: only 13 is spoken"
    if key is None:
        return "the Sec-WebSocket-Key header is missing"
    try:
        nonce = base64.b64decode(key, validate=True)
    except ValueError:
        # binascii.Error, or a key that is not ASCII (legal obs-text in a header
        # value, which b64decode refuses with a plain ValueError).
        nonce = b""
    if len(nonce) != _KEY_BYTES:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def accept_head(request: Request, request_id: str) -> bytes:
    """The 101 answer accepting `request` (no subprotocol, no extension)."""
    key = (request.header("sec-websocket-key") or "").strip().encode()
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n"
        b"X-Request-Id: " + request_id.encode() + b"\r\n\r\n"
    )


def reject_bytes(error: GatewayError, request_id: str) -> bytes:
    """The HTTP answer refusing a handshake with `error` (its JSON error body)."""
    # Sec-WebSocket-Version tells a client speaking another version what we speak
    # (RFC 6455 4.4); it is harmless on the other refusals.
    body = json.dumps(error_body(error, request_id), ensure_ascii=False).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in error.headers())
    return (
        f"HTTP/1.1 {error.http_status} {_REASONS.get(error.http_status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\nX-Request-Id: {request_id}\r\n{extra}"
        f"Sec-WebSocket-Version: {WS_VERSION}\r\n\r\n"
    ).encode() + body


_REASONS: Final = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


# ---------------------------------------------------------------- frames


def frame(opcode: int, payload: bytes) -> bytes:
    """One whole, unmasked server frame of `payload` (RFC 6455 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((FIN | opcode, size)) + payload
    if size < 65536:
        return _LENGTH_16.pack(FIN | opcode, 126, size) + payload
    return _LENGTH_64.pack(FIN | opcode, 127, size) + payload


def frame_head(data: bytes | bytearray, pos: int) -> tuple[int, bool, int, int] | None:
    """The frame starting at `pos` in `data`: its first byte (FIN, RSV bits,
    opcode), whether it is plain, and where its payload starts and ends (`end`
    may lie past `data`: the rest is on its way). None while the head itself is
    incomplete.

    Plain: masked, as a client's frame must be, with its length in the fewest
    bytes (RFC 6455 5.2). Only a plain frame may be read without wsproto; any
    other goes to wsproto, which refuses what the RFC forbids.
    """
    available = len(data) - pos
    if available < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    start = pos + 2
    minimal = True
    if length == 126:
        if available < 4:
            return None
        length = int.from_bytes(data[start : start + 2], "big")
        start += 2
        minimal = length >= 126
    elif length == 127:
        if available < 10:
            return None
        length = int.from_bytes(data[start : start + 8], "big")
        start += 8
        minimal = 65536 <= length < 1 << 63
    masked = bool(second & _MASKED)
    if masked:
        start += 4  # the masking key
    return data[pos], masked and minimal, start, start + length


def unmask(key: bytes | bytearray, payload: bytes | bytearray) -> bytes:
    """`payload` XORed with the 4-byte masking `key` (RFC 6455 5.3), as one big integer."""
    size = len(payload)
    mask = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
        size, "little"
    )

"""json-mode WebSocket sessions for the benchmarks, and what idle ones cost the gateway.

Owns: `Client`, one json-mode session (over a trio stream, over TLS when
given a context) that sends and receives JSON messages; `FanOut`, the
senders of a push fan-out and its measuring window; and `idle_memory`, the
gateway's resident memory per idle session. The gateway's
table must map `uid` and `did` from the query (`/ws?uid=N&did=dN`). Starts
no process and prints nothing.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING

import h11
import orjson
import trio
from wsproto.utilities import generate_accept_token, generate_nonce

from .processes import rss_kib

if TYPE_CHECKING:
    import ssl

WARM_SESSIONS = 50  # opened and closed before the first reading
OPENING = 200  # sessions being opened at once
IDLE_LIMIT = 300.0  # seconds for opening every idle session: more means stuck
RECEIVERS_UID_BASE = 1000  # a fan-out's receivers have the uids from here on
FAN_OUT_WARM_UP = 1.0  # seconds of sending before a fan-out's pushes are counted
_READ_SIZE = 65536
# First bytes of the frames a client sends and takes (RFC 6455 5.2): FIN and
# the opcode; the second byte's mask bit.
_FIN_TEXT = 0x81
_FIN_CLOSE = 0x88
_MASKED = 0x80


class Client:
    """One json-mode session; `connect` opens it.

    A load generator must cost less than what it loads: with wsproto framing
    every message, this client took as much CPU per round trip as the gateway
    (on 2 cores, where they compete). So the handshake is h11's, checked with
    wsproto's accept token, and the frames are the few this benchmark sends
    and expects, written and read here: a text message out (masked, as a
    client's must be), whole text messages and a close in.
    """

    def __init__(self, stream: trio.abc.Stream, received: bytes) -> None:
        self.stream = stream
        self._inbox = received  # bytes after the handshake not yet read as frames
        self._key = os.urandom(4)  # this client's masking key

    @classmethod
    async def connect(cls, port: int, uid: int, context: ssl.SSLContext | None = None) -> Client:
        """A session of `uid` (device `d{uid}`) on 127.0.0.1:`port`, over TLS
        (verified for the name localhost) when `context` is given."""
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if context is not None:
            tls = trio.SSLStream(
                stream, context, server_hostname="localhost", https_compatible=True
            )
            await tls.do_handshake()
            stream = tls
        http = h11.Connection(h11.CLIENT)
        nonce = generate_nonce()
        headers = [
            (b"Host", b"localhost"),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", nonce),
            (b"Sec-WebSocket-Version", b"13"),
        ]
        target = f"/ws?uid={uid}&did=d{uid}"
        await stream.send_all(http.send(h11.Request(method="GET", target=target, headers=headers)))
        while (event := http.next_event()) is h11.NEED_DATA:
            http.receive_data(bytes(await stream.receive_some(_READ_SIZE)))
        if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
            raise EOFError(f"the gateway refused the session: {event!r}")
        if dict(event.headers).get(b"sec-websocket-accept") != generate_accept_token(nonce):
            raise EOFError("the gateway's Sec-WebSocket-Accept does not match the key")
        return cls(stream, http.trailing_data[0])

    async def send(self, message: dict[str, object]) -> None:
        payload = orjson.dumps(message)
        size = len(payload)
        mask = (self._key * (size // 4 + 1))[:size]
        masked = int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")
        if size < 126:
            head = bytes((_FIN_TEXT, _MASKED | size))
        elif size < 65536:
            head = bytes((_FIN_TEXT, _MASKED | 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((_FIN_TEXT, _MASKED | 127)) + size.to_bytes(8, "big")
        await self.stream.send_all(head + self._key + masked.to_bytes(size, "little"))

    async def receive(self) -> dict[str, object]:
        """The next text message, decoded; raises EOFError on a close or a
        lost connection, ValueError on a frame other than a whole text message."""
        while True:
            inbox = self._inbox
            if len(inbox) >= 2:
                first, size, start = inbox[0], inbox[1] & 0x7F, 2
                if size == 126:
                    size, start = int.from_bytes(inbox[2:4], "big"), 4
                elif size == 127:
                    size, start = int.from_bytes(inbox[2:10], "big"), 10
                end = start + size
                if len(inbox) >= end:  # (a header cut short leaves `end` past it too)
                    self._inbox = inbox[end:]
                    payload = inbox[start:end]
                    if first == _FIN_TEXT:
                        return orjson.loads(payload)  # type: ignore[no-any-return]
                    if first == _FIN_CLOSE:
                        code = int.from_bytes(payload[:2], "big") if payload else None
                        raise EOFError(f"closed {code} {payload[2:].decode(errors='replace')}")
                    raise ValueError(f"a frame this client does not take: first byte {first:#x}")
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                raise EOFError("gateway closed the connection")
            self._inbox = inbox + data

    async def close(self) -> None:
        """A close frame (1000), then the stream closed without waiting for the answer."""
        key = self._key
        code = (1000).to_bytes(2, "big")
        masked = bytes((code[0] ^ key[0], code[1] ^ key[1]))
        await self.stream.send_all(bytes((_FIN_CLOSE, _MASKED | 2)) + key + masked)
        await self.stream.aclose()


class FanOut:
    """Senders calling `send_message` on the receivers' uids in turn, each
    after the answer to its last; `counting` is True while the pushes that
    reach the receivers count."""

    def __init__(self) -> None:
        self.counting = False

    async def send(self, senders: list[Client], receivers: int, duration: float) -> float:
        """Send from every one of `senders` to the `receivers` (uids from
        RECEIVERS_UID_BASE) for FAN_OUT_WARM_UP seconds, then `duration`
        more while `counting`; the seconds that were counted."""
        stop = False

        async def send_from(client: Client, first: int) -> None:
            for seq in itertools.count():
                if stop:
                    return
                to_uid = RECEIVERS_UID_BASE + (first + seq) % receivers
                await client.send(
                    {"cmd": "send_message", "seq": seq, "body": {"to_uid": to_uid, "text": "hi"}}
                )
                await client.receive()

        async with trio.open_nursery() as sending:
            for i, client in enumerate(senders):
                sending.start_soon(send_from, client, i * 7)
            await trio.sleep(FAN_OUT_WARM_UP)
            self.counting = True
            started = time.perf_counter()
            await trio.sleep(duration)
            self.counting = False
            elapsed = time.perf_counter() - started
            stop = True
        return elapsed


async def idle_memory(
    port: int, pid: int, sessions: int, context: ssl.SSLContext | None = None
) -> float:
    """KiB of the gateway `pid`'s resident memory per idle session: its VmRSS
    before and after opening `sessions` sessions (OPENING at a time, over TLS
    with `context`), once WARM_SESSIONS were opened and closed; all closed after."""
    with trio.fail_after(IDLE_LIMIT):
        warm = [await Client.connect(port, uid, context) for uid in range(1, WARM_SESSIONS + 1)]
        for client in warm:
            await trio.aclose_forcefully(client.stream)
        await trio.sleep(0.5)
        before = rss_kib(pid)
        clients: list[Client] = []
        limiter = trio.CapacityLimiter(OPENING)

        async def open_one(uid: int) -> None:
            async with limiter:
                clients.append(await Client.connect(port, uid, context))

        async with trio.open_nursery() as nursery:
            for uid in range(1, sessions + 1):
                nursery.start_soon(open_one, uid)
        await trio.sleep(1.0)
        after = rss_kib(pid)
        for client in clients:
            await trio.aclose_forcefully(client.stream)
    return (after - before) / sessions

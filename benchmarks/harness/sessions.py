"""json-mode WebSocket sessions for the benchmarks, and what idle ones cost the gateway.

Owns: `Client`, one json-mode session (wsproto over a trio stream, over TLS
when given a context) that sends and receives JSON messages; `FanOut`, the
senders of a push fan-out and its measuring window; and `idle_memory`, the
gateway's resident memory per idle session. The gateway's
table must map `uid` and `did` from the query (`/ws?uid=N&did=dN`). Starts
no process and prints nothing.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import TYPE_CHECKING

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from .processes import rss_kib

if TYPE_CHECKING:
    import ssl

WARM_SESSIONS = 50  # opened and closed before the first reading
OPENING = 200  # sessions being opened at once
IDLE_LIMIT = 300.0  # seconds for opening every idle session: more means stuck
RECEIVERS_UID_BASE = 1000  # a fan-out's receivers have the uids from here on
FAN_OUT_WARM_UP = 1.0  # seconds of sending before a fan-out's pushes are counted


class Client:
    """One json-mode session; `connect` opens it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[object] = []

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
        client = cls(stream)
        await client.stream.send_all(
            client.ws.send(Request(host="localhost", target=f"/ws?uid={uid}&did=d{uid}"))
        )
        while True:
            events = await client._events()
            for index, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    client.pending.extend(events[index + 1 :])
                    return client

    async def _events(self) -> list[object]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("gateway closed the connection")
        self.ws.receive_data(data)
        return list(self.ws.events())

    async def send(self, message: dict[str, object]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def receive(self) -> dict[str, object]:
        """The next whole text message, decoded; raises EOFError on a close."""
        parts: list[str] = []
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        return json.loads("".join(parts))  # type: ignore[no-any-return]
                elif isinstance(event, CloseConnection):
                    raise EOFError(f"closed {event.code} {event.reason}")
            self.pending.extend(await self._events())

    async def close(self) -> None:
        """A close frame (1000), then the stream closed without waiting for the answer."""
        await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
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

"""A raw TLV upstream for the pool tests, written with `struct` alone.

It is an independent implementation of SPEC 1 (STYLE 8: interop with frames packed
by hand), so a codec bug cannot hide on both ends. Each test decides the answers
with a `respond(conn, request)` coroutine; the default echoes with the response flag.

`PushLog` and `Reply` are the gateway side's stand-ins: a push receiver and a
request waiter that keep what a connection tells them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame

HEADER = struct.Struct(">BBHIIIHH")  # version, flags, command, seq, uid, length, status, reserved


def pack(
    command: int, seq: int, body: bytes = b"", *, uid: int = 0, flags: int = 1, status: int = 0
) -> bytes:
    return b"\x09" + HEADER.pack(1, flags, command, seq, uid, len(body), status, 0) + body + b"\x0a"


@attrs.frozen
class Request:
    flags: int
    command: int
    seq: int
    uid: int
    body: bytes


class RawConn:
    """One accepted connection: what it received, and a way to answer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.requests: list[Request] = []
        self._lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)

    async def answer(self, request: Request, body: bytes | None = None, status: int = 0) -> None:
        reply = request.body if body is None else body
        await self.send(pack(request.command, request.seq, reply, uid=request.uid, status=status))


Respond = Callable[[RawConn, Request], Awaitable[None]]


async def echo(conn: RawConn, request: Request) -> None:
    await conn.answer(request)


class RawUpstream:
    """A TLV server on 127.0.0.1:0; `respond` runs in its own task per request."""

    def __init__(self, respond: Respond = echo) -> None:
        self.respond = respond
        self.port = 0
        self.conns: list[RawConn] = []
        self.requests: list[Request] = []
        self._scope = trio.CancelScope()
        self._listeners: list[trio.SocketListener] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._scope:
            self._listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = self._listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, self._listeners)
                task_status.started()

    async def stop(self) -> None:
        """Take the node down: close the listener and every connection."""
        self._scope.cancel()
        for conn in self.conns:
            await trio.aclose_forcefully(conn.stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = RawConn(stream)
        self.conns.append(conn)
        buffer = bytearray()
        async with trio.open_nursery() as nursery:
            try:
                async for chunk in stream:
                    buffer += chunk
                    while len(buffer) >= 22:
                        _, flags, command, seq, uid, length, _, _ = HEADER.unpack_from(buffer, 1)
                        if len(buffer) < 22 + length:
                            break
                        assert buffer[0] == 0x09
                        assert buffer[21 + length] == 0x0A
                        request = Request(flags, command, seq, uid, bytes(buffer[21 : 21 + length]))
                        del buffer[: 22 + length]
                        conn.requests.append(request)
                        self.requests.append(request)
                        nursery.start_soon(self.respond, conn, request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()


class PushLog:
    """A `PushReceiver` that keeps the pushes and the end it is told of."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.error: GatewayError | None = None
        self.ended = trio.Event()
        self._arrived = trio.Event()

    def on_push(self, frame: Frame) -> None:
        self.frames.append(frame)
        self._arrived.set()

    def on_end(self, error: GatewayError) -> None:
        self.error = error
        self.ended.set()

    async def next(self) -> Frame:
        """The oldest push not taken yet, waited for."""
        while not self.frames:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self.frames.pop(0)


class Reply:
    """A `Waiter` that keeps what it is told; `wait()` until it is."""

    def __init__(self, deadline: float = math.inf) -> None:
        self.deadline = deadline
        self.frame: Frame | None = None
        self.error: GatewayError | None = None
        self.timed_out = False
        self._done = trio.Event()

    def on_response(self, frame: Frame) -> None:
        self.frame = frame
        self._done.set()

    def on_error(self, error: GatewayError) -> None:
        self.error = error
        self._done.set()

    def on_timeout(self) -> None:
        self.timed_out = True
        self._done.set()

    async def wait(self) -> Reply:
        await self._done.wait()
        return self

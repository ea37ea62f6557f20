"""The floor: the smallest trio REST -> TLV -> REST translator, as a bench target.

Usage: python benchmarks/floor_target.py --port P --upstream HOST:PORT

Not a product and independent of the tlvproxy package: it measures how fast
trio + httptools can translate on this machine, with nothing else in the way.
It listens on 127.0.0.1:P (one task per HTTP/1.1 connection, keep-alive,
pipelined requests answered in order, one at a time) and answers
`POST /v1/echo` by sending the request body upstream as one TLV request frame
(SPEC 1 default layout, command 0x1001) and returning the response frame's body
as `200 application/json`; anything else is a 404. All requests share ONE
upstream connection: a reader task hands each response frame to the request
waiting for its seq. No logging, metrics, policy, validation or timeouts.
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import signal
import struct
from functools import partial
from typing import Any

import httptools
import trio

HEADER = struct.Struct(">BBHIIIHH")  # version flags command seq uid length status reserved
COMMAND = 0x1001
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class Slot:
    """One request's one-shot answer: (status, body), and the task waiting for it."""

    __slots__ = ("result", "task")

    def __init__(self) -> None:
        self.result: tuple[int, bytes] | None = None
        self.task: trio.lowlevel.Task | None = None


class Upstream:
    """One multiplexed TLV connection: requests matched to responses by seq."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.lock = trio.StrictFIFOLock()  # concurrent send_all on one stream is an error
        self.waiting: dict[int, Slot] = {}
        self.seq = 0

    async def call(self, body: bytes) -> tuple[int, bytes]:
        self.seq = seq = (self.seq + 1) & 0xFFFFFFFF
        slot = self.waiting[seq] = Slot()

        def abort(_: object) -> trio.lowlevel.Abort:
            slot.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        frame = b"\x09" + HEADER.pack(1, 0, COMMAND, seq, 0, len(body), 0, 0) + body + b"\x0a"
        try:
            async with self.lock:
                await self.stream.send_all(frame)
            if slot.result is None:  # the reader may have answered during send_all
                slot.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self.waiting.pop(seq, None)
        assert slot.result is not None
        return slot.result

    async def read_loop(self) -> None:
        buf = bytearray()
        while data := await self.stream.receive_some(65536):
            buf += data
            pos = 0
            while len(buf) - pos >= 22:
                _, _, _, seq, _, length, status, _ = HEADER.unpack_from(buf, pos + 1)
                end = pos + 21 + length
                if end >= len(buf):
                    break
                if buf[pos] != 0x09 or buf[end] != 0x0A:
                    raise RuntimeError("upstream: bad frame marker")
                slot = self.waiting.pop(seq, None)
                if slot is not None:
                    slot.result = (status, bytes(buf[pos + 21 : end]))
                    if slot.task is not None:
                        trio.lowlevel.reschedule(slot.task)
                pos = end + 1
            del buf[:pos]
        raise RuntimeError("upstream closed the connection")


class Requests:
    """httptools callbacks: collects complete requests as (method, url, body)."""

    def __init__(self) -> None:
        self.parser: Any = None
        self.done: list[tuple[bytes, bytes, bytes]] = []
        self.keep_alive = True
        self.url = self.body = b""

    def on_message_begin(self) -> None:
        self.url = self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_method(), self.url, self.body))
        self.keep_alive = self.parser.should_keep_alive()


async def serve_http(stream: trio.SocketStream, upstream: Upstream) -> None:
    requests = Requests()
    parser = requests.parser = httptools.HttpRequestParser(requests)
    try:
        while data := await stream.receive_some(65536):
            parser.feed_data(data)
            out = bytearray()
            for method, url, body in requests.done:
                if method != b"POST" or url.split(b"?", 1)[0] != b"/v1/echo":
                    out += NOT_FOUND
                    continue
                status, answer = await upstream.call(body)
                out += OK % len(answer) + answer if status == 0 else BAD_GATEWAY
            requests.done.clear()
            if out:
                await stream.send_all(out)
            if not requests.keep_alive:
                return
    except (trio.BrokenResourceError, httptools.HttpParserError):
        return


async def run(port: int, host: str, upstream_port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        upstream = Upstream(await trio.open_tcp_stream(host, upstream_port))

        async def handler(stream: trio.SocketStream) -> None:
            await serve_http(stream, upstream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream.read_loop)
            await nursery.start(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the TLV upstream")
    args = parser.parse_args()
    host, _, upstream_port = args.upstream.rpartition(":")
    trio.run(run, args.port, host, int(upstream_port))


if __name__ == "__main__":
    main()

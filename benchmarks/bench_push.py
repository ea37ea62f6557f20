"""Push session figures (issue 18): pushes/s to SSE sessions, memory per idle push session.

    python benchmarks/bench_push.py [--duration 5] [--sessions 1000] [--idle 5000]

Processes (benchmarks/harness): the bundled mock upstream (bench_websocket.py
run as `mock`), one `tlvproxy serve` process (1 worker, so in one process) on
bench_websocket's json-mode table plus `sessions`, and the clients here, so
the gateway's RSS is its own. Everything shares this machine's cores.

- pushes/s to SSE sessions: `--sessions` push sessions (one uid each), each
  with an event stream open, and 10 WebSocket senders calling `send_message`
  to them in turn in a loop; pushes delivered per second on the streams.
- memory per idle session: the gateway's VmRSS before and after opening
  `--idle` push sessions (each with its dedicated upstream connection, no
  stream open), divided; then the same for `--idle` idle WebSocket sessions
  (harness/sessions.py), on a fresh gateway. Target: a push session costs no
  more than a WebSocket session.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import trio
from bench_websocket import TABLE
from harness.figures import Column, FigureTable, print_target
from harness.processes import ROOT, child, raise_fd_limit, rss_kib, serving
from harness.sessions import RECEIVERS_UID_BASE, Client, FanOut, idle_memory
from harness.tables import write_table

HERE = Path(__file__).resolve().parent
SENDERS = 10
OPENING = 100  # connections creating sessions at once
SESSIONS = """
sessions:
  path: /v1/sessions
  upstream: im
  hash_on: query.did
  uid: query.uid
  idle_timeout: 600s
  max_buffered: 256
"""


# ---------------------------------------------------------------- client


class Http:
    """One keep-alive HTTP/1.1 connection, for the sessions' plain requests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> Http:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {target} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n"
        await self.stream.send_all(head.encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self.stream.receive_some(65536)
        head_bytes, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        length = 0
        for line in head_bytes.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self.buffer += await self.stream.receive_some(65536)
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head_bytes.split(b" ", 2)[1]), answer

    async def aclose(self) -> None:
        await self.stream.aclose()


async def create_sessions(port: int, uids: range) -> list[str]:
    """A push session per uid, each told to the upstream by one message; their
    paths. OPENING keep-alive connections share the work: a connection per
    session would leave as many closed connections in the gateway's deadline
    timer for a while, and measure those too."""
    paths: dict[int, str] = {}

    async def create(share: range) -> None:
        http = await Http.connect(port)
        for uid in share:
            status, body = await http.request("POST", f"/v1/sessions?uid={uid}&did=d{uid}")
            assert status == 201, body
            path = f"/v1/sessions/{json.loads(body)['session']}"
            message = json.dumps({"cmd": "echo", "seq": 0, "body": {}}).encode()
            status, body = await http.request("POST", f"{path}/messages", message)
            assert status == 200, body
            paths[uid] = path
        await http.aclose()

    async with trio.open_nursery() as nursery:
        for first in range(OPENING):
            nursery.start_soon(create, uids[first::OPENING])
    return [paths[uid] for uid in uids]


async def open_stream(port: int, path: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {path}/events HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return stream


# ---------------------------------------------------------------- measurements


async def sse_pushes(port: int, receivers: int, duration: float) -> float:
    uids = range(RECEIVERS_UID_BASE, RECEIVERS_UID_BASE + receivers)
    paths = await create_sessions(port, uids)
    streams = [await open_stream(port, path) for path in paths]
    senders = [await Client.connect(port, 1 + i) for i in range(SENDERS)]
    fan_out = FanOut()
    delivered = 0

    async def receive(stream: trio.SocketStream) -> None:
        nonlocal delivered
        tail = b""
        while data := await stream.receive_some(65536):
            # One `data:` line per push (compact JSON); a line may straddle reads.
            joined = tail + data
            if fan_out.counting:
                delivered += joined.count(b"\ndata: ") - tail.count(b"\ndata: ")
            tail = joined[-7:]

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(receive, stream)
        elapsed = await fan_out.send(senders, receivers, duration)
        nursery.cancel_scope.cancel()
    for stream in streams:
        await stream.aclose()
    return delivered / elapsed


async def idle_push_memory(port: int, gateway_pid: int, sessions: int) -> float:
    """KiB of the gateway's resident memory per idle push session: its growth
    for `sessions` sessions, once 50 were opened to warm up."""
    await create_sessions(port, range(1, 51))  # warm-up: code paths and allocator
    await trio.sleep(0.5)
    before = rss_kib(gateway_pid)
    await create_sessions(port, range(100, 100 + sessions))
    await trio.sleep(1.0)
    after = rss_kib(gateway_pid)
    return (after - before) / sessions


# ---------------------------------------------------------------- processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=5000)
    args = parser.parse_args()
    raise_fd_limit()  # the gateway inherits it: each session holds two descriptors
    with (
        tempfile.TemporaryDirectory(prefix="bench-push-") as tmp_name,
        child([sys.executable, str(HERE / "bench_websocket.py"), "mock"]) as (_, node),
    ):
        tmp = Path(tmp_name)
        document = TABLE.format(proto=ROOT / "proto", node=node) + SESSIONS
        fan_out, idle_push, idle_websocket = (
            write_table(tmp / f"{name}.yaml", document)
            for name in ("fan-out", "idle-push", "idle-websocket")
        )
        with serving(fan_out):
            rate = trio.run(sse_pushes, fan_out.http, args.sessions, args.duration)
        with serving(idle_push) as gateway:
            push = trio.run(idle_push_memory, idle_push.http, gateway.pid, args.idle)
        with serving(idle_websocket) as gateway:
            websocket = trio.run(idle_memory, idle_websocket.http, gateway.pid, args.idle)
    FigureTable(
        f"push sessions, {args.duration:g} s measured after a 1 s warm-up",
        "load",
        44,
        [Column("per second")],
    ).row(f"pushes to {args.sessions} SSE sessions (mock upstream)", rate)
    memory = FigureTable(
        f"gateway RSS per idle session, {args.idle} sessions, upstream connections included",
        "sessions",
        9,
        [Column("KiB/session", ".1f", 12), Column("MiB in all", ".1f", 11)],
    )
    memory.row("push", push, push * args.idle / 1024)
    memory.row("websocket", websocket, websocket * args.idle / 1024)
    print_target(
        "KiB per idle push session, bound a WebSocket session's,", push, "<=", websocket, ".1f"
    )


if __name__ == "__main__":
    main()

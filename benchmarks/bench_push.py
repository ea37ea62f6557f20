"""Push session figures (issue 18): pushes/s to SSE sessions, memory per idle push session.

    python benchmarks/bench_push.py [--duration 5] [--sessions 1000] [--idle 5000]

Processes, as in bench_websocket.py (whose helpers this uses): the bundled
mock upstream, one gateway process (bench_websocket.py run as `gateway
TABLE`, serving `tlvproxy.app.Gateway`, on a table with `sessions`), and the
clients here, so the gateway's RSS is its own. Everything shares this
machine's cores.

- pushes/s to SSE sessions: `--sessions` push sessions (one uid each), each
  with an event stream open, and 10 WebSocket senders calling `send_message`
  to them in turn in a loop; pushes delivered per second on the streams.
- memory per idle session: the gateway's VmRSS before and after opening
  `--idle` push sessions (each with its dedicated upstream connection, no
  stream open), divided; then the same for `--idle` idle WebSocket sessions
  (bench_websocket.idle_memory), on a fresh gateway.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from bench_websocket import (
    ROOT,
    TABLE,
    Client,
    idle_memory,
    raise_fd_limit,
    rss_kib,
    start,
    stop,
)

HERE = Path(__file__).resolve().parent
RECEIVERS_UID_BASE = 1000
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
    counting = False
    delivered = 0
    stop_sending = False

    async def receive(stream: trio.SocketStream) -> None:
        nonlocal delivered
        tail = b""
        while data := await stream.receive_some(65536):
            # One `data:` line per push (compact JSON); a line may straddle reads.
            joined = tail + data
            if counting:
                delivered += joined.count(b"\ndata: ") - tail.count(b"\ndata: ")
            tail = joined[-7:]

    async def send(client: Client, first: int) -> None:
        for seq in itertools.count():
            if stop_sending:
                return
            to_uid = RECEIVERS_UID_BASE + (first + seq) % receivers
            await client.send(
                {"cmd": "send_message", "seq": seq, "body": {"to_uid": to_uid, "text": "hi"}}
            )
            await client.receive()

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(receive, stream)
        async with trio.open_nursery() as sending:
            for i, client in enumerate(senders):
                sending.start_soon(send, client, i * 7)
            await trio.sleep(1.0)  # warm-up
            counting = True
            started = time.perf_counter()
            await trio.sleep(duration)
            counting = False
            elapsed = time.perf_counter() - started
            stop_sending = True
        nursery.cancel_scope.cancel()
    for stream in streams:
        await stream.aclose()
    return delivered / elapsed


async def idle_push_memory(port: int, gateway_pid: int, sessions: int) -> tuple[int, float]:
    """The gateway's RSS growth for `sessions` idle push sessions (KiB in all, per session)."""
    await create_sessions(port, range(1, 51))  # warm-up: code paths and allocator
    await trio.sleep(0.5)
    before = rss_kib(gateway_pid)
    await create_sessions(port, range(100, 100 + sessions))
    await trio.sleep(1.0)
    after = rss_kib(gateway_pid)
    return after - before, (after - before) / sessions


# ---------------------------------------------------------------- processes


def start_gateway(tmp: Path, node: str, name: str) -> tuple[subprocess.Popen[str], int]:
    """bench_websocket's gateway process on its table plus `sessions`."""
    table = tmp / f"{name}.yaml"
    table.write_text(TABLE.format(proto=ROOT / "proto", node=node) + SESSIONS)
    process = start(
        [sys.executable, str(HERE / "bench_websocket.py"), "gateway", str(table)],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=5000)
    args = parser.parse_args()
    raise_fd_limit()
    mock = start([sys.executable, str(HERE / "bench_websocket.py"), "mock"], cwd=ROOT)
    assert mock.stdout is not None
    node = mock.stdout.readline().strip()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp_name:
            tmp = Path(tmp_name)
            gateway, port = start_gateway(tmp, node, "fan-out")
            try:
                rate = trio.run(sse_pushes, port, args.sessions, args.duration)
                print(f"pushes/s to {args.sessions} SSE sessions (mock upstream): {rate:,.0f}")
            finally:
                stop(gateway)
            gateway, port = start_gateway(tmp, node, "idle-push")
            try:
                total, push = trio.run(idle_push_memory, port, gateway.pid, args.idle)
                print(
                    f"gateway RSS per idle push session, {args.idle} sessions: {push:.1f} KiB "
                    f"({total / 1024:.1f} MiB in all, upstream connections included)"
                )
            finally:
                stop(gateway)
            gateway, port = start_gateway(tmp, node, "idle-websocket")
            try:
                total, websocket = trio.run(idle_memory, port, gateway.pid, args.idle)
                print(
                    f"gateway RSS per idle WebSocket session, {args.idle} sessions: "
                    f"{websocket:.1f} KiB ({total / 1024:.1f} MiB in all); "
                    f"push / WebSocket: {push / websocket:.2f}"
                )
            finally:
                stop(gateway)
    finally:
        mock.terminate()
        mock.wait()


if __name__ == "__main__":
    main()

"""WebSocket gateway figures (issue 6): round trips/s, push fan-out/s, memory per idle session.

    python benchmarks/bench_websocket.py [--duration 5] [--sessions 100] [--idle 5000]

Processes: the C echo upstream (/work/shared/bench/upstream, built in a temp
dir) or the bundled mock upstream, one gateway process (this file run as
`gateway TABLE`, serving `tlvproxy.app.Gateway`), and the clients here, so the
gateway's RSS is its own. Everything shares this machine's cores.

- round trips/s: `--sessions` sessions, each sending json-mode `echo` requests
  in a closed loop (next request when the answer came), C echo upstream.
- push fan-out/s: `--sessions` receiver sessions (one uid each) and 10 senders
  calling `send_message` to them in a loop; pushes delivered per second, mock
  upstream (which pushes `new_message` to the recipient's sessions).
- memory per idle session: the gateway's VmRSS before and after opening
  `--idle` sessions (each with its dedicated upstream connection), divided.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

ROOT = Path(__file__).resolve().parents[1]
C_UPSTREAM = Path("/work/shared/bench/upstream")
RECEIVERS_UID_BASE = 1000

TABLE = """
listen: {{http: 127.0.0.1:0, admin: null}}
proto: {{paths: [{proto}], files: [demo/im.proto]}}
upstreams:
  im:
    nodes: [{node}]
    balance: consistent_hash
    hash_on: query.did
    connect_timeout: 2s
    timeout: 5s
commands:
  - name: send_message
    command: 0x1001
    upstream: im
    request: demo.im.SendMessageRequest
    response: demo.im.SendMessageResponse
  - name: echo
    command: 0x1003
    upstream: im
    codec: json
  - name: new_message
    command: 0x2001
    push: demo.im.MessagePush
websocket:
  path: /ws
  upstream: im
  hash_on: query.did
  uid: query.uid
  mode: json
  max_message: 64 KiB
  idle_timeout: 600s
# Every session comes from 127.0.0.1: the per-address limit must admit them all.
limits: {{max_connections: 100000, max_connections_per_ip: 100000}}
"""


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------- gateway process


def run_gateway(table_path: str) -> None:
    """Serve the table until stdin closes; print the HTTP port first."""
    from tlvproxy.app import Gateway
    from tlvproxy.config.loader import load_table
    from tlvproxy.metrics import Metrics

    raise_fd_limit()
    table = load_table(Path(table_path))

    async def main() -> None:
        gateway = Gateway(table, Metrics(), serve_admin=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            assert gateway.http_address is not None
            print(gateway.http_address.port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            gateway.drain()

    trio.run(main)


def run_mock() -> None:
    """Serve the mock upstream on a free port; print HOST:PORT first."""
    from tlvproxy.config.loader import load_table
    from tlvproxy.mock_upstream import serve_mock_upstream

    raise_fd_limit()
    # The tests' demo table: the shipped one needs the demo's key set.
    table = load_table(ROOT / "tests" / "fixtures" / "table.yaml")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_mock_upstream, "127.0.0.1", 0, table)
            print(address, flush=True)

    trio.run(main)


# ---------------------------------------------------------------- client


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[object] = []

    @classmethod
    async def connect(cls, port: int, uid: int, stream: trio.abc.Stream | None = None) -> Client:
        """A json-mode session of `uid` on 127.0.0.1:`port`, or on `stream`
        when given (a TLS stream, say)."""
        if stream is None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
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
        await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
        await self.stream.aclose()


# ---------------------------------------------------------------- measurements


async def round_trips(port: int, sessions: int, duration: float) -> float:
    clients = [await Client.connect(port, uid) for uid in range(1, sessions + 1)]
    counting = False
    count = 0
    stop = False

    async def loop(client: Client) -> None:
        nonlocal count
        for seq in itertools.count():
            if stop:
                return
            await client.send({"cmd": "echo", "seq": seq, "body": {"n": seq, "text": "hello"}})
            answer = await client.receive()
            assert answer["seq"] == seq, answer
            if counting:
                count += 1

    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(loop, client)
        await trio.sleep(1.0)  # warm-up
        counting = True
        started = time.perf_counter()
        await trio.sleep(duration)
        counting = False
        elapsed = time.perf_counter() - started
        stop = True
    for client in clients:
        await client.close()
    return count / elapsed


async def push_fanout(port: int, receivers: int, duration: float) -> float:
    inboxes = [await Client.connect(port, RECEIVERS_UID_BASE + i) for i in range(receivers)]
    senders = [await Client.connect(port, 1 + i) for i in range(10)]
    counting = False
    delivered = 0
    stop = False

    async def receive(client: Client) -> None:
        nonlocal delivered
        while True:
            message = await client.receive()
            if message.get("push") and counting:
                delivered += 1

    async def send(client: Client, first: int) -> None:
        for seq in itertools.count():
            if stop:
                return
            to_uid = RECEIVERS_UID_BASE + (first + seq) % receivers
            await client.send(
                {"cmd": "send_message", "seq": seq, "body": {"to_uid": to_uid, "text": "hi"}}
            )
            await client.receive()

    async with trio.open_nursery() as nursery:
        # Each receiver registers its uid with the upstream by one request.
        for client in inboxes:
            await client.send({"cmd": "echo", "seq": 0, "body": {}})
            await client.receive()
        for client in inboxes:
            nursery.start_soon(receive, client)
        async with trio.open_nursery() as sending:
            for i, client in enumerate(senders):
                sending.start_soon(send, client, i * 7)
            await trio.sleep(1.0)
            counting = True
            started = time.perf_counter()
            await trio.sleep(duration)
            counting = False
            elapsed = time.perf_counter() - started
            stop = True
        nursery.cancel_scope.cancel()
    return delivered / elapsed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def idle_memory(port: int, gateway_pid: int, sessions: int) -> tuple[int, float]:
    warm = [await Client.connect(port, uid) for uid in range(1, 51)]
    for client in warm:
        await client.close()
    await trio.sleep(0.5)
    before = rss_kib(gateway_pid)
    clients: list[Client] = []
    limiter = trio.CapacityLimiter(200)

    async def open_one(uid: int) -> None:
        async with limiter:
            clients.append(await Client.connect(port, uid))

    async with trio.open_nursery() as nursery:
        for uid in range(1, sessions + 1):
            nursery.start_soon(open_one, uid)
    await trio.sleep(1.0)
    after = rss_kib(gateway_pid)
    for client in clients:
        await client.stream.aclose()
    return after - before, (after - before) / sessions


# ---------------------------------------------------------------- processes


def start(argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def start_gateway(tmp: Path, node: str) -> tuple[subprocess.Popen[str], int]:
    table = tmp / f"table-{node.replace(':', '-')}.yaml"
    table.write_text(TABLE.format(proto=ROOT / "proto", node=node))
    process = start(
        [sys.executable, __file__, "gateway", str(table)],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "gateway":
        run_gateway(sys.argv[2])
        return
    if sys.argv[1:] == ["mock"]:
        run_mock()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--idle", type=int, default=5000)
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("Makefile", "tlv_echo.c", "tlv_load.c"):
            shutil.copy(C_UPSTREAM / name, tmp / name)
        subprocess.run(["make", "-s", "-C", str(tmp), "tlv_echo"], check=True)
        echo = start([str(tmp / "tlv_echo"), "0"])
        assert echo.stdout is not None
        echo_port = int(echo.stdout.readline().split("127.0.0.1:")[1].split()[0])
        mock = start([sys.executable, __file__, "mock"], cwd=ROOT)
        assert mock.stdout is not None
        mock_node = mock.stdout.readline().strip()
        try:
            gateway, port = start_gateway(tmp, f"127.0.0.1:{echo_port}")
            try:
                rate = trio.run(round_trips, port, args.sessions, args.duration)
                print(f"round trips/s, {args.sessions} sessions (C echo upstream): {rate:,.0f}")
                total, per_session = trio.run(idle_memory, port, gateway.pid, args.idle)
                print(
                    f"gateway RSS per idle session, {args.idle} sessions: {per_session:.1f} KiB "
                    f"({total / 1024:.1f} MiB in all, upstream connections included)"
                )
            finally:
                stop(gateway)
            gateway, port = start_gateway(tmp, mock_node)
            try:
                rate = trio.run(push_fanout, port, args.sessions, args.duration)
                print(f"push fan-out/s, {args.sessions} receivers (mock upstream): {rate:,.0f}")
            finally:
                stop(gateway)
        finally:
            for process in (echo, mock):
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()

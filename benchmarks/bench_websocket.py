"""WebSocket gateway figures (issue 6): round trips/s, push fan-out/s, memory per idle session.

    python benchmarks/bench_websocket.py [--duration 5] [--sessions 100] [--idle 5000]

Processes (benchmarks/harness): the C echo upstream (../shared/bench/upstream,
built in a temp dir) or the bundled mock upstream (this file run as `mock`),
one `tlvproxy serve` process (1 worker, so in one process) on a json-mode
table, and the clients here, so the gateway's RSS is its own. Everything
shares this machine's cores.

- round trips/s: `--sessions` sessions, each sending json-mode `echo` requests
  in a closed loop (next request when the answer came), C echo upstream; and
  the gateway's CPU time (user and system) per round trip in the same window.
- push fan-out/s: `--sessions` receiver sessions (one uid each) and 10 senders
  calling `send_message` to them in a loop; pushes delivered per second, mock
  upstream (which pushes `new_message` to the recipient's sessions).
- memory per idle session: the gateway's VmRSS before and after opening
  `--idle` sessions (each with its dedicated upstream connection), divided
  (harness/sessions.py).

Prints a verdict for issue 14's targets on round trips/s and idle memory.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import trio
from harness.figures import Column, FigureTable, print_target
from harness.processes import (
    ROOT,
    child,
    echo_upstream,
    raise_fd_limit,
    serving,
    tree_cpu_seconds,
)
from harness.sessions import RECEIVERS_UID_BASE, Client, FanOut, idle_memory
from harness.tables import write_table

SENDERS = 10
# Issue 14's targets: twice the 8,946 round trips/s this benchmark gave when
# the issue was filed, and at most 24 KiB per idle session.
TARGET_ROUND_TRIPS = 17_892
TARGET_IDLE_KIB = 24.0

TABLE = """\
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


# ---------------------------------------------------------------- measurements


async def round_trips(port: int, pid: int, sessions: int, duration: float) -> tuple[float, float]:
    """Round trips/s, and the gateway `pid`'s CPU microseconds per round trip."""
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
        cpu = tree_cpu_seconds(pid)
        counting = True
        started = time.perf_counter()
        await trio.sleep(duration)
        counting = False
        elapsed = time.perf_counter() - started
        cpu = tree_cpu_seconds(pid) - cpu
        stop = True
    for client in clients:
        await client.close()
    return count / elapsed, cpu / count * 1e6


async def push_fanout(port: int, receivers: int, duration: float) -> float:
    inboxes = [await Client.connect(port, RECEIVERS_UID_BASE + i) for i in range(receivers)]
    senders = [await Client.connect(port, 1 + i) for i in range(SENDERS)]
    fan_out = FanOut()
    delivered = 0

    async def receive(client: Client) -> None:
        nonlocal delivered
        while True:
            message = await client.receive()
            if message.get("push") and fan_out.counting:
                delivered += 1

    async with trio.open_nursery() as nursery:
        # Each receiver registers its uid with the upstream by one request.
        for client in inboxes:
            await client.send({"cmd": "echo", "seq": 0, "body": {}})
            await client.receive()
        for client in inboxes:
            nursery.start_soon(receive, client)
        elapsed = await fan_out.send(senders, receivers, duration)
        nursery.cancel_scope.cancel()
    return delivered / elapsed


def main() -> None:
    if sys.argv[1:] == ["mock"]:
        run_mock()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--idle", type=int, default=5000)
    args = parser.parse_args()
    raise_fd_limit()  # the gateway inherits it: --idle sessions each hold two descriptors
    with (
        tempfile.TemporaryDirectory(prefix="bench-ws-") as tmp_name,
        echo_upstream(Path(tmp_name)) as echo_port,
        child([sys.executable, __file__, "mock"]) as (_, mock_node),
    ):
        tmp = Path(tmp_name)
        proto = ROOT / "proto"
        echo = write_table(
            tmp / "echo.yaml", TABLE.format(proto=proto, node=f"127.0.0.1:{echo_port}")
        )
        with serving(echo) as gateway:
            round_trip_rate, round_trip_cpu = trio.run(
                round_trips, echo.http, gateway.pid, args.sessions, args.duration
            )
            per_session = trio.run(idle_memory, echo.http, gateway.pid, args.idle)
        mock = write_table(tmp / "mock.yaml", TABLE.format(proto=proto, node=mock_node))
        with serving(mock) as gateway:
            push_rate = trio.run(push_fanout, mock.http, args.sessions, args.duration)
    rates = FigureTable(
        f"json-mode sessions, {args.duration:g} s measured after a 1 s warm-up",
        "load",
        44,
        [Column("per second"), Column("gateway CPU us each", ".1f")],
    )
    rates.row(
        f"round trips, {args.sessions} sessions (C echo upstream)", round_trip_rate, round_trip_cpu
    )
    rates.row(f"push fan-out, {args.sessions} receivers (mock upstream)", push_rate, None)
    FigureTable(
        f"gateway RSS per idle session, {args.idle} sessions, upstream connections included",
        "sessions",
        8,
        [Column("KiB/session", ".1f", 12), Column("MiB in all", ".1f", 11)],
    ).row("ws", per_session, per_session * args.idle / 1024)
    print_target("round trips/s", round_trip_rate, ">=", TARGET_ROUND_TRIPS, ",.0f")
    print_target("KiB per idle session", per_session, "<=", TARGET_IDLE_KIB, ".1f")


if __name__ == "__main__":
    main()

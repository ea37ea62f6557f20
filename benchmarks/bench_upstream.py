"""Round trips per second through an upstream pool to the C echo upstream.

Builds ../shared/bench/upstream/tlv_echo and starts it on a free port
(benchmarks/harness, which also prints the figures). Every row keeps 256
requests in flight and reports the median of 3 rounds after a warm-up round:

- the headline, a pool micro-benchmark shaped like the REST hot path (STYLE
  5.1): `Pool.submit` with a completion object per request whose `on_reply`
  checks the echoed body, counts, and submits the next request (a closed
  loop), each with a real deadline (`trio.current_time() + TIMEOUT`, so every
  request goes through the connection's deadline heap and the pool's
  `DeadlineTimer`), and a real `Metrics()`; through one pooled connection,
  then through 16;
- for comparison, the awaitable `Pool.request` from 256 tasks, each request in
  its own `trio.move_on_after` (STYLE 5.2), metrics on;
- for scale, bare trio on one connection (no pool, no metrics, no deadlines):
  the smallest loop of each shape, the ceiling of this machine.

The garbage collector is set up as `tlvproxy serve` sets it (`tune_gc`).
Target: at least 150,000 round trips/s for the headline row on one connection.
Exits non-zero when a reply does not echo its request, or a request fails.

Run: .venv/bin/python benchmarks/bench_upstream.py [--requests N] [--case NAME]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from harness.figures import Column, FigureTable, print_target
from harness.processes import echo_upstream

from tlvproxy.config.model import Address, NodeSpec, UpstreamSpec
from tlvproxy.framing import default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.serving import tune_gc
from tlvproxy.upstream.pool import open_pool

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame
    from tlvproxy.upstream.pool import Pool

IN_FLIGHT = 256
BODY = b'{"user":"alice","text":"hello, world"}'
COMMAND = 0x1003
TIMEOUT = 5.0
ROUNDS = 3
TARGET = 150_000  # round trips/s of the headline row, one connection
# A round that takes longer than this has hung (a lost reply): fail, do not wait.
ROUND_LIMIT = 60.0


class BenchFailure(Exception):
    """A reply that does not echo its request, or a request that failed."""


def upstream_spec(port: int, connections: int) -> UpstreamSpec:
    return UpstreamSpec(
        name="bench",
        nodes=(NodeSpec(address=Address("127.0.0.1", port)),),
        connections=connections,
        timeout=TIMEOUT,
    )


async def median_rate(run_round: Callable[[int], Awaitable[None]], requests: int) -> float:
    """Round trips/s: the median of ROUNDS rounds of `requests`, after a warm-up."""
    with trio.fail_after(ROUND_LIMIT):
        await run_round(max(IN_FLIGHT * 20, requests // 4))
    rates = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        with trio.fail_after(ROUND_LIMIT):
            await run_round(requests)
        rates.append(requests / (time.perf_counter() - started))
    return statistics.median(rates)


def check_connections(pool: Pool, connections: int) -> None:
    opened = sum(state.connections for state in pool.node_states())
    if opened != connections:
        raise BenchFailure(f"{opened} connections open, {connections} expected")


# ---------------------------------------------------------------- Pool.submit


class _ClosedLoop:
    """Keeps IN_FLIGHT requests in flight through `Pool.submit` until `total` are done."""

    def __init__(self, pool: Pool, total: int) -> None:
        self.pool = pool
        self.remaining = total  # not submitted yet
        self.outstanding = 0  # submitted, not completed
        self.wrong = 0
        self.error: GatewayError | None = None
        self.finished = trio.Event()

    def start(self) -> None:
        for _ in range(min(IN_FLIGHT, self.remaining)):
            self.submit()

    def submit(self) -> None:
        self.remaining -= 1
        self.outstanding += 1
        self.pool.submit(_Echo(self), COMMAND, BODY, uid=7, deadline=trio.current_time() + TIMEOUT)

    def ended_one(self) -> None:
        self.outstanding -= 1
        if self.remaining > 0 and self.error is None:
            self.submit()
        elif self.outstanding == 0:
            self.finished.set()


class _Echo:
    """One request's completion, as server/rest.py's `_Exchange` is one."""

    __slots__ = ("loop",)

    def __init__(self, loop: _ClosedLoop) -> None:
        self.loop = loop

    def on_reply(self, frame: Frame, node: str) -> None:
        loop = self.loop
        if frame.body != BODY or frame.status:
            loop.wrong += 1
        loop.ended_one()

    def on_error(self, error: GatewayError, node: str | None) -> None:
        loop = self.loop
        if loop.error is None:
            loop.error = error
        loop.ended_one()


async def submit_rate(port: int, connections: int, requests: int) -> float:
    async with open_pool(upstream_spec(port, connections), default_layout(), Metrics()) as pool:

        async def run_round(count: int) -> None:
            loop = _ClosedLoop(pool, count)
            loop.start()
            await loop.finished.wait()
            if loop.error is not None:
                raise BenchFailure(f"a request failed: {loop.error!r}")
            if loop.wrong:
                raise BenchFailure(f"{loop.wrong} replies did not echo the body")

        rate = await median_rate(run_round, requests)
        check_connections(pool, connections)
    return rate


# ---------------------------------------------------------------- Pool.request


async def request_rate(port: int, connections: int, requests: int) -> float:
    async with open_pool(upstream_spec(port, connections), default_layout(), Metrics()) as pool:
        remaining = 0
        wrong = 0

        async def worker() -> None:
            nonlocal remaining, wrong
            while remaining > 0:
                remaining -= 1
                with trio.move_on_after(TIMEOUT) as scope:
                    reply = await pool.request(COMMAND, BODY, uid=7)
                if scope.cancelled_caught:
                    raise BenchFailure("a request timed out")
                if reply.frame.body != BODY or reply.frame.status:
                    wrong += 1

        async def run_round(count: int) -> None:
            nonlocal remaining
            remaining = count
            async with trio.open_nursery() as nursery:
                for _ in range(IN_FLIGHT):
                    nursery.start_soon(worker)
            if wrong:
                raise BenchFailure(f"{wrong} replies did not echo the body")

        rate = await median_rate(run_round, requests)
        check_connections(pool, connections)
    return rate


# ---------------------------------------------------------------- bare trio

HEADER = struct.Struct(">BBHIIIHH")  # version flags command seq uid length status reserved


class _BareConnection:
    """The smallest multiplexing loop trio allows: one reader, one writer, one send
    per scheduler pass; what a reply does is up to the caller (`waiters[seq]`)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.waiters: dict[int, Callable[[bool], None]] = {}
        self.seq = 0
        self.outbox: list[bytes] = []
        self.wake = trio.Event()

    def submit(self, reply: Callable[[bool], None]) -> None:
        self.seq = seq = (self.seq + 1) & 0xFFFFFFFF
        self.waiters[seq] = reply
        self.outbox.append(
            b"\x09" + HEADER.pack(1, 0, COMMAND, seq, 7, len(BODY), 0, 0) + BODY + b"\x0a"
        )
        self.wake.set()

    async def write_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            data = b"".join(self.outbox)
            self.outbox.clear()
            await self.stream.send_all(data)

    async def read_forever(self) -> None:
        buffer = bytearray()
        waiters = self.waiters
        size = HEADER.size + 2
        while True:
            buffer += await self.stream.receive_some(65536)
            pos = 0
            while len(buffer) - pos >= size:
                seq, length = HEADER.unpack_from(buffer, pos + 1)[3:6:2]
                end = pos + size + length
                if len(buffer) < end:
                    break
                waiters.pop(seq)(buffer[pos + 21 : end - 1] == BODY)
                pos = end
            del buffer[:pos]


async def bare_rate(port: int, requests: int, tasks: bool) -> float:
    """`tasks`: a task per request awaiting an Event in a move_on_after (the
    `Pool.request` shape); else the reader completes and submits the next one
    (the `Pool.submit` shape)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = _BareConnection(stream)
    remaining = outstanding = wrong = 0
    finished = trio.Event()

    def closed_loop_reply(ok: bool) -> None:
        nonlocal remaining, outstanding, wrong
        outstanding -= 1
        wrong += not ok
        if remaining > 0:
            remaining -= 1
            outstanding += 1
            conn.submit(closed_loop_reply)
        elif outstanding == 0:
            finished.set()

    async def worker() -> None:
        nonlocal remaining, wrong
        while remaining > 0:
            remaining -= 1
            event = trio.Event()
            result: list[bool] = []

            def reply(ok: bool, event: trio.Event = event, result: list[bool] = result) -> None:
                result.append(ok)
                event.set()

            conn.submit(reply)
            with trio.move_on_after(TIMEOUT):
                await event.wait()
            wrong += result != [True]

    async def run_round(count: int) -> None:
        nonlocal remaining, outstanding, finished
        remaining = count
        if tasks:
            async with trio.open_nursery() as workers:
                for _ in range(IN_FLIGHT):
                    workers.start_soon(worker)
        else:
            finished = trio.Event()
            for _ in range(min(IN_FLIGHT, count)):
                remaining -= 1
                outstanding += 1
                conn.submit(closed_loop_reply)
            await finished.wait()
        if wrong:
            raise BenchFailure(f"{wrong} replies did not echo the body")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.write_forever)
        nursery.start_soon(conn.read_forever)
        rate = await median_rate(run_round, requests)
        nursery.cancel_scope.cancel()
    await stream.aclose()
    return rate


# ---------------------------------------------------------------- the table

# name -> (label, the rate for (port, connections, requests), connection counts)
CASES: dict[str, tuple[str, Callable[[int, int, int], float], tuple[int, ...]]] = {
    "submit": (
        "Pool.submit, completion per request, deadline heap, metrics",
        lambda port, conns, n: trio.run(submit_rate, port, conns, n),
        (1, 16),
    ),
    "request": (
        "Pool.request, 256 tasks, move_on_after, metrics",
        lambda port, conns, n: trio.run(request_rate, port, conns, n),
        (1, 16),
    ),
    "bare-submit": (
        "bare trio, completion at the reader (ceiling)",
        lambda port, _conns, n: trio.run(bare_rate, port, n, False),
        (1,),
    ),
    "bare-request": (
        "bare trio, 256 tasks, Event + move_on_after",
        lambda port, _conns, n: trio.run(bare_rate, port, n, True),
        (1,),
    ),
}


def print_table(port: int, cases: list[str], connection_counts: tuple[int, ...], n: int) -> None:
    """Run `cases` and print their rows as they finish; raises BenchFailure."""
    figures = FigureTable(
        f"upstream round trips/s: {IN_FLIGHT} in flight, {len(BODY)}-byte body, "
        f"median of {ROUNDS} rounds of {n:,} after a warm-up",
        "case",
        max(len(CASES[name][0]) for name in cases),
        [Column("1 conn", ",.0f", 9), Column("16 conns", ",.0f", 9)],
    )
    headline = None
    for name in cases:
        label, rate_of, counts = CASES[name]
        cells: list[float | None] = []
        for connections in (1, 16):
            if connections in counts and connections in connection_counts:
                rate = rate_of(port, connections, n)
                cells.append(rate)
                if name == "submit" and connections == 1:
                    headline = rate
            else:
                cells.append(None)
        figures.row(label, *cells)
    if headline is not None:
        print_target("Pool.submit, 1 connection", headline, ">=", TARGET, ",.0f", "/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150_000, help="per round")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="only these rows")
    parser.add_argument(
        "--connections", type=int, choices=(1, 16), help="only this connection count"
    )
    args = parser.parse_args()
    tune_gc()
    cases = args.case or list(CASES)
    counts = (1, 16) if args.connections is None else (args.connections,)
    failures: list[BaseException] = []
    with (
        tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir,
        echo_upstream(Path(workdir)) as port,
    ):
        try:
            print_table(port, cases, counts, args.requests)
        except* BenchFailure as group:  # raised in a nursery, so in a group
            failures.append(group)
    for failure in failures:
        sys.exit(f"bench_upstream: {'; '.join(map(str, _leaves(failure)))}")


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


if __name__ == "__main__":
    main()

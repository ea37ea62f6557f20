"""Round trips per second through an upstream pool to the C echo upstream.

Builds ../shared/bench/upstream/tlv_echo (its sources are copied to a temporary
directory, the shared tree is read-only), starts it on a free port, and drives
`Pool.request` from 256 concurrent tasks: through one pooled connection, then
through 16, each request in its own `trio.move_on_after` (as server/rest.py does)
and metrics on. Then the same without the per-request cancel scope, and, for
scale, a bare trio loop (one reader task, one writer task, an Event per waiter)
with and without a per-request cancel scope: the ceiling of this machine. The
garbage collector is set up as `tlvproxy serve` sets it (`tune_gc`).

Run: .venv/bin/python benchmarks/bench_upstream.py [--requests N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from tlvproxy.config.model import Address, NodeSpec, UpstreamSpec
from tlvproxy.framing import default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.supervisor import tune_gc
from tlvproxy.upstream.pool import open_pool

ECHO_SOURCES = Path(__file__).resolve().parents[2] / "shared" / "bench" / "upstream"
IN_FLIGHT = 256
BODY = b'{"user":"alice","text":"hello, world"}'
COMMAND = 0x1003
TIMEOUT = 5.0


def build_echo(workdir: Path) -> Path:
    """Copy the echo server's sources to `workdir`, build it there, return the binary."""
    source = Path(os.environ.get("TLV_ECHO_SOURCES", ECHO_SOURCES))
    for name in ("Makefile", "tlv_echo.c"):
        shutil.copy(source / name, workdir / name)
    subprocess.run(["make", "-s", "-C", str(workdir), "tlv_echo"], check=True)
    return workdir / "tlv_echo"


def start_echo(binary: Path) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(
        [str(binary), "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    match = re.search(r"127\.0\.0\.1:(\d+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"tlv_echo did not say where it listens: {line!r}")
    return process, int(match.group(1))


async def pool_rate(port: int, connections: int, requests: int, deadline: bool) -> float:
    spec = UpstreamSpec(
        name="bench",
        nodes=(NodeSpec(address=Address("127.0.0.1", port)),),
        connections=connections,
        timeout=TIMEOUT,
    )
    metrics = Metrics()
    async with open_pool(spec, default_layout(), metrics) as pool:
        remaining = requests
        failures = 0

        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                if deadline:
                    with trio.move_on_after(TIMEOUT):
                        reply = await pool.request(COMMAND, BODY, uid=7)
                else:
                    reply = await pool.request(COMMAND, BODY, uid=7)
                if reply.frame.body != BODY:
                    failures += 1

        async def run(count: int) -> float:
            nonlocal remaining
            remaining = count
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(IN_FLIGHT):
                    nursery.start_soon(worker)
            return time.perf_counter() - started

        await run(IN_FLIGHT * 20)  # warm-up: opens the connections
        elapsed = await run(requests)
        if failures:
            raise RuntimeError(f"{failures} replies did not echo the body")
        opened = sum(state.connections for state in pool.node_states())
        assert opened == connections, (opened, connections)
    return requests / elapsed


async def bare_rate(port: int, requests: int, deadline: bool) -> float:
    """The ceiling: the smallest multiplexing loop trio allows, no pool, no metrics."""
    header = struct.Struct(">BBHIIIHH")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    waiters: dict[int, trio.Event] = {}
    outbox: list[bytes] = []
    wake = [trio.Event()]

    async def writer() -> None:
        while True:
            await wake[0].wait()
            wake[0] = trio.Event()
            data = b"".join(outbox)
            outbox.clear()
            await stream.send_all(data)

    async def reader() -> None:
        buffer = bytearray()
        while True:
            buffer += await stream.receive_some(65536)
            pos = 0
            while len(buffer) - pos >= 22:
                seq, length = header.unpack_from(buffer, pos + 1)[3:6:2]
                end = pos + 22 + length
                if len(buffer) < end:
                    break
                waiters.pop(seq).set()
                pos = end
            del buffer[:pos]

    remaining = requests
    next_seq = 0

    async def worker() -> None:
        nonlocal remaining, next_seq
        while remaining > 0:
            remaining -= 1
            next_seq += 1
            seq = next_seq
            event = trio.Event()
            waiters[seq] = event
            outbox.append(
                b"\x09" + header.pack(1, 0, COMMAND, seq, 7, len(BODY), 0, 0) + BODY + b"\x0a"
            )
            wake[0].set()
            if deadline:
                with trio.move_on_after(TIMEOUT):
                    await event.wait()
            else:
                await event.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(reader)
        started = time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(IN_FLIGHT):
                workers.start_soon(worker)
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    await stream.aclose()
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300_000)
    args = parser.parse_args()
    tune_gc()
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        process, port = start_echo(build_echo(Path(workdir)))
        try:
            print(f"upstream round trips/s, {IN_FLIGHT} requests in flight, {len(BODY)}-byte body")
            for deadline in (True, False):
                scope = "move_on_after per request" if deadline else "no per-request scope  "
                for connections in (1, 16):
                    rate = trio.run(pool_rate, port, connections, args.requests, deadline)
                    print(
                        f"  pool, {connections:2d} connection(s), {scope}, metrics on: {rate:9,.0f}"
                    )
            for deadline in (True, False):
                scope = "move_on_after per request" if deadline else "no per-request scope  "
                rate = trio.run(bare_rate, port, args.requests, deadline)
                print(f"  bare trio loop, 1 connection, {scope}:          {rate:9,.0f}")
        finally:
            process.terminate()
            process.wait(5)


if __name__ == "__main__":
    main()

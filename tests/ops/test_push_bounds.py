"""What a push session's clients can make the gateway hold (docs/push-sessions.md),
through the real gateway process: event streams whose clients stop reading.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import wait_for
from tests.ops.push_client import PATH, Session, Stream, push_to, stream_request

if TYPE_CHECKING:
    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow

SESSIONS = {
    "path": PATH,
    "upstream": "im",
    "hash_on": "query.did",
    "uid": "query.uid",
    "idle_timeout": "3s",
    "max_buffered": 256,
}
TEXT = "x" * 64_000  # about 64 KB of pushed text
# The gateway's bounds on a stream whose client does not read (docs/push-sessions.md
# "Server-sent events"): the time it waits for the client to take a byte, and
# the time an ended stream has to write its last event.
STALL_TIMEOUT = 15.0
CLOSE_TIMEOUT = 5.0


def server_side(port: int, client: socket.socket) -> str | None:
    """The TCP state (hex, as /proc/net/tcp has it) of the gateway's end of
    `client`'s connection to `port`; None once the kernel has forgotten it.
    01 is ESTABLISHED: the gateway still holds it open."""
    client_port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if (local_port, remote_port) == (port, client_port):
            return fields[3]
    return None


def held(port: int, client: socket.socket) -> bool:
    return server_side(port, client) == "01"


def stuck_stream(port: int, target: str) -> socket.socket:
    """GET `target` (an event stream) from a client that never reads: its
    receive window is small and soon shut."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(stream_request(target))
    wait_for(lambda: held(port, sock), "the stream's connection")
    return sock


def descriptors(gateway: Gateway) -> int:
    return len(os.listdir(f"/proc/{gateway.process.pid}/fd"))


def test_a_stream_whose_client_stops_reading_is_ended_within_bounds(
    procs: Processes, upstream: str
) -> None:
    # No rate limit: the test pushes hundreds of messages at once.
    gateway = procs.gateway(upstream, sessions=SESSIONS, rate_limits=[])
    port = gateway.http_port
    session = Session(port, "uid=81&did=a")
    session.register()
    # 4 MiB kept (the most a session keeps): more than the kernel's buffers
    # take for a client that does not read, so a stream resuming from 0
    # starts with bytes it cannot write.
    for n in range(70):
        push_to(port, 81, f"{n}{TEXT}")
    before = descriptors(gateway)
    events = f"{session.path}/events?after=0"

    # More than 1 MiB more waiting: the stream ends at once.
    first = stuck_stream(port, events)
    for n in range(80):
        push_to(port, 81, f"more {n}{TEXT}")
    wait_for(lambda: not held(port, first), "the stream past 1 MiB unsent to end", 3.0)

    # Replaced, it has CLOSE_TIMEOUT to write its last event, then ends.
    second = stuck_stream(port, events)
    time.sleep(0.5)  # the stream writes what the socket takes, and waits
    newer = Stream(port, f"{session.path}/events?after=150")
    began = time.monotonic()
    wait_for(lambda: not held(port, second), "the replaced stream to end", CLOSE_TIMEOUT + 3)
    assert time.monotonic() - began > CLOSE_TIMEOUT - 1
    newer.close()

    # Nothing taken for STALL_TIMEOUT: it ends, and the session is idle again.
    third = stuck_stream(port, events)
    began = time.monotonic()
    wait_for(lambda: not held(port, third), "the stalled stream to end", STALL_TIMEOUT + 5)
    assert time.monotonic() - began > STALL_TIMEOUT - 1
    wait_for(lambda: descriptors(gateway) <= before, "the streams' descriptors to close")
    record = wait_for(
        lambda: next(
            (r for r in gateway.process.records() if r["message"] == "push session"), None
        ),
        "the session to end idle",
    )
    assert record["closed"] == "idle_timeout"
    stalled = [
        r
        for r in gateway.process.records()
        if r["message"] == "event stream client not reading: ending the stream"
    ]
    assert len(stalled) == 2  # past 1 MiB, and stalled; the replaced one is not logged
    for sock in (first, second, third):
        sock.close()

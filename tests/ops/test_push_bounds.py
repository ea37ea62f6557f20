"""What a push session's clients can make the gateway hold (docs/push-sessions.md),
through the real gateway process: event streams whose clients stop reading,
and requests passed between workers that are out of descriptors.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest

from tests.e2e.conftest import write_table
from tests.ops.procs import accepted, call, children, free_port, try_call, wait_for
from tests.ops.push_client import PATH, Session, Stream, push_to, stream_request
from tests.ops.test_connection_limits import (
    close_all,
    descriptors_for,
    limited_serve,
)
from tests.ops.tls_helpers import GW_ENTRY, Certificates, tls_socket

if TYPE_CHECKING:
    from tests.ops.procs import Gateway, Process, Processes

pytestmark = pytest.mark.slow

SESSIONS = {
    "path": PATH,
    "upstream": "im",
    "hash_on": "query.did",
    "uid": "query.uid",
    "idle_timeout": "3s",
    "poll_timeout": "1s",
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


@attrs.frozen
class LimitedGateway:
    """A `tlvproxy serve` of two workers under a descriptor limit, on http and https."""

    process: Process
    http: int
    https: int
    admin: int


def limited_tls_gateway(
    procs: Processes, upstream: str, certificates: Certificates, nofile: int
) -> LimitedGateway:
    """Two workers under RLIMIT_NOFILE `nofile`, on http and https, with `sessions`; ready."""
    directory = procs.directory / "tls"
    directory.mkdir()
    certificates.copy_to(directory)
    http, https, admin = free_port(), free_port(), free_port()
    path = write_table(
        directory,
        upstream,
        listen={
            "http": f"127.0.0.1:{http}",
            "https": f"127.0.0.1:{https}",
            "admin": f"127.0.0.1:{admin}",
        },
        tls={"certificates": [GW_ENTRY]},
        # The storm takes 10 s and more on a slow box, with no message for
        # the session on some of it: it must not end idle meanwhile.
        sessions={**SESSIONS, "idle_timeout": "120s"},
        rate_limits=[],
        # Every client is 127.0.0.1: only the descriptors limit them.
        limits={"max_connections_per_ip": 10000},
    )
    process = limited_serve(procs, path, nofile, None, "--workers", "2")

    def ready() -> bool:
        assert process.alive(), process.text()
        answer = try_call(admin, "GET", "/readyz", timeout=2.0)
        return answer is not None and answer.status == 200

    wait_for(ready, "the gateway's /readyz")
    return LimitedGateway(process, http, https, admin)


def test_a_worker_out_of_descriptors_survives_the_requests_passed_to_it(
    procs: Processes, upstream: str, tmp_path: Path
) -> None:
    certificates = Certificates(tmp_path / "certs")
    gateway = limited_tls_gateway(procs, upstream, certificates, 700)
    process = gateway.process
    pids = wait_for(
        lambda: {
            r["worker"]: r["worker_pid"]
            for r in process.records()
            if r["message"] == "worker started"
        },
        "the workers to start",
    )
    session = Session(gateway.http, "uid=91&did=a")
    session.register()
    owner = int(session.id.split("-", 1)[0], 16)
    other = 1 - owner
    context = certificates.client_context()
    message = (
        f"POST {session.path}/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\n"
        '{"cmd": "echo", "seq": 1}\n'
    ).encode()
    relayed: list[socket.socket] = []
    with descriptors_for(1000):
        try:
            # TLS connections to the worker without the session: it relays
            # each to the owner, holding a descriptor more than the
            # connection, until it can hold no more.
            for _ in range(900):
                try:
                    sock = tls_socket(gateway.https, context)
                except OSError:
                    continue  # refused
                client_port = sock.getsockname()[1]
                held = accepted(gateway.https, {client_port}, {pids[other]})
                if client_port not in held:
                    sock.close()  # the owner's
                    continue
                sock.settimeout(2)
                try:
                    sock.sendall(message)
                    answered = sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                except OSError:
                    answered = False
                if not answered:
                    sock.close()
                    break  # it has no descriptor for another
                relayed.append(sock)
            assert len(relayed) > 100
            # Connections that do not even start their TLS handshake take
            # whatever descriptors it has left.
            relayed += [
                socket.create_connection(("127.0.0.1", gateway.https), timeout=5) for _ in range(60)
            ]
            # Requests for the other worker's sessions, passed to it.
            for _ in range(20):
                answer = try_call(
                    gateway.http, "GET", f"{PATH}/{other}-AAAAAAAAAAAAAAAAAAAAAA/poll", timeout=2
                )
                assert answer is None or answer.status in (404, 503), answer
        finally:
            close_all(relayed)
    # Both workers lived through it: the session is still there, and the
    # gateway serves again.
    assert not [r for r in process.records() if r["message"] == "worker died; restarting"]
    assert set(children(process.pid)) == set(pids.values())
    wait_for(
        lambda: call(gateway.http, "POST", "/v1/echo", b"{}").status == 200,
        "the gateway to serve again",
    )

    # Each worker gets its descriptors back as it notices the closed
    # connections, not at once: wait until the session answers ten messages
    # in a row, each on a new connection to either worker.
    def serves_the_session() -> bool:
        return all(
            session.send({"cmd": "echo", "seq": seq}).json()
            == {"cmd": "echo", "seq": seq, "status": 0, "body": {}}
            for seq in range(10)
        )

    wait_for(serves_the_session, "both workers to serve the session again")

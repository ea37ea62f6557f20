"""What a request holds in a real `tlvproxy serve` process is bounded by the
limits whatever its framing (docs/reference.md "Limits").

The adversarial pass's input: a 1,048,000-byte body sent as 1,048,000 chunks of
one byte (`1\\r\\na\\r\\n`, 6 MB on the wire) held +74 MiB of RSS per connection with
h11 and +9.5 MiB with httptools, where the same body with Content-Length holds
1 MiB. Here several connections each send all of such a body but its last
bytes; once the gateway has read everything sent, its RSS growth is compared
with the same bodies sent with Content-Length, each in a fresh process.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.ops.procs import DEADLINE, children, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
CONNECTIONS = 4
SIZE = 1_048_000  # under the table's max_request_body (1 MiB)
HEAD = (
    b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\n"
)
HELD = 3  # bytes of each request sent only after the measure


def by_length(size: int) -> bytes:
    """A request whose body, a JSON string of `size` bytes, has a Content-Length."""
    return HEAD + b"Content-Length: %d\r\n\r\n" % size + b'"' + b"a" * (size - 2) + b'"'


def by_chunks(size: int) -> bytes:
    """The same request with its body in one-byte chunks."""
    chunks = b'1\r\n"\r\n' + b"1\r\na\r\n" * (size - 2) + b'1\r\n"\r\n'
    return HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


def table(parser: str) -> dict[str, Any]:
    """Table overrides: the parser, and time enough for 6 MB of chunks on a busy box."""
    return {"http_parser": parser, "limits": {"header_timeout": "60s"}}


def rss(pid: int) -> int:
    """The resident set size of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def queues(port: int) -> dict[tuple[int, int], tuple[int, int]]:
    """{(local port, remote port): (send queue, receive queue)} of the IPv4 TCP
    sockets on 127.0.0.1 that have `port` at either end."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rsplit(":", 1)[1], 16)
        remote = int(fields[2].rsplit(":", 1)[1], 16)
        if port in (local, remote):
            send, receive = (int(value, 16) for value in fields[4].split(":"))
            found[local, remote] = (send, receive)
    return found


def held_growth(gateway: Gateway, framing: Callable[[int], bytes]) -> int:
    """The gateway's RSS growth, in bytes, while CONNECTIONS connections each
    hold a request of SIZE bytes but its last HELD bytes; then each request is
    completed and must be answered 200."""
    pid = gateway.process.pid
    assert children(pid) == []  # one process serves
    port = gateway.http_port
    # A small request of the same framing first, so that what the first
    # request allocates once (imports, caches) is in the baseline; small, so
    # that its body leaves no memory free for the measured ones to reuse.
    assert exchange([connect(port)], framing(100)) == [200]
    wire = framing(SIZE)
    before = rss(pid)
    clients = [connect(port) for _ in range(CONNECTIONS)]
    for client in clients:
        client.sendall(wire[:-HELD])
    ports = {client.getsockname()[1] for client in clients}

    def all_read() -> bool:
        sockets = queues(port)
        return all(
            sockets.get((client_port, port), (1, 1))[0] == 0
            and sockets.get((port, client_port), (1, 1))[1] == 0
            for client_port in ports
        )

    wait_for(all_read, "the gateway to read every byte sent")
    time.sleep(0.2)  # the last bytes read are decoded
    growth = rss(pid) - before
    assert exchange(clients, wire[-HELD:]) == [200] * CONNECTIONS
    return growth


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


def exchange(clients: list[socket.socket], data: bytes) -> list[int]:
    """Send `data` on each client; the status of each answer (read until close)."""
    statuses = []
    for client in clients:
        with client:
            client.sendall(data)
            answer = bytearray()
            while chunk := client.recv(65536):
                answer += chunk
        statuses.append(int(answer.split(b" ", 2)[1]))
    return statuses


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_body_in_one_byte_chunks_holds_what_it_holds_with_content_length(
    procs: Processes, upstream: str, parser: str
) -> None:
    length = held_growth(procs.gateway(upstream, **table(parser)), by_length)
    chunks = held_growth(procs.gateway(upstream, **table(parser)), by_chunks)
    per_connection = chunks / CONNECTIONS / MiB
    assert chunks <= 2 * length + 2 * MiB, (
        f"{per_connection:.1f} MiB per connection chunked, "
        f"{length / CONNECTIONS / MiB:.1f} MiB with Content-Length"
    )
    assert per_connection < 4

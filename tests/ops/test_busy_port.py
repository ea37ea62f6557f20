"""`tlvproxy serve` on a port that is taken (issue 16, finding 9;
docs/operations.md "Starting").

It used to print a ~40-line ExceptionGroup traceback. A `serve` that cannot
bind its listeners exits 1 with one line naming the address and the reason,
and reports nothing as ready: with one worker and with a supervisor, for the
HTTP and for the admin listener. The port is held by a plain listening socket,
or, as another gateway's workers hold it, by one with SO_REUSEPORT (which the
workers' own SO_REUSEPORT would otherwise silently share).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import DEADLINE, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow


def _occupy(port: int, *, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("listener", ["http", "admin"])
def test_serve_on_a_busy_port_exits_1_with_one_line(
    upstream: str, procs: Processes, held: list[socket.socket], workers: int, listener: str
) -> None:
    path, http_port, admin_port = procs.table(upstream, workers=workers)
    port = http_port if listener == "http" else admin_port
    held.append(_occupy(port))
    process = procs.start("gateway", "serve", "-c", str(path))
    assert process.wait(DEADLINE) == 1
    _assert_one_line(process.text(), f"127.0.0.1:{port}")


def test_workers_do_not_share_a_port_another_process_holds(
    upstream: str, procs: Processes, held: list[socket.socket]
) -> None:
    # Another gateway's workers listen with SO_REUSEPORT; ours must not join them.
    path, http_port, _ = procs.table(upstream, workers=2)
    held.append(_occupy(http_port, reuse_port=True))
    process = procs.start("gateway", "serve", "-c", str(path))
    assert process.wait(DEADLINE) == 1
    _assert_one_line(process.text(), f"127.0.0.1:{http_port}")


def test_workers_that_cannot_listen_stop_the_supervisor(
    upstream: str, procs: Processes, held: list[socket.socket]
) -> None:
    # The port is free when the supervisor starts, and taken before its workers
    # bind it: they are not restarted again and again; `serve` exits 1.
    path, http_port, _ = procs.table(upstream, workers=2)
    process = procs.start("gateway", "serve", "-c", str(path))
    wait_for(lambda: "worker started" in process.text(), "a worker to start")
    held.append(_occupy(http_port))
    assert process.wait(DEADLINE) == 1
    _assert_one_line(process.text(), f"127.0.0.1:{http_port}", workers_started=True)


def _assert_one_line(output: str, address: str, *, workers_started: bool = False) -> None:
    assert "Traceback" not in output, output
    naming = [line for line in output.splitlines() if address in line]
    assert len(naming) == 1, output
    assert "in use" in naming[0], naming
    # Nothing was reported as listening, let alone ready.
    assert "gateway listening" not in output, output
    assert "worker restarted" not in output, output
    assert "worker died" not in output, output
    if not workers_started:
        assert "worker started" not in output, output

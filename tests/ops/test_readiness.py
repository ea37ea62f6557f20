"""`readiness.require_healthy_upstreams`: /readyz says 503 while a listed upstream
has no healthy node, so a load balancer routes around the gateway
(docs/operations.md "Readiness"). Through the real process and a real upstream
that stops and comes back."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from tests.fixtures import FIXTURE_TABLE
from tests.ops.procs import free_port, try_call, wait_for

if TYPE_CHECKING:
    from tests.ops.procs import Process, Processes


def readyz(port: int) -> tuple[int, object]:
    answer = try_call(port, "GET", "/readyz", timeout=2.0)
    assert answer is not None
    return answer.status, answer.json()


def start_upstream(procs: Processes, address: str) -> Process:
    process = procs.start(
        "upstream", "mock-upstream", "--listen", address, "-c", str(FIXTURE_TABLE)
    )
    host, port = address.rsplit(":", 1)

    def listening() -> bool:
        assert process.alive(), process.text()
        with socket.socket() as sock:
            return sock.connect_ex((host, int(port))) == 0

    wait_for(listening, f"the mock upstream on {address}")
    return process


def test_readyz_follows_the_health_of_a_required_upstream(procs: Processes) -> None:
    address = f"127.0.0.1:{free_port()}"
    upstream = start_upstream(procs, address)
    fast = {"heartbeat": {"command": 1, "interval": "100ms"}, "connect_timeout": "200ms"}
    gateway = procs.gateway(
        address,
        upstreams={
            "im": {
                "nodes": [address],
                "health": {"unhealthy_after": 2, "healthy_after": 1},
                **fast,
            },
            # No node of `other` answers, but it is not required.
            "other": {"nodes": [f"127.0.0.1:{free_port()}"], **fast},
        },
        readiness={"require_healthy_upstreams": ["im"]},
    )
    assert readyz(gateway.admin_port) == (200, {"status": "ready"})

    upstream.kill()
    wait_for(lambda: readyz(gateway.admin_port)[0] == 503, "/readyz to say 503")
    assert readyz(gateway.admin_port)[1] == {"status": "no healthy node", "upstreams": ["im"]}
    assert gateway.admin("GET", "/healthz").status == 200  # alive all the same

    start_upstream(procs, address)
    wait_for(lambda: readyz(gateway.admin_port)[0] == 200, "/readyz to say 200 again")

"""Graceful drain of a real `tlvproxy serve` process on SIGTERM (SPEC 7)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from typing import TYPE_CHECKING

import pytest
from wsproto.events import CloseConnection

from tests.ops.procs import Answer, WebSocket, answer_of, try_call, wait_for

if TYPE_CHECKING:
    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow

SLOW_UPSTREAM = {"timeout": "10s"}


class InFlight:
    """One request sent from a thread; `answer` or `error` once it ends."""

    def __init__(self, port: int, body: dict[str, int]) -> None:
        self.answer: Answer | None = None
        self.error: OSError | http.client.HTTPException | None = None
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        self._connection.connect()
        assert self._connection.sock is not None
        self.client_port: int = self._connection.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(body,), daemon=True)
        self._thread.start()

    def _run(self, body: dict[str, int]) -> None:
        try:
            self._connection.request("POST", "/v1/echo", body=json.dumps(body))
            self.answer = answer_of(self._connection.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            self.error = exc
        finally:
            self._connection.close()

    def join(self) -> None:
        self._thread.join(20)
        assert not self._thread.is_alive()


def started(gateway: Gateway, count: int = 1) -> None:
    """Wait until the upstream holds `count` requests (the gateway's in-flight count)."""

    def in_flight() -> bool:
        nodes = gateway.admin("GET", "/admin/config").json()["upstreams"]["im"]["nodes"]
        return sum(node["in_flight"] for node in nodes) >= count

    wait_for(in_flight, "the slow request to reach the upstream")


def test_sigterm_lets_a_slow_request_finish_and_closes_websockets(
    procs: Processes, upstream: str
) -> None:
    gateway = procs.gateway(upstream, upstreams={"im": SLOW_UPSTREAM})
    ws = WebSocket(gateway.http_port)
    ws.send({"cmd": "echo", "seq": 1, "body": {"hello": 1}})
    assert ws.receive() == {"cmd": "echo", "seq": 1, "status": 0, "body": {"hello": 1}}
    slow = InFlight(gateway.http_port, {"_delay_ms": 1500})
    started(gateway)

    gateway.process.send(signal.SIGTERM)

    closed = ws.receive()
    assert isinstance(closed, CloseConnection)
    assert closed.code == 1001
    ready = wait_for(lambda: try_call(gateway.admin_port, "GET", "/readyz"), "/readyz")
    assert ready.status == 503
    assert ready.json() == {"status": "draining"}
    assert try_call(gateway.http_port, "POST", "/v1/echo", body=b"{}") is None  # refused
    assert gateway.process.alive()  # the slow request still holds it
    slow.join()
    assert slow.error is None
    assert slow.answer is not None
    assert slow.answer.status == 200
    assert slow.answer.json() == {"_delay_ms": 1500}
    assert gateway.process.wait() == 0
    ws.close()


def test_shutdown_timeout_cuts_a_request_and_still_exits_0(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, shutdown_timeout="500ms", upstreams={"im": SLOW_UPSTREAM})
    slow = InFlight(gateway.http_port, {"_delay_ms": 8000})
    started(gateway)
    begun = time.monotonic()

    gateway.process.send(signal.SIGTERM)

    assert gateway.process.wait() == 0
    assert time.monotonic() - begun < 5  # well before the request's 8 s
    slow.join()
    assert slow.answer is None
    assert isinstance(slow.error, ConnectionError)
    warned = [r for r in gateway.process.records() if r["message"].startswith("shutdown_timeout")]
    assert len(warned) == 1


def test_a_second_sigterm_forces_the_exit(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, upstreams={"im": SLOW_UPSTREAM})
    slow = InFlight(gateway.http_port, {"_delay_ms": 8000})
    started(gateway)
    gateway.process.send(signal.SIGTERM)
    wait_for(
        lambda: any(r["message"] == "draining" for r in gateway.process.records()),
        "the drain to start",
    )

    gateway.process.send(signal.SIGTERM)

    assert gateway.process.wait() == 1
    slow.join()
    assert slow.answer is None

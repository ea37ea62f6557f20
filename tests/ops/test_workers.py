"""`tlvproxy serve --workers 2`: a supervisor and two worker processes on one
port (SPEC 7), its admin listener summing their metrics (SPEC 6)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import accepted, children, metric, rewrite, try_call, wait_for
from tests.ops.test_drain import InFlight
from tests.ops.test_reload import PROFILE, commands

if TYPE_CHECKING:
    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow


def workers_of(gateway: Gateway) -> set[int]:
    return set(children(gateway.process.pid))


def pids_serving(gateway: Gateway, path: str) -> set[int]:
    """The pids whose access records show a request for `path`."""
    return {
        r["pid"]
        for r in gateway.process.records()
        if r["message"] == "request" and r["path"] == path and r["status"] == 200
    }


def test_two_workers_share_the_port_reload_and_drain(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, "--workers", "2", commands=commands(profile=False))
    workers = workers_of(gateway)
    assert len(workers) == 2

    for n in range(40):  # each on a new connection: the kernel spreads them
        assert gateway.call("POST", "/v1/echo", {"n": n}).status == 200
    assert pids_serving(gateway, "/v1/echo") == workers
    values = gateway.metrics()
    assert metric(values, "tlvproxy_http_requests_total", route="echo", status="200") == 40
    assert metric(values, "tlvproxy_http_request_duration_seconds_count", route="echo") == 40
    [node] = gateway.admin("GET", "/admin/config").json()["upstreams"]["im"]["nodes"]
    assert node == {"address": upstream, "weight": 1, "healthy": True}

    # POST /admin/reload: validated by the supervisor, then every worker reloads.
    rewrite(gateway.table, commands=commands(profile=True))
    answer = gateway.admin("POST", "/admin/reload")
    assert answer.status == 200, answer
    wait_for(
        lambda: sum(r["message"] == "reload done" for r in gateway.process.records()) == 2,
        "both workers to reload",
    )
    for _ in range(40):
        assert gateway.call("GET", PROFILE).status == 200
    assert pids_serving(gateway, PROFILE) == workers

    # SIGHUP to the supervisor: the route goes away on every worker.
    rewrite(gateway.table, commands=commands(profile=False))
    gateway.process.send(signal.SIGHUP)
    wait_for(
        lambda: sum(r["message"] == "reload done" for r in gateway.process.records()) == 4,
        "both workers to reload again",
    )
    for _ in range(20):
        assert gateway.call("GET", PROFILE).status == 404
    values = gateway.metrics()
    assert metric(values, "tlvproxy_config_reloads_total", result="ok") == 2  # once per reload

    # A broken table: 400 from the supervisor, the workers keep serving.
    rewrite(gateway.table, commands=[{"name": "x", "command": "bad"}])
    assert gateway.admin("POST", "/admin/reload").status == 400
    assert gateway.call("POST", "/v1/echo", {"still": 1}).status == 200
    assert metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="error") == 1

    # SIGTERM: both workers drain (slow requests on both finish), the supervisor exits 0.
    slow = [InFlight(gateway.http_port, {"_delay_ms": 1500}) for _ in range(6)]
    wait_for(
        lambda: len(accepted(gateway.http_port, {r.client_port for r in slow}, workers)) == 6,
        "the workers to accept the slow requests",
    )
    gateway.process.send(signal.SIGTERM)
    # The signal is handled asynchronously: poll until /readyz says 503, which it
    # must do while the slow requests still hold the workers.
    wait_for(lambda: gateway.admin("GET", "/readyz").status == 503, "/readyz to answer 503")
    assert all(request.answer is None for request in slow)
    for request in slow:
        request.join()
        assert request.answer is not None, request.error
        assert request.answer.status == 200
    assert gateway.process.wait() == 0
    drained = {r["pid"] for r in gateway.process.records() if r["message"] == "gateway stopped"}
    assert drained == workers


def test_a_killed_worker_is_restarted(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, "--workers", "2")
    first = workers_of(gateway)
    victim = min(first)

    os.kill(victim, signal.SIGKILL)

    failures = 0
    answered = 0
    while len(workers_of(gateway) - {victim}) < 2 or not gateway.ready():
        answer = try_call(gateway.http_port, "POST", "/v1/echo", body=b"{}")
        if answer is None:
            failures += 1  # a connection the killed worker had accepted
        else:
            assert answer.status == 200
            answered += 1
        assert answered + failures < 20000, "no worker was started again"
    assert failures <= 2
    assert answered > 0  # the surviving worker answered while the other was down
    now = workers_of(gateway)
    assert victim not in now
    assert len(now - first) == 1
    restarted = (now - first).pop()
    for n in range(40):
        assert gateway.call("POST", "/v1/echo", {"n": n}).status == 200
    assert restarted in pids_serving(gateway, "/v1/echo")
    died = [r for r in gateway.process.records() if r["message"] == "worker died; restarting"]
    assert died[0]["exit_code"] == -signal.SIGKILL
    gateway.process.send(signal.SIGTERM)
    assert gateway.process.wait() == 0


def test_workers_drain_when_the_supervisor_is_killed(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, "--workers", "2")
    workers = workers_of(gateway)
    assert len(workers) == 2

    os.kill(gateway.process.pid, signal.SIGKILL)

    def running(pid: int) -> bool:
        # An exited worker has no /proc entry, or an empty cmdline while a zombie.
        try:
            return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            return False

    wait_for(lambda: not any(map(running, workers)), "the orphaned workers to exit")


def test_metrics_and_config_answer_while_a_worker_makes_a_metrics_file(
    procs: Processes, upstream: str
) -> None:
    # A worker makes its histogram file at its first request; until the worker
    # sizes it, the file is empty. This is that moment, held still.
    gateway = procs.gateway(upstream, "--workers", "2")
    (directory,) = Path(tempfile.gettempdir()).glob(f"tlvproxy-metrics-{gateway.process.pid}-*")
    worker = min(workers_of(gateway))
    assert not list(directory.glob("histogram_*.db"))
    (directory / f"histogram_{worker}.db").touch()

    config = gateway.admin("GET", "/admin/config")
    assert config.status == 200, config
    assert config.json()["source"] == str(gateway.table)
    scraped = gateway.admin("GET", "/metrics")
    assert scraped.status == 200, scraped
    # The worker goes on with the file it finds empty, as with one it made.
    for n in range(20):
        assert gateway.call("POST", "/v1/echo", {"n": n}).status == 200
    wait_for(lambda: worker in pids_serving(gateway, "/v1/echo"), "the worker's answers")
    # A worker hands its counts to its files once per scheduler pass, after
    # the answers of that pass are sent.
    duration = "tlvproxy_http_request_duration_seconds_count"
    wait_for(lambda: metric(gateway.metrics(), duration, route="echo") == 20, "20 requests")

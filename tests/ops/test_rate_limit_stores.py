"""Rate limits that hold across workers and across gateways, through real
processes (docs/configuration.md "Where the buckets live", "When the store
cannot answer"): `store: local` shared by the workers of one gateway,
`store: redis` by every gateway on one redis-server."""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import pytest

from tests.ops.procs import children, metric, try_call, wait_for

if TYPE_CHECKING:
    from tests.ops.procs import Gateway, Processes
    from tests.stores.redis_server import RedisServer

pytestmark = pytest.mark.slow

TRIES = 20  # requests per run, each on a new connection


def echo_limit(store: str, on_store_error: str = "allow") -> dict[str, Any]:
    """1/s, burst 1, per X-User-Id: two requests at once, then one a second."""
    return {
        "name": "echo_limit",
        "commands": ["echo"],
        "key": "header.X-User-Id",
        "rate": "1/s",
        "burst": 1,
        "store": store,
        "on_store_error": on_store_error,
    }


def statuses(gateways: list[Gateway], user: str, tries: int = TRIES) -> list[int]:
    """`tries` echo requests for `user`, each on a new connection, spread over
    `gateways` in turn; the statuses."""
    found = []
    for n in range(tries):
        gateway = gateways[n % len(gateways)]
        answer = gateway.call("POST", "/v1/echo", {"n": n}, headers={"X-User-Id": user})
        found.append(answer.status)
    return found


def admitted(found: list[int]) -> int:
    assert set(found) <= {200, 429}, found
    return found.count(200)


def pids_answering(gateway: Gateway) -> set[int]:
    records = gateway.process.records()
    return {r["pid"] for r in records if r["message"] == "request" and r["path"] == "/v1/echo"}


def test_workers_share_one_local_limit(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, "--workers", "2", rate_limits=[echo_limit("local")])
    workers = set(children(gateway.process.pid))
    assert len(workers) == 2
    for run in range(5):
        found = statuses([gateway], f"run{run}")
        # Each worker alone would admit 2: shared, the two admit 2 (3 if the
        # run spans a second's refill).
        assert 2 <= admitted(found) <= 3, found
    # Not vacuous: both workers answered.
    assert pids_answering(gateway) == workers


def test_a_killed_worker_does_not_wedge_the_local_store(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, "--workers", "2", rate_limits=[echo_limit("local")])
    first = set(children(gateway.process.pid))
    stop = threading.Event()
    failures: list[str] = []

    def hammer() -> None:
        # Checks under way in both workers while one of them is killed.
        n = 0
        while not stop.is_set():
            n += 1
            answer = try_call(
                gateway.http_port, "POST", "/v1/echo", body=b"{}", headers={"X-User-Id": f"h{n}"}
            )
            if answer is not None and answer.status != 200:
                failures.append(repr(answer))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        victim = min(first)
        os.kill(victim, signal.SIGKILL)

        def restarted() -> bool:
            now = set(children(gateway.process.pid))
            return victim not in now and len(now) == 2 and gateway.ready()

        wait_for(restarted, "the killed worker to be restarted")
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    # Both workers, the new one too, still count in one store.
    assert set(children(gateway.process.pid)) != first
    for run in range(3):
        assert 2 <= admitted(statuses([gateway], f"after{run}")) <= 3


def test_two_gateways_share_one_redis_limit(
    procs: Processes, upstream: str, redis: RedisServer
) -> None:
    overrides = {"redis": {"url": redis.url}, "rate_limits": [echo_limit("redis")]}
    gateways = [procs.gateway(upstream, **overrides), procs.gateway(upstream, **overrides)]
    assert gateways[0].http_port != gateways[1].http_port
    for run in range(3):
        found = statuses(gateways, f"run{run}")
        # Each gateway alone would admit 2.
        assert 2 <= admitted(found) <= 3, found
        assert 200 in found[1::2]  # the second gateway admitted too: one bucket
    assert redis.calls("evalsha") >= 3 * TRIES


def test_stopped_redis_allows_or_denies_and_a_restarted_one_limits_again(
    procs: Processes, upstream: str, redis: RedisServer
) -> None:
    send_limit = {
        "name": "send_limit",
        "commands": ["send_message"],
        "key": "header.X-User-Id",
        "rate": "1/s",
        "burst": 1,
        "store": "redis",
        "on_store_error": "deny",
    }
    gateway = procs.gateway(
        upstream,
        redis={"url": redis.url},
        rate_limits=[echo_limit("redis", on_store_error="allow"), send_limit],
    )
    assert admitted(statuses([gateway], "before")) <= 3  # limited while Redis runs

    redis.stop()
    found = statuses([gateway], "during", tries=10)
    assert found == [200] * 10  # allow: every request passes
    send = gateway.call(
        "POST", "/v1/messages", {"to_uid": 2, "text": "hi"}, headers={"X-User-Id": "1"}
    )
    assert send.status == 429  # deny
    assert "cannot be checked now" in send.json()["error"]["message"]
    values = gateway.metrics()
    assert metric(values, "tlvproxy_rate_limit_store_errors_total", rule="echo_limit") == 10
    assert metric(values, "tlvproxy_rate_limit_store_errors_total", rule="send_limit") == 1

    redis.start()  # the same port, empty: no gateway restart
    assert 2 <= admitted(statuses([gateway], "after")) <= 3
    values = gateway.metrics()
    assert metric(values, "tlvproxy_rate_limit_store_errors_total", rule="echo_limit") == 10

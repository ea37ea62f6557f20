"""A discovered upstream keeps its nodes while etcd is down, even in a pool
built then: a reload that rebuilds the pool, and a worker that restarts,
start from the nodes last read (docs/configuration.md "discovery")."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.fleet.test_discovery import SERVICES, registered
from tests.ops.procs import children, metric, try_call, wait_for

if TYPE_CHECKING:
    from tests.fleet.etcd import Etcd
    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow


def all_served(gateway: Gateway, count: int = 20) -> list[int | None]:
    """The statuses of `count` requests that did not answer 200 (none: all did)."""
    statuses = []
    for _ in range(count):
        answer = try_call(gateway.http_port, "GET", "/v1/users/5/profile", timeout=5)
        statuses.append(None if answer is None else answer.status)
    return [status for status in statuses if status != 200]


def test_pools_built_while_etcd_is_down_keep_the_nodes_read(procs: Processes, etcd: Etcd) -> None:
    _, _node = registered(procs, etcd)
    discovered = {"nodes": None, "discovery": {"etcd": SERVICES}}
    gateway = procs.gateway(
        "127.0.0.1:1",
        workers=2,
        etcd={"endpoints": [etcd.url]},
        upstreams={"im": discovered},
    )
    wait_for(lambda: not all_served(gateway, 4), "the discovered node serving")
    etcd.stop()

    # A reload that rebuilds the pool (its timeout changed) while etcd is down.
    table = yaml.safe_load(gateway.table.read_text())
    table["upstreams"]["im"]["timeout"] = "4s"
    gateway.table.write_text(yaml.safe_dump(table, sort_keys=False))
    gateway.process.send(signal.SIGHUP)
    wait_for(
        lambda: metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="ok") >= 1,
        "the reload",
    )
    time.sleep(1.5)  # the workers' reloads, told by the supervisor
    assert all_served(gateway) == []

    # A worker that restarts while etcd is down.
    workers = set(children(gateway.process.pid))
    assert len(workers) == 2
    gone = min(workers)
    os.kill(gone, signal.SIGKILL)
    wait_for(
        lambda: len(set(children(gateway.process.pid)) - workers) == 1 and gateway.ready(),
        "the worker's restart",
    )
    assert all_served(gateway, 40) == []

"""Discovery through real processes: mock upstreams register in etcd, and under
steady REST load one stops (its lease revoked) and another starts, with no
request failed (docs/configuration.md "discovery")."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.fixtures import FIXTURE_TABLE
from tests.fleet.fleet import Site, published, start_gateway, stop
from tests.ops.procs import free_port, metric, try_call, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from tests.fleet.etcd import Etcd
    from tests.ops.procs import Gateway, Process, Processes

pytestmark = pytest.mark.slow

SERVICES = "/services/im"


def registered(procs: Processes, etcd: Etcd) -> tuple[str, Process]:
    """A mock upstream registered under SERVICES; its address, once registered."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = procs.start(
        "upstream",
        "mock-upstream",
        "--listen",
        address,
        "-c",
        str(FIXTURE_TABLE),
        "--register",
        etcd.url,
        "--prefix",
        SERVICES,
    )
    wait_for(
        lambda: process.alive() and f"{SERVICES}/{address}" in etcd.get_prefix(SERVICES),
        "the upstream's registration",
    )
    return address, process


def members(gateway: Gateway) -> set[str]:
    config: dict[str, Any] = gateway.admin("GET", "/admin/config").json()
    return {node["address"] for node in config["upstreams"]["im"]["nodes"]}


def served(gateway: Gateway, node: str) -> float:
    return metric(gateway.metrics(), "tlvproxy_upstream_requests_total", node=node, outcome="ok")


def test_nodes_follow_their_registrations_under_load(
    procs: Processes, etcd: Etcd, tmp_path: Path
) -> None:
    nodes = [registered(procs, etcd) for _ in range(3)]
    site = Site(tmp_path / "site", "127.0.0.1:1")
    site.write(upstreams={"im": {"nodes": None, "discovery": {"etcd": SERVICES}}})
    published(site, etcd)
    gateway = start_gateway(procs, site, etcd)
    assert members(gateway) == {address for address, _ in nodes}

    failures: list[Any] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            answer = try_call(gateway.http_port, "GET", "/v1/users/5/profile", timeout=5)
            if answer is None or answer.status != 200:
                failures.append(answer)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        (gone, process), kept = nodes[0], [address for address, _ in nodes[1:]]
        assert all(served(gateway, address) > 0 for address, _ in nodes)
        process.send(15)  # SIGTERM: the registration is revoked, then the service stops
        wait_for(lambda: f"{SERVICES}/{gone}" not in etcd.get_prefix(SERVICES), "the revoke")
        wait_for(lambda: gone not in members(gateway), "the node leaving the pool")
        time.sleep(0.2)  # its last requests in flight are answered
        before = served(gateway, gone)
        assert process.wait() == 0
        new, _ = registered(procs, etcd)
        wait_for(lambda: new in members(gateway), "the new node joining")
        time.sleep(1)
        assert served(gateway, gone) == before
        assert served(gateway, new) > 0
        assert all(served(gateway, address) > 0 for address in kept)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert members(gateway) == {*kept, new}
    stop(gateway)

"""Two gateways on one etcd prefix, as real processes: a publish reaches both
within a second, a broken table changes nothing, etcd down or a watch cut
loses no change, and publishes under load fail no request (docs/operations.md
"Running a fleet")."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.fleet.fleet import (
    PREFIX,
    NetnsGateway,
    Site,
    publish,
    published,
    start_gateway,
    stop,
)
from tests.ops.procs import free_port, metric, try_call, wait_for
from tlvproxy.config.loader import load_table
from tlvproxy.config.stored import stored_from
from tlvproxy.etcd.client import open_etcd
from tlvproxy.etcd.publish import GuardFailed, read_guard, write_guarded

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.fleet.etcd import Etcd
    from tests.ops.procs import Gateway, Processes

pytestmark = pytest.mark.slow


class Fleet:
    def __init__(self, site: Site, etcd: Etcd, one: Gateway, other: NetnsGateway) -> None:
        self.site = site
        self.etcd = etcd
        self.one = one  # workers: 2, on the host's loopback
        self.namespaced = other
        self.other = other.gateway  # one process, in a namespace of its own
        self.gateways = (one, self.other)


@pytest.fixture
def fleet(procs: Processes, etcd: Etcd, upstream: str, tmp_path: Path) -> Iterator[Fleet]:
    site = Site(tmp_path / "site", upstream)
    site.with_echo_at("/v1/echo")
    published(site, etcd)
    one = start_gateway(procs, site, etcd, "--workers", "2")
    other = NetnsGateway(procs, site, etcd, [int(upstream.rsplit(":", 1)[1])])
    try:
        yield Fleet(site, etcd, one, other)
    finally:
        for gateway in (one, other.gateway):
            stop(gateway)
        other.close()


def echo(gateway: Gateway, path: str) -> int | None:
    answer = try_call(gateway.http_port, "POST", path, body={"n": 1}, timeout=5)
    return None if answer is None else answer.status


def revision_of(gateway: Gateway) -> int:
    config: dict[str, Any] = gateway.admin("GET", "/admin/config").json()
    return int(config["revision"])


def worker_revisions(gateway: Gateway) -> list[float]:
    """tlvproxy_config_revision of each process serving (one sample per worker)."""
    text = gateway.admin("GET", "/metrics").body.decode()
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tlvproxy_config_revision")
    ]


def runs(gateway: Gateway, revision: int) -> bool:
    """Whether every process of `gateway` serves `revision`."""
    found = worker_revisions(gateway)
    return bool(found) and all(r == revision for r in found)


def test_a_publish_that_adds_a_route_is_served_by_both_within_a_second(fleet: Fleet) -> None:
    for gateway in fleet.gateways:
        assert echo(gateway, "/v1/echo-new") == 404
        config = gateway.admin("GET", "/admin/config").json()
        assert config["source"] == "etcd"
        assert config["etcd"]["prefix"] == PREFIX
    fleet.site.with_echo_at("/v1/echo-new")
    revision = published(fleet.site, fleet.etcd)
    start = time.monotonic()
    for gateway in fleet.gateways:
        wait_for(lambda g=gateway: echo(g, "/v1/echo-new") == 200, "the new route", 1.0)
    assert time.monotonic() - start < 1.0
    for gateway in fleet.gateways:
        assert revision_of(gateway) == revision
        assert echo(gateway, "/v1/echo") == 404
    # Every worker of the first gateway runs the same revision.
    assert worker_revisions(fleet.one) == [revision, revision]
    assert worker_revisions(fleet.other) == [revision]
    # A reload loads the revision running again; it does not read etcd.
    for gateway in fleet.gateways:
        version = gateway.admin("GET", "/admin/config").json()["version"]
        assert gateway.admin("POST", "/admin/reload").json() == {"version": version}
        assert revision_of(gateway) == revision


def test_a_broken_publish_is_refused_and_nothing_changes(fleet: Fleet) -> None:
    before = fleet.etcd.get_prefix(PREFIX)
    revision = revision_of(fleet.one)
    fleet.site.with_echo_at("/v1/echo-new", upstreams={"im": {"retries": -1}}, bogus=1)
    done = publish(fleet.site, fleet.etcd)
    assert done.returncode == 1
    assert "upstreams.im.retries" in done.stderr
    assert "bogus: unknown key" in done.stderr
    assert "2 error(s)" in done.stderr
    assert fleet.etcd.get_prefix(PREFIX) == before
    time.sleep(0.5)
    for gateway in fleet.gateways:
        assert revision_of(gateway) == revision
        assert echo(gateway, "/v1/echo") == 200


def test_a_broken_table_in_etcd_is_reported_and_the_old_one_serves(fleet: Fleet) -> None:
    revision = revision_of(fleet.one)
    fleet.etcd.put(f"{PREFIX}/table", "commands: [\n")
    for gateway in fleet.gateways:
        wait_for(
            lambda g=gateway: any(
                f"{PREFIX}/table:2:1: invalid YAML" in str(r.get("errors"))
                for r in g.process.records()
            ),
            "the broken table reported",
        )
        assert metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="error") == 1
        assert revision_of(gateway) == revision
        assert echo(gateway, "/v1/echo") == 200
    # A path leading out of the table's directory is refused before anything is written.
    fleet.etcd.put(f"{PREFIX}/files/../../escape", "x")
    for gateway in fleet.gateways:
        wait_for(
            lambda g=gateway: any(
                "files/../../escape: the path has a '..' name" in str(r.get("errors"))
                for r in g.process.records()
            ),
            "the bad path reported",
        )
        assert echo(gateway, "/v1/echo") == 200


def test_both_keep_serving_while_etcd_is_down_and_follow_it_back(fleet: Fleet) -> None:
    fleet.etcd.stop()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for gateway in fleet.gateways:
            assert echo(gateway, "/v1/echo") == 200
            assert gateway.ready()
        time.sleep(0.1)
    fleet.etcd.start()
    fleet.site.with_echo_at("/v1/echo-back")
    revision = published(fleet.site, fleet.etcd)
    for gateway in fleet.gateways:
        # The watch reconnects within its backoff (10 s at most), with jitter.
        wait_for(lambda g=gateway: runs(g, revision), "the publish after etcd's return")
        assert echo(gateway, "/v1/echo-back") == 200


def test_publishes_made_while_a_watch_was_cut_and_compacted_reach_it(fleet: Fleet) -> None:
    fleet.namespaced.etcd_relay.cut()
    wait_for(
        lambda: any(
            "the etcd watch is down" in str(r.get("message")) for r in fleet.other.process.records()
        ),
        "the cut watch noticed",
    )
    for n in range(3):
        fleet.site.with_echo_at(f"/v1/echo-{n}")
        revision = published(fleet.site, fleet.etcd)
    wait_for(lambda: runs(fleet.one, revision), "the first gateway following")
    fleet.etcd.put("/elsewhere", "moves the store's revision past the last publish")
    fleet.etcd.compact()
    assert echo(fleet.other, "/v1/echo") == 200  # still the table it had
    fleet.namespaced.etcd_relay.restore()
    wait_for(lambda: runs(fleet.other, revision), "the cut gateway catching up")
    assert echo(fleet.other, "/v1/echo-2") == 200
    messages = [str(r.get("message")) for r in fleet.other.process.records()]
    assert any("was compacted; reading the prefix again" in m for m in messages)
    assert any("the etcd watch is back" in m for m in messages)


def test_twenty_publishes_under_rest_load_fail_no_request(fleet: Fleet) -> None:
    failures: list[Any] = []
    counts = [0]
    stop = threading.Event()

    def load(gateway: Gateway) -> None:
        while not stop.is_set():
            answer = try_call(gateway.http_port, "GET", "/v1/users/7/profile", timeout=5)
            counts[0] += 1
            if answer is None or answer.status != 200:
                failures.append(answer)

    threads = [
        threading.Thread(target=load, args=(gateway,))
        for gateway in fleet.gateways
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    try:
        for n in range(20):
            fleet.site.with_echo_at(f"/v1/echo-{n}")
            revision = published(fleet.site, fleet.etcd)
    finally:
        for gateway in fleet.gateways:
            wait_for(lambda g=gateway: runs(g, revision), "the last publish")
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert counts[0] > 100
    for gateway in fleet.gateways:
        assert echo(gateway, "/v1/echo-19") == 200
        assert metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="error") == 0


async def test_a_concurrent_publish_fails_its_guard_and_writes_nothing(
    etcd: Etcd, upstream: str, tmp_path: Path
) -> None:
    site = Site(tmp_path / "site", upstream)
    first = stored_from(site.path, load_table(site.path), PREFIX)
    site.with_echo_at("/v1/echo-mine")
    mine = stored_from(site.path, load_table(site.path), PREFIX)
    async with open_etcd([etcd.url]) as client:
        guard = await read_guard(client, f"{PREFIX}/".encode())
        theirs = await write_guarded(client, first, guard)  # another publish gets in first
        with pytest.raises(GuardFailed, match="changed since they were read"):
            await write_guarded(client, mine, guard)
        await trio.lowlevel.checkpoint()
    assert etcd.get_prefix(PREFIX)[f"{PREFIX}/table"] == first.table
    assert etcd.revision() == theirs[0]


def test_a_gateway_started_without_etcd_exits_1_naming_it(procs: Processes, etcd: Etcd) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    process = procs.start("gateway", "serve", "--etcd", nowhere)
    assert process.wait() == 1
    [record] = [r for r in process.records() if r.get("level") == "ERROR"]
    assert record["message"].startswith(f"cannot read the table from etcd at {nowhere}: ")
    # A reachable etcd with nothing under the prefix: no table, no gateway.
    process = procs.start("gateway", "serve", "--etcd", etcd.url, "--etcd-prefix", "/empty")
    assert process.wait() == 1
    assert any(
        r.get("problem") == "/empty/table: no table here (`tlvproxy publish` writes one)"
        for r in process.records()
    )

"""Hot reload of a real `tlvproxy serve` process (SPEC 6, 7): SIGHUP and
POST /admin/reload add a route, a broken table keeps the old one, and a reload
under a concurrent load drops no request."""

from __future__ import annotations

import http.client
import json
import signal
import threading
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.e2e.conftest import DEMO
from tests.ops.procs import Gateway, Processes, metric, rewrite, wait_for

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

PROFILE = "/v1/users/42/profile"


def commands(*, profile: bool) -> list[dict[str, Any]]:
    """The demo commands with or without `get_profile` (GET /v1/users/{id}/profile)."""
    listed: list[dict[str, Any]] = DEMO["commands"]
    return [c for c in listed if profile or c["name"] != "get_profile"]


def version(gateway: Gateway) -> str:
    value: str = gateway.admin("GET", "/admin/config").json()["version"]
    return value


def test_post_admin_reload_adds_a_route(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, commands=commands(profile=False))
    before = version(gateway)
    assert gateway.call("GET", PROFILE).status == 404

    rewrite(gateway.table, commands=commands(profile=True))
    answer = gateway.admin("POST", "/admin/reload")

    assert answer.status == 200, answer
    assert answer.json()["version"] != before
    assert version(gateway) == answer.json()["version"]
    profile = gateway.call("GET", PROFILE)
    assert profile.status == 200, profile
    assert profile.json()["user_id"] == 42
    assert metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="ok") == 1


def test_sighup_adds_a_route(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream, commands=commands(profile=False))
    before = version(gateway)

    rewrite(gateway.table, commands=commands(profile=True))
    gateway.process.send(signal.SIGHUP)

    wait_for(lambda: gateway.call("GET", PROFILE).status == 200, "the new route")
    assert version(gateway) != before
    assert metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="ok") == 1
    reloaded = [r for r in gateway.process.records() if r["message"] == "reload done"]
    assert reloaded[0]["version"] == version(gateway)


def broken_commands(path: Path) -> list[dict[str, Any]]:
    """Three mistakes: an unknown key, a bad command number, an unknown upstream."""
    document = yaml.safe_load(path.read_text())
    return [
        *document["commands"],
        {"name": "a", "command": 0x3001, "upstream": "im", "codec": "json", "colour": "red"},
        {"name": "b", "command": "nope", "upstream": "im", "codec": "json"},
        {"name": "c", "command": 0x3003, "upstream": "nowhere", "codec": "json"},
    ]


def test_a_broken_table_is_reported_and_the_old_one_serves(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream)
    before = version(gateway)
    rewrite(gateway.table, commands=broken_commands(gateway.table))
    lines = gateway.table.read_text().splitlines()

    answer = gateway.admin("POST", "/admin/reload")

    assert answer.status == 400, answer
    error = answer.json()["error"]
    assert error["code"] == "invalid_table"
    errors = error["errors"]
    assert len(errors) == 3, errors
    for problem, word in zip(errors, ("colour", "nope", "nowhere"), strict=True):
        location, _, _message = problem.partition(": ")
        file, line, _column = location.rsplit(":", 2)
        assert file == str(gateway.table)
        assert word in lines[int(line) - 1], (problem, lines[int(line) - 1])
    assert gateway.call("POST", "/v1/echo", {"still": "here"}).status == 200
    assert version(gateway) == before

    gateway.process.send(signal.SIGHUP)

    def logged() -> list[dict[str, Any]]:
        return [r for r in gateway.process.records() if r["message"].startswith("reload failed")]

    assert wait_for(logged, "the reload error log line")[0]["errors"] == errors
    assert gateway.call("POST", "/v1/echo", {"still": "here"}).status == 200
    values = gateway.metrics()
    assert metric(values, "tlvproxy_config_reloads_total", result="error") == 2
    assert metric(values, "tlvproxy_config_reloads_total", result="ok") == 0


class Load:
    """Client threads, each POSTing /v1/echo on one keep-alive connection in a loop."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = 0
        try:
            while not self._stop.is_set():
                sent += 1
                body = json.dumps({"client": number, "n": sent})
                try:
                    connection.request("POST", "/v1/echo", body=body)
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    self._fail(f"client {number} request {sent}: {exc!r}")
                    return
                if response.status != 200 or json.loads(answer) != json.loads(body):
                    self._fail(f"client {number}: {response.status} {answer[:200]!r}")
                with self._lock:
                    self.done += 1
        finally:
            connection.close()

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)


def test_twenty_reloads_under_load_drop_nothing(procs: Processes, upstream: str) -> None:
    gateway = procs.gateway(upstream)
    versions = set()
    with Load(gateway.http_port, clients=4) as load:
        wait_for(lambda: load.done > 50, "the load to start")
        for n in range(20):
            rewrite(gateway.table, commands=commands(profile=n % 2 == 0))
            before = load.done
            answer = gateway.admin("POST", "/admin/reload")
            assert answer.status == 200, answer
            versions.add(answer.json()["version"])
            wait_for(lambda before=before: load.done > before + 10, "requests after a reload")
        assert not load.failures, load.failures[:5]
    assert load.failures == []
    assert len(versions) == 2  # the table alternated between two contents
    assert gateway.call("GET", PROFILE).status == 404  # the last reload removed it
    assert metric(gateway.metrics(), "tlvproxy_config_reloads_total", result="ok") == 20

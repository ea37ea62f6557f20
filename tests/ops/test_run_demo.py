"""`make run` (scripts/run-demo.sh) reports the demo as running only when its
own processes answer (issue 16, finding 9).

Its readiness check used to reach whatever answered on the admin port: with
another instance there, it said "running" while its own gateway had exited.
The script runs here on a copy of the demo table on free ports.
"""

from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import threading
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.e2e.conftest import ROOT
from tests.ops.procs import DEADLINE, free_port, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "run-demo.sh"
RUNNING = "tlvproxy demo is running"


class Demo:
    """The script's environment: a demo table and its keys on free ports."""

    def __init__(self, directory: Path) -> None:
        self.upstream = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.admin = f"127.0.0.1:{free_port()}"
        keys = directory / "keys"
        made = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "tlvproxy"), "demo-keys", str(keys)],
            capture_output=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        document = yaml.safe_load((ROOT / "commands.yaml").read_text())
        document["listen"] = {"http": self.http, "admin": self.admin}
        document["proto"]["paths"] = [str(ROOT / "proto")]
        document["upstreams"]["im"]["nodes"] = [self.upstream]
        for authenticator in document.get("auth") or []:
            if authenticator.get("keys") == "build/demo-keys/jwks.json":
                authenticator["keys"] = str(keys / "jwks.json")
        self.table = directory / "commands.yaml"
        self.table.write_text(yaml.safe_dump(document, sort_keys=False))
        self.env = {
            "PATH": "/usr/bin:/bin",
            "TABLE": str(self.table),
            "KEYS": str(keys),
            "UPSTREAM": self.upstream,
            "HTTP": self.http,
            "ADMIN": self.admin,
        }

    def run(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE * 2,
            check=False,
        )


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture
def demo(tmp_path: Path) -> Demo:
    return Demo(tmp_path)


@pytest.fixture
def other_instance(demo: Demo) -> Iterator[None]:
    """Another gateway's admin listener on the demo's admin port: /readyz answers 200."""

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", _port(demo.admin)), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.usefixtures("other_instance")
def test_another_instance_on_the_admin_port_is_not_taken_for_the_demo(demo: Demo) -> None:
    result = demo.run()
    assert result.returncode == 1, result.stderr
    assert RUNNING not in result.stderr, result.stderr
    assert "run-demo: the gateway exited" in result.stderr, result.stderr
    assert f"cannot listen on {demo.admin}" in result.stdout + result.stderr


def test_a_busy_upstream_port_stops_the_demo(demo: Demo) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", _port(demo.upstream)))
        held.listen()
        result = demo.run()
    assert result.returncode == 1, result.stderr
    assert RUNNING not in result.stderr, result.stderr
    assert "run-demo: the demo upstream exited" in result.stderr, result.stderr


def test_the_demo_runs_and_stops(demo: Demo, tmp_path: Path) -> None:
    log = (tmp_path / "demo.log").open("w+")
    script = subprocess.Popen(
        ["bash", str(SCRIPT)], env=demo.env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: RUNNING in (tmp_path / "demo.log").read_text(), "the demo to run")
        with socket.create_connection(("127.0.0.1", _port(demo.http)), timeout=5):
            pass
    finally:
        script.send_signal(signal.SIGTERM)
        script.wait(DEADLINE)
        log.close()
    # Its processes are gone with it.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", _port(demo.admin))) != 0

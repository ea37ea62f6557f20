"""Real processes for the operations tests: the mock upstream and `tlvproxy serve`.

Everything here is synchronous (subprocess, http.client, socket, wsproto) so the
tests can drive signals, threads of load and processes without an event loop.
Every process is started through `Processes`, which kills what is still alive
when the test ends.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.e2e.conftest import ROOT, write_table
from tests.fixtures import FIXTURE_TABLE

DEADLINE = 20.0  # seconds any single wait may take before the test fails


def free_port() -> int:
    """A port nobody listens on right now (bind port 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, what: str, deadline: float = DEADLINE) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `deadline`."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:300]!r})"


def answer_of(response: http.client.HTTPResponse) -> Answer:
    body = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    return Answer(response.status, headers, body)


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One request on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        connection.request(method, path, body=data, headers=headers or {})
        return answer_of(connection.getresponse())
    finally:
        connection.close()


def try_call(port: int, method: str, path: str, **options: Any) -> Answer | None:
    """`call`, or None when the connection is refused or reset."""
    try:
        return call(port, method, path, **options)
    except (ConnectionError, http.client.RemoteDisconnected):
        return None


class Process:
    """A child process whose stdout (JSON log lines) goes to a file."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env()
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = DEADLINE) -> int:
        return self.popen.wait(timeout)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (other lines are skipped)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    found.append(value)
        return found

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(DEADLINE)
        self._log.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Gateway:
    """A `tlvproxy serve` process and the ports of its listeners."""

    def __init__(self, process: Process, table: Path, http_port: int, admin_port: int) -> None:
        self.process = process
        self.table = table
        self.http_port = http_port
        self.admin_port = admin_port

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> Answer:
        return call(self.http_port, method, path, body, **options)

    def admin(self, method: str, path: str, **options: Any) -> Answer:
        """A request to the admin listener; a POST says `Content-Type:
        application/json` unless `headers` names one, as the admin API requires."""
        headers = options.get("headers") or {}
        if method == "POST" and not any(k.lower() == "content-type" for k in headers):
            options["headers"] = {"Content-Type": "application/json", **headers}
        return call(self.admin_port, method, path, **options)

    def ready(self) -> bool:
        answer = try_call(self.admin_port, "GET", "/readyz", timeout=2.0)
        return answer is not None and answer.status == 200

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.admin("GET", "/metrics").body.decode())

    def rewrite_table(self, **overrides: Any) -> None:
        """Change the table file in place (keeping everything not overridden)."""
        rewrite(self.table, **overrides)


class Processes:
    """Starts processes for one test and kills what is left at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._started: list[Process] = []

    def start(self, name: str, *arguments: str) -> Process:
        """`python -m tlvproxy ARGUMENTS`."""
        return self.start_command(name, [sys.executable, "-m", "tlvproxy", *arguments])

    def start_command(self, name: str, command: list[str]) -> Process:
        log_path = self.directory / f"{name}-{len(self._started)}.log"
        process = Process(command, log_path)
        self._started.append(process)
        return process

    def upstream(
        self, *arguments: str, table: Path = FIXTURE_TABLE, port: int | None = None
    ) -> str:
        """The demo IM service in a process of its own (on `table`, with
        mock-upstream's `arguments`, on `port` or a free one); returns
        "127.0.0.1:PORT"."""
        return self.upstream_process(*arguments, table=table, port=port)[1]

    def upstream_process(
        self, *arguments: str, table: Path = FIXTURE_TABLE, port: int | None = None
    ) -> tuple[Process, str]:
        """`upstream`, with the process (to stop it)."""
        port = free_port() if port is None else port
        process = self.start(
            "upstream",
            "mock-upstream",
            "--listen",
            f"127.0.0.1:{port}",
            "-c",
            str(table),
            *arguments,
        )

        def listening() -> bool:
            assert process.alive(), process.text()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, "the mock upstream")
        return process, f"127.0.0.1:{port}"

    def table(self, upstream: str, name: str = "table", **overrides: Any) -> tuple[Path, int, int]:
        """A demo table on real free ports; returns (path, http port, admin port)."""
        http_port, admin_port = free_port(), free_port()
        directory = self.directory / name
        directory.mkdir(exist_ok=True)
        listen = {"http": f"127.0.0.1:{http_port}", "admin": f"127.0.0.1:{admin_port}"}
        path = write_table(directory, upstream, listen=listen, **overrides)
        return path, http_port, admin_port

    def gateway(self, upstream: str, *options: str, **overrides: Any) -> Gateway:
        """`tlvproxy serve` on a fresh demo table; returns once /readyz answers 200."""
        path, http_port, admin_port = self.table(upstream, f"gw{len(self._started)}", **overrides)
        return self.serve(path, http_port, admin_port, *options)

    def serve(self, path: Path, http_port: int, admin_port: int, *options: str) -> Gateway:
        """`tlvproxy serve` on the table at `path` (as `table` wrote it);
        returns once /readyz answers 200."""
        process = self.start("gateway", "serve", "-c", str(path), *options)
        gateway = Gateway(process, path, http_port, admin_port)

        def ready() -> bool:
            assert process.alive(), process.text()
            return gateway.ready()

        wait_for(ready, "the gateway's /readyz")
        return gateway

    def close(self) -> None:
        for process in self._started:
            with contextlib.suppress(ProcessLookupError):
                for child in _children(process.pid):
                    os.kill(child, signal.SIGKILL)
            process.kill()


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s children (the supervisor's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    return _children(pid)


def rewrite(path: Path, **overrides: Any) -> None:
    """Lay `overrides` over the table at `path` (top-level keys replaced whole)."""
    document = yaml.safe_load(path.read_text())
    document.update(overrides)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format as {'name{labels}': value} (labels as written)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        sample, _, rest = key.partition("{")
        if sample != name:
            continue
        have = dict(part.split("=", 1) for part in _split_labels(rest.rstrip("}")) if "=" in part)
        if all(have.get(k) == json.dumps(v) for k, v in labels.items()):
            total += value
    return total


def _split_labels(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


ECHO2 = {
    "name": "echo2",
    "command": 0x1003,
    "upstream": "im",
    "codec": "json",
    "http": {"method": "POST", "path": "/v1/echo2"},
    "idempotent": True,
}


def with_echo2(path: Path) -> list[dict[str, Any]]:
    """The table's commands plus `echo2` on POST /v1/echo2 (same upstream command)."""
    document = yaml.safe_load(path.read_text())
    return [*document["commands"], ECHO2]


class WebSocket:
    """A blocking WebSocket client on a socket and wsproto."""

    def __init__(
        self,
        port: int,
        target: str = "/ws?uid=1&did=a",
        *,
        sock: socket.socket | None = None,
        host: str = "localhost",
    ) -> None:
        """A session on 127.0.0.1:`port`, or on `sock` when given (a TLS socket)."""
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=host, target=target)))
        self._pending: list[Any] = []
        while True:
            events = self._events()
            for index, event in enumerate(events):
                if isinstance(event, RejectConnection | RejectData):
                    raise AssertionError(f"handshake rejected: {event}")
                if isinstance(event, AcceptConnection):
                    self._pending.extend(events[index + 1 :])
                    return

    def _events(self) -> list[Any]:
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=json.dumps(message))))

    def receive(self) -> dict[str, Any] | CloseConnection:
        """The next JSON message, or the CloseConnection that ended the session."""
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, TextMessage):
                    value: dict[str, Any] = json.loads(event.data)
                    return value
                if isinstance(event, CloseConnection):
                    with contextlib.suppress(OSError):
                        self.sock.sendall(self.ws.send(event.response()))
                    return event
            self._pending.extend(self._events())

    def close(self) -> None:
        self.sock.close()


def accepted(server_port: int, client_ports: set[int], pids: set[int]) -> dict[int, int]:
    """Which of `pids` has accept()ed the connection from each of `client_ports`
    to `server_port` on 127.0.0.1: {client port: pid}, found through /proc."""
    inodes: dict[int, int] = {}  # server-side socket inode -> client port
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if local_port == server_port and remote_port in client_ports:
            inodes[int(fields[9])] = remote_port
    found: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inode = int(target[8:-1])
                        if inode in inodes:
                            found[inodes[inode]] = pid
    return found

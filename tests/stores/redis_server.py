"""A real `redis-server` for the tests (Debian's, installed by `make test-deps`):
on a free loopback port, with a temporary directory, saving nothing.

Synchronous (subprocess, redis-cli), so that process tests without an event
loop can stop, pause and restart it as well as trio tests.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_DEADLINE = 10.0  # seconds a start may take


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; `start` again after `stop` reuses its port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is missing: run `make test-deps`"
        self._binary = binary
        self.directory = directory
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        assert self._process is None, "already running"
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        end = time.monotonic() + _DEADLINE
        while not self._answers():
            assert self._process.poll() is None, (self.directory / "redis.log").read_text()
            assert time.monotonic() < end, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is lost: nothing is saved)."""
        process, self._process = self._process, None
        if process is not None:
            if self._paused:
                process.send_signal(signal.SIGCONT)
                self._paused = False
            process.kill()
            process.wait(_DEADLINE)

    def pause(self) -> None:
        """Freeze the server: connections stay open, nothing is answered."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def ensure_running(self) -> None:
        """Running and answering, whatever a test left it as."""
        if self._paused:
            self.resume()
        if self._process is None or self._process.poll() is not None:
            self._process = None
            self.start()

    def cli(self, *arguments: str) -> str:
        """A command through redis-cli; its output (bytes that are not UTF-8
        as surrogate escapes: keys may hold any byte)."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), *arguments],
            capture_output=True,
            check=True,
            timeout=_DEADLINE,
        )
        return result.stdout.decode("utf-8", "surrogateescape")

    def calls(self, command: str) -> int:
        """How many times `command` ran, from INFO commandstats."""
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith(f"cmdstat_{command.lower()}:"):
                fields = dict(part.split("=") for part in line.split(":", 1)[1].split(","))
                return int(fields["calls"])
        return 0

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

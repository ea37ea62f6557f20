"""A real etcd for the fleet tests (Debian's etcd-server, installed by `make
test-deps`), on free loopback ports with a data directory of its own, and a
few synchronous calls of its v3 JSON gateway."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from tests.ops.procs import DEADLINE, free_port, wait_for

if TYPE_CHECKING:
    from pathlib import Path


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


class Etcd:
    """One etcd member; `stop()` and `start()` keep its ports and its data."""

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("etcd") or "/usr/bin/etcd"
        self.directory = directory
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / "etcd.log"

    def start(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "--name",
                    "test",
                    "--data-dir",
                    str(self.directory / "data"),
                    "--listen-client-urls",
                    self.url,
                    "--advertise-client-urls",
                    self.url,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--initial-cluster",
                    f"test={peer}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, "etcd to answer")
        return self

    def _answers(self) -> bool:
        assert self._process is not None
        assert self._process.poll() is None, self._log.read_text()
        with contextlib.suppress(OSError):
            return "revision" in json.dumps(self.call("/v3/kv/range", {"key": b64("/")}))
        return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(DEADLINE)
        self._process = None

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                value: dict[str, Any] = json.load(answer)
        except urllib.error.HTTPError as exc:
            value = json.load(exc)
        return value

    def put(self, key: str, value: bytes | str) -> int:
        return int(
            self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})["header"]["revision"]
        )

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        answer = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": _end(prefix)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in answer.get("kvs", [])
        }

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": b64("/")})["header"]["revision"])

    def compact(self) -> int:
        """Compact the history up to now; the revision compacted at."""
        revision = self.revision()
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

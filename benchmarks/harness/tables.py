"""The gateway tables the benchmarks serve, written with a `listen` section on free ports.

Owns: free loopback ports; `GatewayTable`, where a written table is and what it
listens on; the two tables most benches serve: the tests' demo table
(tests/fixtures/table.yaml, no auth) and the json route of
benchmarks/shared_target.py (the side-by-side run's table), each in front of
an upstream port the caller gives. Starts nothing: processes.py serves a
table.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import yaml
from shared_target import table_text

if TYPE_CHECKING:
    from collections.abc import Mapping

ROOT = Path(__file__).resolve().parents[2]
DEMO_TABLE = ROOT / "tests" / "fixtures" / "table.yaml"
ECHO_PATH = "/v1/echo"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class GatewayTable:
    """A table written to `path`, and the loopback ports it listens on."""

    path: Path
    http: int
    admin: int  # /readyz, /metrics
    https: int | None = None

    def url(self, path: str = ECHO_PATH, *, tls: bool = False, host: str = "127.0.0.1") -> str:
        """The URL of `path` on the http listener, or on the https one with `tls`."""
        if not tls:
            return f"http://{host}:{self.http}{path}"
        if self.https is None:
            raise ValueError(f"{self.path} has no https listener")
        return f"https://{host}:{self.https}{path}"


def write_table(path: Path, document: str, *, https: bool = False) -> GatewayTable:
    """`document` (table YAML without a `listen` section) written to `path`
    after a `listen` section with http and admin listeners on free loopback
    ports, and an https one with `https` (the caller adds its `tls` section)."""
    http, admin = free_port(), free_port()
    listen = f"listen:\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}\n"
    https_port = None
    if https:
        https_port = free_port()
        listen += f"  https: 127.0.0.1:{https_port}\n"
    path.write_text(listen + document)
    return GatewayTable(path, http, admin, https_port)


def write_demo_table(
    path: Path, upstream_port: int, overrides: Mapping[str, object] | None = None
) -> GatewayTable:
    """The tests' demo table (no auth; POST /v1/echo is its json-codec `echo`)
    with its `im` upstream on 127.0.0.1:`upstream_port` and the top-level
    sections of `overrides` replacing its own."""
    document = yaml.safe_load(DEMO_TABLE.read_text())
    del document["listen"]
    document["proto"]["paths"] = [str(ROOT / "proto")]
    document["upstreams"]["im"]["nodes"] = [f"127.0.0.1:{upstream_port}"]
    document.update(overrides or {})
    return write_table(path, yaml.safe_dump(document, sort_keys=False))


def write_echo_table(
    path: Path, upstream_port: int, extra: str = "", *, https: bool = False
) -> GatewayTable:
    """The side-by-side run's json route (benchmarks/shared_target.py: POST
    /v1/echo, json codec) on 127.0.0.1:`upstream_port`, followed by `extra`
    (more YAML: an `auth` section, `tls`, ...)."""
    text = table_text(0, f"127.0.0.1:{upstream_port}", "json")
    document = text[text.index("upstreams:") :]  # everything after its `listen`
    return write_table(path, document + extra, https=https)

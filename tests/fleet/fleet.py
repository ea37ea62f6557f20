"""Gateways of one fleet as real processes (tests/fleet): a table directory to
publish from, `tlvproxy publish`, a gateway on the host's loopback, and one in
a network namespace of its own, since two gateways running one table listen
on the same addresses, as they would on two hosts."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.conftest import DEMO, ROOT, write_table
from tests.fleet.relay import Relay
from tests.ops.procs import Gateway, free_port, wait_for

if TYPE_CHECKING:
    from tests.fleet.etcd import Etcd
    from tests.ops.procs import Processes

PREFIX = "/fleet"


class Site:
    """A table directory (commands.yaml and a link to the repository's proto/)
    on fixed ports, as an operator keeps it to publish from."""

    def __init__(self, directory: Path, upstream: str, **overrides: Any) -> None:
        self.directory = directory
        self.http_port = free_port()
        self.admin_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "proto").symlink_to(ROOT / "proto")
        self.upstream = upstream
        self.write(**overrides)

    def write(self, **overrides: Any) -> Path:
        listen = {"http": f"127.0.0.1:{self.http_port}", "admin": f"127.0.0.1:{self.admin_port}"}
        defaults = {"listen": listen, "proto": {"paths": ["proto"]}, "shutdown_timeout": "3s"}
        self.path = write_table(self.directory, self.upstream, **{**defaults, **overrides})
        return self.path

    def with_echo_at(self, path: str, **overrides: Any) -> Path:
        """The table with the `echo` command's route at `path`."""
        commands = [dict(c) for c in DEMO["commands"]]
        for command in commands:
            if command["name"] == "echo":
                command["http"] = {"method": "POST", "path": path}
        return self.write(commands=commands, **overrides)


def publish(site: Site, etcd: Etcd, prefix: str = PREFIX) -> subprocess.CompletedProcess[str]:
    """`tlvproxy publish` of the site's table."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tlvproxy",
            "publish",
            "-c",
            str(site.path),
            "--etcd",
            etcd.url,
            "--etcd-prefix",
            prefix,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def published(site: Site, etcd: Etcd, prefix: str = PREFIX) -> int:
    """Publish, which must succeed; the revision it wrote."""
    done = publish(site, etcd, prefix)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().rsplit(" ", 1)[1])


def start_gateway(procs: Processes, site: Site, etcd: Etcd, *options: str) -> Gateway:
    """`serve --etcd` on the host's loopback, once /readyz answers 200."""
    process = procs.start("gateway", "serve", "--etcd", etcd.url, "--etcd-prefix", PREFIX, *options)
    gateway = Gateway(process, site.path, site.http_port, site.admin_port)

    def ready() -> bool:
        assert process.alive(), process.text()
        return gateway.ready()

    wait_for(ready, "the gateway's /readyz")
    return gateway


class NetnsGateway:
    """`serve --etcd` in a network namespace of its own (`unshare -n`): it
    listens on the table's addresses there, and reaches etcd and the upstream
    through relays, its etcd relay one the test can cut."""

    def __init__(self, procs: Processes, site: Site, etcd: Etcd, upstream_ports: list[int]) -> None:
        self._sockets = Path(tempfile.mkdtemp(prefix="tlvnet-"))
        self.relays: list[Relay] = []
        into = []
        for port in [etcd.port, *upstream_ports]:
            sock = str(self._sockets / f"in-{port}")
            relay = Relay(("unix", sock), ("tcp", port)).start()
            self.relays.append(relay)
            if port == etcd.port:
                self.etcd_relay = relay
            into += ["--into", f"{port}={sock}"]
        http_port, admin_port = free_port(), free_port()
        out = []
        for inner, outer in ((site.http_port, http_port), (site.admin_port, admin_port)):
            sock = str(self._sockets / f"out-{inner}")
            out += ["--out", f"{sock}={inner}"]
            self.relays.append(Relay(("tcp", outer), ("unix", sock)))
        command = [
            "unshare",
            "-n",
            sys.executable,
            "-m",
            "tests.fleet.in_netns",
            *into,
            *out,
            "--",
            sys.executable,
            "-m",
            "tlvproxy",
            "serve",
            "--etcd",
            etcd.url,
            "--etcd-prefix",
            PREFIX,
        ]
        process = procs.start_command("gateway-ns", command)
        # The inner ends listen once the namespace is set up.
        inner_sockets = [Path(item.split("=", 1)[0]) for item in out[1::2]]
        wait_for(lambda: all(s.exists() for s in inner_sockets), "the namespace's relays")
        for relay in self.relays[-2:]:
            relay.start()
        self.gateway = Gateway(process, site.path, http_port, admin_port)

        def ready() -> bool:
            assert process.alive(), process.text()
            return self.gateway.ready()

        wait_for(ready, "the namespaced gateway's /readyz")

    def close(self) -> None:
        for relay in self.relays:
            relay.cut()
        shutil.rmtree(self._sockets, ignore_errors=True)


def stop(gateway: Gateway) -> None:
    """Drain `gateway` (SIGTERM), so it removes its run directory; what is
    still alive after that is killed by `Processes`."""
    if gateway.process.alive():
        gateway.process.send(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.process.wait(10)

"""The processes a benchmark starts, always stopped, and what they cost.

Owns: a child process that says where it listens on its first line of
output; the C echo upstream (../shared/bench/upstream, built in a temporary
directory: the shared tree is read-only); `tlvproxy serve` on a table, ready
once its /readyz says so; the CPU time of a process tree, a process's
resident memory, the descriptor limit. Everything started here is stopped
when its `with` block ends, on errors too. Measures no load and prints nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .tables import GatewayTable

ROOT = Path(__file__).resolve().parents[2]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
# TLV_ECHO_SOURCES: another copy of the echo server's Makefile and tlv_echo.c.
ECHO_SOURCES = Path(os.environ.get("TLV_ECHO_SOURCES", SHARED_BENCH / "upstream"))
READY_TIMEOUT = 30.0  # seconds for a gateway to say ready
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if `process` has not exited after STOP_TIMEOUT."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def child(
    argv: list[str], *, stderr: int | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`argv` started in the repository with its stdout piped; yields the
    process and the first line it writes (where it listens), and stops it when
    the block ends. Raises SystemExit if it exits before writing a line."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"{argv[0]} exited with {process.wait()} before saying where it is")
        yield process, line.strip()
    finally:
        stop(process)


def build_echo(directory: Path) -> Path:
    """The C echo upstream's sources copied to `directory` and built there;
    returns the binary."""
    for name in ("Makefile", "tlv_echo.c"):
        shutil.copy(ECHO_SOURCES / name, directory / name)
    subprocess.run(["make", "-s", "-C", str(directory), "tlv_echo"], check=True)
    return directory / "tlv_echo"


@contextlib.contextmanager
def echo_upstream(directory: Path, delay_us: int = 0) -> Iterator[int]:
    """The C echo upstream (built in `directory`) on a free loopback port
    until the block ends; yields the port. It answers every request frame
    with the same body, flags=1, status 0, after `delay_us` microseconds."""
    argv = [str(build_echo(directory)), "0", str(delay_us)]
    with child(argv, stderr=subprocess.DEVNULL) as (_, line):
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        if found is None:
            raise SystemExit(f"tlv_echo did not say where it listens: {line!r}")
        yield int(found.group(1))


def _wait_ready(admin_port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tlvproxy serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise SystemExit(f"tlvproxy serve did not become ready in {READY_TIMEOUT:.0f} s")


@contextlib.contextmanager
def serving(
    table: GatewayTable, workers: int = 1, log_level: str = "info"
) -> Iterator[subprocess.Popen[bytes]]:
    """`tlvproxy serve --workers N` on `table` until the block ends, yielded
    once its /readyz answers; one worker serves in the process itself, so its
    pid is the gateway's. Stopped with SIGTERM (SIGKILL after STOP_TIMEOUT)."""
    # The JSON log lines go to a file, as in the side-by-side run and in
    # production: writing them is part of a request's cost.
    with tempfile.TemporaryFile() as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tlvproxy",
                "serve",
                "-c",
                str(table.path),
                "--workers",
                str(workers),
                "--log-level",
                log_level,
            ],
            stdout=log_file,
            cwd=ROOT,
        )
        try:
            _wait_ready(table.admin, process)
            yield process
        finally:
            stop(process)


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by `pid` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    usage: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited since the listing
        # After the command name: state, ppid, ... utime and stime are fields 14, 15.
        parents[int(entry.name)] = int(fields[1])
        usage[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += usage.get(current, 0.0)
        stack.extend(kid for kid, parent in parents.items() if parent == current)
    return total


def rss_kib(pid: int) -> int:
    """The resident memory of `pid` (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def raise_fd_limit() -> None:
    """This process's descriptor limit raised to its hard limit; the processes
    it starts inherit it (each open WebSocket session holds two descriptors)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

"""REST throughput of `tlvproxy serve` with 1 worker and with 2 workers (issue 8).

Builds the C echo upstream (../shared/bench/upstream, through bench_upstream's
helpers), writes the demo table pointing at it, starts `tlvproxy serve
--workers N` as a real process, checks that POST /v1/echo echoes the body, then
drives it with wrk -t1 -c64 (a 1 s warm-up, then the measured run) using
../shared/bench/wrk/bench.lua and its 200-byte JSON body. Load generator,
gateway and upstream share the machine, as in production-like runs on the
2-core development box. Prints req/s, p50/p99 and the 2-worker/1-worker ratio
(the issue's target: at least 1.7).

Run: .venv/bin/python benchmarks/bench_workers.py [--duration 5] [--log-level info]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from bench_upstream import build_echo, start_echo

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
WRK = ROOT.parent / "shared" / "bench" / "wrk"
CONNECTIONS = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_table(directory: Path, upstream_port: int) -> tuple[Path, int, int]:
    """The tests' demo table (no auth) in front of the echo upstream; returns (path,
    http, admin port)."""
    http_port, admin_port = free_port(), free_port()
    document = yaml.safe_load((ROOT / "tests" / "fixtures" / "table.yaml").read_text())
    document["listen"] = {"http": f"127.0.0.1:{http_port}", "admin": f"127.0.0.1:{admin_port}"}
    document["proto"]["paths"] = [str(ROOT / "proto")]
    document["upstreams"]["im"]["nodes"] = [f"127.0.0.1:{upstream_port}"]
    path = directory / "commands.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path, http_port, admin_port


def wait_ready(admin_port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tlvproxy serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise SystemExit("tlvproxy serve did not become ready in 30 s")


def check_echo(url: str, body: bytes, authorization: str | None = None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as answer:
        echoed = answer.read()
    if json.loads(echoed) != json.loads(body):
        raise SystemExit(f"{url} did not echo the body: {echoed[:200]!r}")


def wrk(
    url: str, duration: int, connections: int, script: Path | None = None, **env: str
) -> dict[str, float]:
    """One wrk run; the WRKJSON line its Lua script prints (`script`: bench.lua's
    by default; `env` adds environment variables for it)."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "-s",
            str(script or WRK / "bench.lua"),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        env={"BENCH_BODY_FILE": str(WRK / "body.json"), "PATH": "/usr/bin:/bin", **env},
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    result: dict[str, float] = json.loads(line.removeprefix("WRKJSON "))
    return result


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
        stack.extend(child for child, parent in parents.items() if parent == current)
    return total


@contextlib.contextmanager
def serving(
    table: Path, admin_port: int, workers: int = 1, log_level: str = "info"
) -> Iterator[subprocess.Popen[bytes]]:
    """`tlvproxy serve` on `table` until the block ends, once /readyz says
    ready; stopped with SIGTERM (SIGKILL after 30 s)."""
    # The JSON log lines go to a file, as in the shared harness and in
    # production: writing them is part of a request's cost.
    with tempfile.TemporaryFile() as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tlvproxy",
                "serve",
                "-c",
                str(table),
                "--workers",
                str(workers),
                "--log-level",
                log_level,
            ],
            stdout=log_file,
            cwd=ROOT,
        )
        try:
            wait_ready(admin_port, process)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def measure(
    table: Path,
    http_port: int,
    admin_port: int,
    workers: int,
    duration: int,
    log_level: str,
    script: Path | None = None,
    before_run: Callable[[], object] | None = None,
    **env: str,
) -> dict[str, float]:
    """Start `tlvproxy serve` on `table`, drive POST /v1/echo with wrk (`script`
    and `env` as for `wrk`), stop it; wrk's figures plus rps, errors and cpu_us.
    `before_run` is called after the warm-up, just before the measured run."""
    with serving(table, admin_port, workers, log_level) as process:
        url = f"http://127.0.0.1:{http_port}/v1/echo"
        check_echo(url, (WRK / "body.json").read_bytes(), env.get("BENCH_AUTHORIZATION"))
        wrk(url, 1, CONNECTIONS, script, **env)  # warm-up: connections, pools, caches
        if before_run is not None:
            before_run()
        cpu_before = tree_cpu_seconds(process.pid)
        result = wrk(url, duration, CONNECTIONS, script, **env)
        cpu = tree_cpu_seconds(process.pid) - cpu_before
    errors = sum(result[k] for k in ("err_connect", "err_read", "err_write", "err_status"))
    result["errors"] = errors + result["err_timeout"]
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    # CPU per request moves far less than req/s when wrk and the upstream
    # compete for the same two cores.
    result["cpu_us"] = cpu * 1e6 / max(result["requests"], 1)
    return result


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--log-level", default="info", choices=("info", "warning"))
    args = options.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        echo, port = start_echo(build_echo(Path(workdir)))
        try:
            table, http_port, admin_port = write_table(Path(workdir), port)
            print(
                f"POST /v1/echo (json codec, 200-byte body), wrk -t1 -c{CONNECTIONS} "
                f"-d{args.duration}s, C echo upstream, log level {args.log_level}"
            )
            print(f"{'workers':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
            rates = {}
            for workers in (1, 2):
                result = measure(
                    table, http_port, admin_port, workers, args.duration, args.log_level
                )
                rates[workers] = result["rps"]
                print(
                    f"{workers:<8} {result['rps']:>10.0f} {result['p50_us'] / 1000:>8.2f} "
                    f"{result['p99_us'] / 1000:>8.2f} {result['errors']:>7.0f}",
                    flush=True,
                )
        finally:
            echo.terminate()
            echo.wait()
    ratio = rates[2] / rates[1]
    verdict = "meets" if ratio >= 1.7 else "misses"
    print(f"2 workers / 1 worker: {ratio:.2f}x ({verdict} the 1.7x target)")


if __name__ == "__main__":
    main()

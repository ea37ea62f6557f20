"""wrk runs against a gateway, and the figures they give.

Owns: the load every REST bench drives (wrk -t1 with CONNECTIONS connections
and ../shared/bench/wrk/bench.lua, which POSTs its 200-byte body.json and
prints one WRKJSON line of figures), scripts that extend bench.lua, one run
and its parsed figures, the gateway's CPU time per request over a run,
`measure` (serve a table, check its echo, warm up, one measured run),
`measure_alternating` (tables measured in turn, medians), and the columns
such a run is printed in. Prints nothing: figures.py does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from typing import TYPE_CHECKING

from .figures import Column, medians
from .processes import SHARED_BENCH, serving, tree_cpu_seconds

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from .tables import GatewayTable

WRK_DIR = SHARED_BENCH / "wrk"
WRK_SCRIPT = WRK_DIR / "bench.lua"
BODY_FILE = WRK_DIR / "body.json"
CONNECTIONS = 64
WARMUP_SECONDS = 1
_ERRORS = ("err_connect", "err_read", "err_write", "err_status", "err_timeout")
# The columns of a measured run, as every REST bench prints them (`run_cells`).
RUN_COLUMNS = (
    Column("req/s"),
    Column("p50 ms", ".2f", 8),
    Column("p99 ms", ".2f", 8),
    Column("CPU us/req", ".1f", 11),
    Column("errors", ".0f", 7),
)


def require_wrk() -> None:
    """Exits with how to install wrk when it is missing."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")


def wrk_script(path: Path, lua: str) -> Path:
    """A wrk script written to `path`: bench.lua, then `lua` (a header, say)."""
    path.write_text(f'dofile("{WRK_SCRIPT}")\n{lua}')
    return path


def wrk(
    url: str,
    duration: int,
    connections: int = CONNECTIONS,
    script: Path | None = None,
    **env: str,
) -> dict[str, float]:
    """One wrk -t1 run against `url`: the figures of the WRKJSON line its
    script prints (`script`: bench.lua by default; `env` adds environment
    variables for it, BENCH_METHOD=GET say), plus `rps` (requests per second)
    and `errors` (socket errors, timeouts and non-2xx answers)."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "-s",
            str(script or WRK_SCRIPT),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        env={"BENCH_BODY_FILE": str(BODY_FILE), "PATH": "/usr/bin:/bin", **env},
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    result: dict[str, float] = json.loads(line.removeprefix("WRKJSON "))
    result["errors"] = sum(result[key] for key in _ERRORS)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def drive(
    url: str,
    duration: int,
    pid: int,
    script: Path | None = None,
    connections: int = CONNECTIONS,
    **env: str,
) -> dict[str, float]:
    """`wrk` against the server `pid` (a gateway), plus `cpu_us`: the CPU
    microseconds its process tree spent per request over the run."""
    before = tree_cpu_seconds(pid)
    result = wrk(url, duration, connections, script, **env)
    # CPU per request moves far less than req/s when wrk and the upstream
    # compete for the same two cores.
    result["cpu_us"] = (tree_cpu_seconds(pid) - before) * 1e6 / max(result["requests"], 1)
    return result


def run_cells(result: dict[str, float]) -> tuple[float, ...]:
    """The RUN_COLUMNS cells of a `drive` or `measure` result."""
    return (
        result["rps"],
        result["p50_us"] / 1000,
        result["p99_us"] / 1000,
        result["cpu_us"],
        result["errors"],
    )


def check_echo(
    url: str,
    body: bytes | None = None,
    authorization: str | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """POST `body` (body.json by default) to `url`; exits unless the answer
    is the same JSON. `context` verifies an https URL."""
    body = BODY_FILE.read_bytes() if body is None else body
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=5, context=context) as answer:
        echoed = answer.read()
    if json.loads(echoed) != json.loads(body):
        raise SystemExit(f"{url} did not echo the body: {echoed[:200]!r}")


def measure(
    table: GatewayTable,
    workers: int,
    duration: int,
    log_level: str = "info",
    script: Path | None = None,
    before_run: Callable[[], object] | None = None,
    **env: str,
) -> dict[str, float]:
    """`tlvproxy serve` on `table`, POST /v1/echo checked, then driven by wrk
    (`script` and `env` as for `wrk`) for a warm-up and a measured run of
    `duration` seconds, then stopped; the measured run's figures (`drive`).
    `before_run` is called after the warm-up, just before the measured run."""
    with serving(table, workers, log_level) as process:
        url = table.url()
        check_echo(url, authorization=env.get("BENCH_AUTHORIZATION"))
        wrk(url, WARMUP_SECONDS, CONNECTIONS, script, **env)  # connections, pools, caches
        if before_run is not None:
            before_run()
        return drive(url, duration, process.pid, script, **env)


def measure_alternating(
    tables: Mapping[str, GatewayTable], rounds: int, duration: int
) -> dict[str, dict[str, float]]:
    """`measure` each of `tables` (1 worker) in turn, `rounds` times over, so
    that a drift of the box falls on every table alike; each table's figures,
    the medians of its runs."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in tables}
    for _ in range(rounds):
        for name, table in tables.items():
            runs[name].append(measure(table, 1, duration))
    return medians(runs)

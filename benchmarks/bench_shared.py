"""tlvproxy side by side with the reference peers, through the shared harness (../shared/bench).

Usage: python benchmarks/bench_shared.py [--quick] [--no-delay-run] [BENCH.PY OPTIONS ...]
  e.g. --repeat 1, --duration 5 (see bench.py --help); --repeat 3 by default

Adds four targets to the harness's nginx-lua, aiohttp, aiohttp-w2 and
trio-ceiling targets, each started by benchmarks/shared_target.py on the
harness's echo upstream: tlvproxy-json and tlvproxy-json-w2 (the `json` codec,
1 and 2 workers), and tlvproxy-pb and tlvproxy-pb-w2 (the protobuf route:
JSON -> bench.Echo -> JSON), with access records (to a file, as in
production they go to a pipe) and metrics on. `--quick` measures 4 s per
target after a 1 s warm-up.

A fifth target, tlvproxy-json-delay, is tlvproxy-json on an upstream that
answers after 1 ms: the harness's own echo program with a 1000 us delay
(what its `--upstream-delay-us 1000` starts), which this script builds in a
temporary directory and starts beside the harness's. It is measured in the
same run as tlvproxy-json, round-robin with it, so that its figure is set
beside a zero-delay figure of the same minutes: on this 2-core box, two runs
a few minutes apart differ by up to 10%. `--no-delay-run` leaves it out, as
does `--upstream-delay-us` (every target is delayed then). The harness
counts its echo's CPU in that target's "other cores" (about 0.06), not in
"upstream cores".

trio-ceiling is the harness's own trio + httptools translator with no logs,
metrics, policy or timeouts, built for few wake-ups: what the stack can do on
this box. tlvproxy's own work per request comes on top of it.

The harness runs under the system python3 (it installs aiohttp there, never
in this virtualenv). Its correctness check compares the echoed JSON with the
sent JSON; the protobuf route answers in the proto3 JSON mapping (int64
values as strings, defaults emitted), so for the `tlvproxy-pb*` targets only,
both sides are normalised that way before they are compared.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from harness.processes import echo_upstream

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent
BENCH_DIR = HERE.parent.parent / "shared" / "bench"
PEERS = "nginx-lua,aiohttp,aiohttp-w2,trio-ceiling"

# Run by the system python3 in BENCH_DIR: bench.py with the protobuf targets'
# comparison normalised, everything else untouched.
_BOOTSTRAP = """
import sys
sys.path.insert(0, ".")
import bench

def _normal(value):
    if isinstance(value, dict):
        pairs = ((k, _normal(v)) for k, v in value.items())
        return {k: v for k, v in pairs if v not in (0, "", False, None, [], {})}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value

_same_json = bench._same_json
_smoke = bench.smoke

def _proto3_same_json(a, b):
    try:
        return _normal(bench.json.loads(a)) == _normal(bench.json.loads(b))
    except ValueError:
        return False

def smoke(target, body):
    bench._same_json = _proto3_same_json if target.name.startswith("tlvproxy-pb") else _same_json
    try:
        return _smoke(target, body)
    finally:
        bench._same_json = _same_json

bench.smoke = smoke
sys.argv = ["bench.py"] + sys.argv[1:]
try:
    rc = bench.main()
finally:
    bench.stop_all()
sys.exit(rc)
"""


# In the order the harness measures them, round after round: the 1-worker
# targets whose figures are set beside one another next to each other.
TARGETS = {
    "tlvproxy-json": "--route json --workers 1",
    "tlvproxy-pb": "--route protobuf --workers 1",
    "tlvproxy-json-delay": "--route json --workers 1",  # on the delayed upstream
    "tlvproxy-json-w2": "--route json --workers 2",
    "tlvproxy-pb-w2": "--route protobuf --workers 2",
}
DELAYED = "tlvproxy-json-delay"
DELAY_US = 1000


def target_options(delayed_upstream: str | None) -> list[str]:
    """The harness's --start options for TARGETS: DELAYED on `delayed_upstream`
    (HOST:PORT), or left out when it is None; the others on the harness's
    upstream."""
    launcher = f"{sys.executable} {HERE / 'shared_target.py'} --port {{port}} --upstream"
    options = []
    for name, route in TARGETS.items():
        upstream = delayed_upstream if name == DELAYED else "{upstream}"
        if upstream is not None:
            options += ["--start", f"{name}={launcher} {upstream} {route}"]
    return options


@contextlib.contextmanager
def delayed_echo() -> Iterator[str]:
    """The harness's echo upstream answering after DELAY_US, on a free
    127.0.0.1 port; yields its HOST:PORT, and stops it on the way out."""
    with (
        tempfile.TemporaryDirectory() as directory,
        echo_upstream(Path(directory), DELAY_US) as port,
    ):
        yield f"127.0.0.1:{port}"


def harness(python: str, peers: str, args: list[str], delayed_upstream: str | None) -> int:
    """One run of the harness: the built-in `peers` and the tlvproxy targets
    (DELAYED on `delayed_upstream`, or none when it is None)."""
    # Results go to our build/ folder: ../shared is the team's, not a scratch space.
    results = HERE.parent / "build" / "bench-results"
    command = [
        python,
        "-c",
        _BOOTSTRAP,
        "--targets",
        peers,
        "--out",
        str(results),
        *target_options(delayed_upstream),
        *args,
    ]
    process = subprocess.Popen(command, cwd=BENCH_DIR)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # The harness has the Ctrl-C too: let it stop what it started.
        process.wait()
        raise


def main() -> None:
    # A SIGTERM or SIGHUP unwinds as an exit, so delayed_echo stops its echo.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))
    args = sys.argv[1:]
    if "--quick" in args:
        args.remove("--quick")
        args = ["--duration", "4", "--warmup", "1", "--settle", "5", *args]
    delay_run = "--no-delay-run" not in args
    if not delay_run:
        args.remove("--no-delay-run")
    python = shutil.which("python3")
    if python is None or not (BENCH_DIR / "bench.py").is_file():
        sys.exit(f"bench_shared: needs python3 and {BENCH_DIR}/bench.py")
    # Medians of three rounds: one run on the 2-core box moves by 10% or more.
    repeat = [] if "--repeat" in args else ["--repeat", "3"]
    # With --upstream-delay-us every target is delayed already.
    delayed = any(a.split("=", 1)[0] == "--upstream-delay-us" for a in args)
    if not delay_run or delayed:
        rc = harness(python, PEERS, [*repeat, *args], None)
    else:
        with delayed_echo() as upstream:
            rc = harness(python, PEERS, [*repeat, *args], upstream)
    sys.exit(rc)


if __name__ == "__main__":
    main()

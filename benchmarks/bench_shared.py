"""tlvproxy side by side with the reference peers, through the shared harness (../shared/bench).

Usage: python benchmarks/bench_shared.py [--quick] [--no-delay-run] [BENCH.PY OPTIONS ...]
  e.g. --repeat 1, --duration 5 (see bench.py --help); --repeat 3 by default

Adds four targets to the harness's nginx-lua, aiohttp, aiohttp-w2 and
trio-ceiling targets, each started by benchmarks/shared_target.py on the
harness's echo upstream: tlvproxy-json and tlvproxy-json-w2 (the `json` codec,
1 and 2 workers), and tlvproxy-pb and tlvproxy-pb-w2 (the protobuf route:
JSON -> bench.Echo -> JSON), with access records (to a file, as in
production they go to a pipe) and metrics on. `--quick` measures 4 s per
target after a 1 s warm-up. A second run then measures tlvproxy-json alone
with `--upstream-delay-us 1000` (an upstream answering after 1 ms), to set
beside its zero-delay figure; `--no-delay-run` skips it.

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

import shutil
import subprocess
import sys
from pathlib import Path

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


TARGETS = {
    "tlvproxy-json": "--route json --workers 1",
    "tlvproxy-json-w2": "--route json --workers 2",
    "tlvproxy-pb": "--route protobuf --workers 1",
    "tlvproxy-pb-w2": "--route protobuf --workers 2",
}


def target_options(names: list[str]) -> list[str]:
    """The harness's --start options for the tlvproxy targets `names`."""
    launcher = (
        f"{sys.executable} {HERE / 'shared_target.py'} --port {{port}} --upstream {{upstream}}"
    )
    options = []
    for name in names:
        options += ["--start", f"{name}={launcher} {TARGETS[name]}"]
    return options


def harness(python: str, peers: str, names: list[str], args: list[str]) -> int:
    """One run of the harness: the built-in `peers` and the tlvproxy targets `names`."""
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
        *target_options(names),
        *args,
    ]
    return subprocess.run(command, cwd=BENCH_DIR, check=False).returncode


def main() -> None:
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
    rc = harness(python, PEERS, list(TARGETS), [*repeat, *args])
    if delay_run and "--upstream-delay-us" not in args:
        # The json route again, with an upstream that answers after 1 ms: the
        # gateway must keep its throughput with many requests waiting.
        print("\n== the json route with --upstream-delay-us 1000", flush=True)
        delayed = [*repeat, *args, "--upstream-delay-us", "1000"]
        rc = harness(python, "", ["tlvproxy-json"], delayed) or rc
    sys.exit(rc)


if __name__ == "__main__":
    main()

"""Run the benchmarks (`make bench`): every benchmarks/bench_*.py, or the ones named.

Usage: python benchmarks/run.py [NAME ...]   where NAME is `framing` or `bench_framing`.
Each module is a script whose main() prints its figures; each runs in its own
interpreter, so one benchmark's garbage and caches do not slow the next.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def select(names: list[str]) -> list[Path]:
    """The benchmark scripts to run, in name order; exits 2 on an unknown name."""
    available = {path.stem: path for path in sorted(HERE.glob("bench_*.py"))}
    if not names:
        return list(available.values())
    chosen = []
    for name in names:
        stem = name if name.startswith("bench_") else f"bench_{name}"
        stem = stem.removesuffix(".py")
        if stem not in available:
            known = ", ".join(s.removeprefix("bench_") for s in available) or "none"
            sys.exit(f"run.py: no benchmark {name!r} (available: {known})")
        chosen.append(available[stem])
    return chosen


def main() -> None:
    scripts = select(sys.argv[1:])
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"tlvproxy benchmarks  {now}")
    print(
        f"nproc {os.cpu_count()}  python {platform.python_version()} "
        f"({platform.python_implementation()})  {platform.machine()} {platform.system()}"
    )
    failed = []
    for script in scripts:
        print(f"\n== {script.stem.removeprefix('bench_')}", flush=True)
        if subprocess.run([sys.executable, str(script)], check=False).returncode != 0:
            failed.append(script.stem)
    if failed:
        sys.exit(f"run.py: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

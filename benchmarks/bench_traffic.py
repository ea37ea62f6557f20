"""The cost of traffic rules on a REST request (issue 20): a split rule and a
100% mirror vs the same command without them.

Same machine, same run, same gateway process settings: `tlvproxy serve` (one
worker) on the demo table in front of the C echo upstream, POST /v1/echo with
the shared bench's 200-byte JSON body under wrk -t1 -c64, in three tables:

- `none`: echo as the demo table has it;
- `split + mirror`: echo with one split rule evaluated on every request
  (`percent: 0` of `remote_addr`: the stable hash is computed, and the rule
  takes no request, so every request is also copied) and `mirror: {to:
  echo_next}` copying every request to `echo_next`, the same word on a second
  upstream, a second C echo server;
- `split + mirror + compare`: the same with `compare: true`, both answers
  decoded and compared.

Before measuring, each table with a mirror is checked: its copies reach the
second upstream and are answered (and compared the same). The tables are run
`--rounds` times (default 5), alternating, and each figure is the median of
its runs: single runs on the shared 2-core box move by 10% and more. The
gateway's CPU time per request is printed too, steadier than req/s when wrk
and the two upstreams compete for the cores; the mirror's copies are part of
the request's cost.

Run: .venv/bin/python benchmarks/bench_traffic.py [--duration 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from bench_upstream import build_echo, start_echo
from bench_workers import CONNECTIONS, WRK, check_echo, measure, serving, write_table

ECHO_NEXT = {"name": "echo_next", "command": 0x1003, "upstream": "im_next", "codec": "json"}
SPLIT = [{"key": "remote_addr", "percent": 0, "to": "echo_next"}]


def tables(directory: Path, port: int, next_port: int) -> dict[str, tuple[Path, int, int]]:
    """The three tables by name: (path, http port, admin port)."""
    found = {}
    for name, rules in (
        ("none", {}),
        ("split + mirror", {"split": SPLIT, "mirror": {"to": "echo_next"}}),
        (
            "split + mirror + compare",
            {"split": SPLIT, "mirror": {"to": "echo_next", "compare": True}},
        ),
    ):
        place = directory / name.replace(" ", "").replace("+", "_")
        place.mkdir()
        path, http_port, admin_port = write_table(place, port)
        document = yaml.safe_load(path.read_text())
        document["upstreams"]["im_next"] = {"nodes": [f"127.0.0.1:{next_port}"]}
        commands = [{**c, **rules} if c["name"] == "echo" else c for c in document["commands"]]
        document["commands"] = [*commands, ECHO_NEXT]
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        found[name] = (path, http_port, admin_port)
    return found


def mirrored(admin_port: int) -> dict[str, float]:
    """echo's tlvproxy_mirror_total by outcome, from the gateway's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith('tlvproxy_mirror_total{command="echo",outcome="'):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = float(line.rsplit(" ", 1)[1])
    return found


def check_mirror(path: Path, http_port: int, admin_port: int, compare: bool) -> None:
    """The copies reach the second upstream and are answered (and the same)."""
    with serving(path, admin_port) as _process:
        url = f"http://127.0.0.1:{http_port}/v1/echo"
        for _ in range(20):
            check_echo(url, (WRK / "body.json").read_bytes())
        expected = "same" if compare else "answered"
        for _ in range(50):
            outcomes = mirrored(admin_port)
            if outcomes.get(expected) == 20:
                return
            time.sleep(0.1)  # the outcomes are worked out just after the answers
        raise SystemExit(f"{path}: the mirror's copies were not {expected}: {outcomes}")


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=5)
    args = options.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        binary = build_echo(Path(workdir))
        echo, port = start_echo(binary)
        echo_next, next_port = start_echo(binary)
        try:
            found = tables(Path(workdir), port, next_port)
            for name, (path, http_port, admin_port) in found.items():
                if name != "none":
                    check_mirror(path, http_port, admin_port, compare="compare" in name)
            print(
                f"POST /v1/echo (json codec, 200-byte body), 1 worker, wrk -t1 -c{CONNECTIONS} "
                f"-d{args.duration}s, two C echo upstreams; medians of {args.rounds} "
                "alternating runs"
            )
            print(
                f"{'rules':<26} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                f"{'CPU us/req':>11} {'errors':>7}"
            )
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in found}
            for _ in range(args.rounds):
                for name, (path, http_port, admin_port) in found.items():
                    runs[name].append(
                        measure(path, http_port, admin_port, 1, args.duration, "info")
                    )
            median: dict[str, dict[str, Any]] = {
                name: {key: statistics.median(run[key] for run in results) for key in results[0]}
                for name, results in runs.items()
            }
            for name, result in median.items():
                print(
                    f"{name:<26} {result['rps']:>10.0f} {result['p50_us'] / 1000:>8.2f} "
                    f"{result['p99_us'] / 1000:>8.2f} {result['cpu_us']:>11.1f} "
                    f"{result['errors']:>7.0f}"
                )
        finally:
            for process in (echo, echo_next):
                process.terminate()
                process.wait()
    base = median["none"]
    for name, result in median.items():
        if name == "none":
            continue
        extra = result["cpu_us"] - base["cpu_us"]
        slower = 1 - result["rps"] / base["rps"]
        print(
            f"{name}: +{extra:.1f} us CPU per request (+{extra / base['cpu_us']:.1%}), "
            f"{slower:.1%} fewer req/s"
        )


if __name__ == "__main__":
    main()

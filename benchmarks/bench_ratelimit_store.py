"""The cost of shared rate-limit stores on REST throughput (issue 17).

`tlvproxy serve` on the demo table in front of the C echo upstream, POST
/v1/echo with the shared bench's 200-byte JSON body under wrk -t1 -c64 (the
plumbing of bench_workers.py), with 1 and with 2 workers:

- no `rate_limits`, against 10 rules on `echo` with `store: local` (the
  rules of bench_policy_rest.py, whose rates refuse nothing: the cost measured
  is the LMDB work, one write transaction per request); target: within 15%;
- one rule with `store: redis` on a redis-server the benchmark starts (Debian's,
  `make test-deps`): the throughput, the p99 it adds over no limits, and the
  Redis round trips per request: the EVALSHAs per request, from INFO
  commandstats before and after the measured run, bound them (one per
  request; the checks of one scheduler pass share one pipeline, so round
  trips are fewer still). commandstats also counts the calls the script
  makes inside Redis (TIME, GET, SET), printed apart: they cost no round trip.

The configurations run `--rounds` times (default 3), alternating; each figure
is the median of its runs, as single runs on the shared 2-core box move by 10%
and more.

Run: .venv/bin/python benchmarks/bench_ratelimit_store.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from bench_policy_rest import policy_rules
from bench_upstream import build_echo, start_echo
from bench_workers import CONNECTIONS, ROOT, measure, write_table

sys.path.insert(0, str(ROOT))
from tests.stores.redis_server import RedisServer  # the tests' redis-server

_REDIS_RULE = {
    "name": "shared",
    "commands": ["echo"],
    "key": "remote_addr",
    "rate": "1000000/s",
    "burst": 1000000,
    "store": "redis",
}


def redis_commands(redis: RedisServer) -> dict[str, int]:
    """Calls per command so far, from INFO commandstats (INFO itself left out)."""
    calls = {}
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_") and not line.startswith("cmdstat_info:"):
            name, _, fields = line.removeprefix("cmdstat_").partition(":")
            calls[name] = int(dict(part.split("=") for part in fields.split(","))["calls"])
    return calls


def tables(workdir: Path, port: int, redis: RedisServer) -> dict[str, tuple[Path, int, int]]:
    local_rules, _ = policy_rules()
    variants = {
        "none": {"rate_limits": []},
        "10 local": {"rate_limits": local_rules},
        "1 redis": {"rate_limits": [_REDIS_RULE], "redis": {"url": redis.url}},
    }
    found = {}
    for name, overrides in variants.items():
        directory = workdir / name.replace(" ", "_")
        directory.mkdir()
        path, http_port, admin_port = write_table(directory, port)
        document = yaml.safe_load(path.read_text())
        document.update(overrides)
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        found[name] = (path, http_port, admin_port)
    return found


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=3)
    args = options.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        echo, port = start_echo(build_echo(Path(workdir)))
        try:
            configurations = tables(Path(workdir), port, redis)
            runs: dict[tuple[str, int], list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for workers in (1, 2):
                    for name, (path, http_port, admin_port) in configurations.items():
                        before: dict[str, int] = {}
                        result = measure(
                            path,
                            http_port,
                            admin_port,
                            workers,
                            args.duration,
                            "info",
                            before_run=lambda before=before: before.update(redis_commands(redis)),
                        )
                        after = redis_commands(redis)
                        result["evalsha"] = after.get("evalsha", 0) - before.get("evalsha", 0)
                        result["commands"] = sum(after.values()) - sum(before.values())
                        runs.setdefault((name, workers), []).append(result)
        finally:
            echo.terminate()
            echo.wait()
            redis.stop()
    median = {
        key: {field: statistics.median(run[field] for run in results) for field in results[0]}
        for key, results in runs.items()
    }
    print(
        f"POST /v1/echo (json codec, 200-byte body), wrk -t1 -c{CONNECTIONS} "
        f"-d{args.duration}s, C echo upstream; medians of {args.rounds} alternating runs"
    )
    print(
        f"{'limits':<10} {'workers':>7} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/req':>11} {'errors':>7}"
    )
    for (name, workers), result in median.items():
        print(
            f"{name:<10} {workers:>7} {result['rps']:>10.0f} {result['p50_us'] / 1000:>8.2f} "
            f"{result['p99_us'] / 1000:>8.2f} {result['cpu_us']:>11.1f} {result['errors']:>7.0f}"
        )
    for workers in (1, 2):
        none = median[("none", workers)]
        local = median[("10 local", workers)]
        shared = median[("1 redis", workers)]
        slower = 1 - local["rps"] / none["rps"]
        verdict = "meets" if slower < 0.15 else "misses"
        print(
            f"{workers} worker(s): 10 local limits {slower:.1%} slower than none "
            f"({verdict} the within-15% target)"
        )
        requests = max(shared["requests"], 1)
        print(
            f"{workers} worker(s): 1 redis limit: {shared['rps']:.0f} req/s, p99 "
            f"+{(shared['p99_us'] - none['p99_us']) / 1000:.2f} ms over none; "
            f"{shared['evalsha'] / requests:.3f} EVALSHA per request, so at most that "
            f"many round trips (target: <= 1); {shared['commands'] / requests:.3f} Redis "
            "commands per request with the script's own TIME, GET and SET"
        )


if __name__ == "__main__":
    main()

"""The cost of shared rate-limit stores on REST throughput (issue 17).

`tlvproxy serve` on the tests' demo table in front of the C echo upstream, POST
/v1/echo with the shared bench's 200-byte JSON body under wrk -t1 -c64
(benchmarks/harness), with 1 and with 2 workers:

- no `rate_limits`, against 10 rules on `echo` with `store: local` (the
  rules of bench_policy_rest.py, whose rates refuse nothing: the cost measured
  is the LMDB work, one write transaction per worker's scheduler pass, with
  1 worker the process's own buckets); target: within 15%;
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
import sys
import tempfile
from pathlib import Path

from bench_policy_rest import policy_rules
from harness.figures import Column, FigureTable, medians, print_target
from harness.load import CONNECTIONS, RUN_COLUMNS, measure, require_wrk, run_cells
from harness.processes import ROOT, echo_upstream
from harness.tables import GatewayTable, write_demo_table

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
WORKERS = (1, 2)
TARGET_SLOWER = 0.15  # 10 local limits against none


def redis_commands(redis: RedisServer) -> dict[str, int]:
    """Calls per command so far, from INFO commandstats (INFO itself left out)."""
    calls = {}
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_") and not line.startswith("cmdstat_info:"):
            name, _, fields = line.removeprefix("cmdstat_").partition(":")
            calls[name] = int(dict(part.split("=") for part in fields.split(","))["calls"])
    return calls


def tables(workdir: Path, port: int, redis: RedisServer) -> dict[str, GatewayTable]:
    local_rules, _ = policy_rules()
    variants = {
        "none": {"rate_limits": []},
        "10 local": {"rate_limits": local_rules},
        "1 redis": {"rate_limits": [_REDIS_RULE], "redis": {"url": redis.url}},
    }
    return {
        name: write_demo_table(workdir / f"table-{n}.yaml", port, overrides)
        for n, (name, overrides) in enumerate(variants.items())
    }


def measure_redis(
    table: GatewayTable, workers: int, duration: int, redis: RedisServer
) -> dict[str, float]:
    """`measure`, plus the EVALSHA calls and all Redis commands of the measured run."""
    before: dict[str, int] = {}
    result = measure(
        table, workers, duration, before_run=lambda: before.update(redis_commands(redis))
    )
    after = redis_commands(redis)
    result["evalsha"] = after.get("evalsha", 0) - before.get("evalsha", 0)
    result["commands"] = sum(after.values()) - sum(before.values())
    return result


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=3)
    args = options.parse_args()
    require_wrk()
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        try:
            with echo_upstream(Path(workdir)) as port:
                configurations = tables(Path(workdir), port, redis)
                for _ in range(args.rounds):
                    for workers in WORKERS:
                        for name, table in configurations.items():
                            result = measure_redis(table, workers, args.duration, redis)
                            runs.setdefault((name, workers), []).append(result)
        finally:
            redis.stop()
    median = medians(runs)
    figures = FigureTable(
        f"POST /v1/echo (json codec, 200-byte body), wrk -t1 -c{CONNECTIONS} "
        f"-d{args.duration}s, C echo upstream; medians of {args.rounds} alternating runs",
        "limits",
        10,
        [Column("workers", ".0f", 7), *RUN_COLUMNS],
    )
    for (name, workers), result in median.items():
        figures.row(name, workers, *run_cells(result))
    against = FigureTable(
        "against no limits",
        "workers",
        7,
        [
            Column("10 local: req/s", "+.1%"),
            Column("1 redis: p99 ms added", "+.2f"),
            Column("EVALSHA/req", ".3f"),
            Column("Redis commands/req", ".3f"),
        ],
        notes=[
            "EVALSHA per request bounds the Redis round trips per request (the checks of",
            "one scheduler pass share one pipeline, so round trips are fewer still); target:",
            "at most 1, but Redis also counts the requests still in flight when wrk stops,",
            "which wrk does not (a few thousandths more). Redis commands add the script's",
            "own TIME, GET and SET, which cost no round trip.",
        ],
    )
    for workers in WORKERS:
        none, shared = median[("none", workers)], median[("1 redis", workers)]
        requests = max(shared["requests"], 1)
        against.row(
            str(workers),
            median[("10 local", workers)]["rps"] / none["rps"] - 1,
            (shared["p99_us"] - none["p99_us"]) / 1000,
            shared["evalsha"] / requests,
            shared["commands"] / requests,
        )
    for workers in WORKERS:
        slower = 1 - median[("10 local", workers)]["rps"] / median[("none", workers)]["rps"]
        print_target(
            f"{workers} worker(s), req/s lost to 10 local limits", slower, "<", TARGET_SLOWER, ".1%"
        )


if __name__ == "__main__":
    main()

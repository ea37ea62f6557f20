"""REST throughput of `tlvproxy serve` with 1 worker and with 2 workers (issue 8).

Builds the C echo upstream (../shared/bench/upstream), writes the tests' demo
table pointing at it, starts `tlvproxy serve --workers N` as a real process,
checks that POST /v1/echo echoes the body, then drives it with wrk -t1 -c64
(a 1 s warm-up, then the measured run) using ../shared/bench/wrk/bench.lua and
its 200-byte JSON body, all through benchmarks/harness. Load generator,
gateway and upstream share the machine, as in production-like runs on the
2-core development box. Prints req/s, p50/p99, the gateway's CPU per request
and the 2-worker/1-worker ratio (the issue's target: at least 1.7).

Run: .venv/bin/python benchmarks/bench_workers.py [--duration 5] [--log-level info]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness.figures import FigureTable, print_target
from harness.load import CONNECTIONS, RUN_COLUMNS, measure, require_wrk, run_cells
from harness.processes import echo_upstream
from harness.tables import write_demo_table

TARGET = 1.7  # 2 workers' req/s over 1 worker's


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--log-level", default="info", choices=("info", "warning"))
    args = options.parse_args()
    require_wrk()
    rates = {}
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        with echo_upstream(directory) as port:
            table = write_demo_table(directory / "commands.yaml", port)
            figures = FigureTable(
                f"POST /v1/echo (json codec, 200-byte body), wrk -t1 -c{CONNECTIONS} "
                f"-d{args.duration}s, C echo upstream, log level {args.log_level}",
                "workers",
                8,
                RUN_COLUMNS,
            )
            for workers in (1, 2):
                result = measure(table, workers, args.duration, args.log_level)
                rates[workers] = result["rps"]
                figures.row(str(workers), *run_cells(result))
    print_target("2 workers / 1 worker, req/s", rates[2] / rates[1], ">=", TARGET, ".2f", "x")


if __name__ == "__main__":
    main()

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
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from harness.figures import Column, FigureTable
from harness.load import (
    CONNECTIONS,
    RUN_COLUMNS,
    check_echo,
    measure_alternating,
    require_wrk,
    run_cells,
)
from harness.processes import echo_upstream, serving
from harness.tables import DEMO_TABLE, GatewayTable, write_demo_table

ECHO_NEXT = {"name": "echo_next", "command": 0x1003, "upstream": "im_next", "codec": "json"}
SPLIT = [{"key": "remote_addr", "percent": 0, "to": "echo_next"}]
VARIANTS: dict[str, dict[str, object]] = {
    "none": {},
    "split + mirror": {"split": SPLIT, "mirror": {"to": "echo_next"}},
    "split + mirror + compare": {"split": SPLIT, "mirror": {"to": "echo_next", "compare": True}},
}


def write_tables(directory: Path, port: int, next_port: int) -> dict[str, GatewayTable]:
    """The three tables by name."""
    demo = yaml.safe_load(DEMO_TABLE.read_text())
    upstreams = {
        **demo["upstreams"],
        "im": {**demo["upstreams"]["im"], "nodes": [f"127.0.0.1:{port}"]},
        "im_next": {"nodes": [f"127.0.0.1:{next_port}"]},
    }
    found = {}
    for n, (name, rules) in enumerate(VARIANTS.items()):
        commands = [{**c, **rules} if c["name"] == "echo" else c for c in demo["commands"]]
        overrides = {"upstreams": upstreams, "commands": [*commands, ECHO_NEXT]}
        found[name] = write_demo_table(directory / f"table-{n}.yaml", port, overrides)
    return found


def mirrored(table: GatewayTable) -> dict[str, float]:
    """echo's tlvproxy_mirror_total by outcome, from the gateway's metrics."""
    url = f"http://127.0.0.1:{table.admin}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith('tlvproxy_mirror_total{command="echo",outcome="'):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = float(line.rsplit(" ", 1)[1])
    return found


def check_mirror(table: GatewayTable, compare: bool) -> None:
    """The copies reach the second upstream and are answered (and the same)."""
    with serving(table):
        for _ in range(20):
            check_echo(table.url())
        expected = "same" if compare else "answered"
        for _ in range(50):
            outcomes = mirrored(table)
            if outcomes.get(expected) == 20:
                return
            time.sleep(0.1)  # the outcomes are worked out just after the answers
        raise SystemExit(f"{table.path}: the mirror's copies were not {expected}: {outcomes}")


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=5)
    args = options.parse_args()
    require_wrk()
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        for place in ("first", "second"):
            (directory / place).mkdir()
        with (
            echo_upstream(directory / "first") as port,
            echo_upstream(directory / "second") as next_port,
        ):
            tables = write_tables(directory, port, next_port)
            for name, table in tables.items():
                if name != "none":
                    check_mirror(table, compare="compare" in name)
            median = measure_alternating(tables, args.rounds, args.duration)
    figures = FigureTable(
        f"POST /v1/echo (json codec, 200-byte body), 1 worker, wrk -t1 -c{CONNECTIONS} "
        f"-d{args.duration}s, two C echo upstreams; medians of {args.rounds} alternating runs",
        "rules",
        26,
        RUN_COLUMNS,
    )
    for name, result in median.items():
        figures.row(name, *run_cells(result))
    base = median["none"]
    against = FigureTable(
        "against none",
        "rules",
        26,
        [
            Column("req/s change", "+.1%"),
            Column("CPU us/req added", "+.1f"),
            Column("CPU change", "+.1%"),
        ],
    )
    for name, result in median.items():
        if name != "none":
            extra = result["cpu_us"] - base["cpu_us"]
            against.row(name, result["rps"] / base["rps"] - 1, extra, extra / base["cpu_us"])


if __name__ == "__main__":
    main()

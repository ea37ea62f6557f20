"""The cost of policy on REST throughput (issue 7): 10 rate limits and 50 WAF rules vs none.

Same machine, same run, same gateway process settings (benchmarks/harness):
`tlvproxy serve` (one worker) on the tests' demo table in front of the C echo
upstream, POST /v1/echo with the shared bench's 200-byte JSON body under wrk
-t1 -c64, first with no
`rate_limits` and no `waf`, then with 10 rate-limit rules that all apply to
`echo` (rates high enough that nothing is refused: the cost measured is the
bucket work, not refusals) and 50 WAF rules over path, query, body and headers
(the demo's three plus 47 probes of the same kind; none matches the body).
The pair is run `--rounds` times (default 9), alternating, and each figure is
the median of its runs: single runs on the shared 2-core box move by 10% and
more. The gateway's CPU time per request is printed too, steadier than req/s
when wrk and the upstream compete for the cores. Target: less than 15% fewer
req/s with the policy than without.

Run: .venv/bin/python benchmarks/bench_policy_rest.py [--duration 5] [--rounds 9]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from harness.figures import Column, FigureTable, print_target
from harness.load import CONNECTIONS, RUN_COLUMNS, measure_alternating, require_wrk, run_cells
from harness.processes import echo_upstream
from harness.tables import DEMO_TABLE, write_demo_table

_PROBES = (
    "eval",
    "assert",
    "base64_decode",
    "system",
    "passthru",
    "shell_exec",
    "popen",
    "proc_open",
    "pcntl_exec",
    "include",
    "require",
    "file_get_contents",
    "file_put_contents",
    "fopen",
    "unlink",
    "phpinfo",
    "create_function",
    "call_user_func",
    "preg_replace",
    "gzinflate",
    "str_rot13",
    "exec",
    "curl_exec",
    "fsockopen",
)


def policy_rules() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """10 rate-limit rules on `echo` and 50 WAF rules (none matches the bench body)."""
    keys = ["remote_addr", "header.X-User-Id", "query.did", "header.User-Agent", "cookie.sid"]
    rate_limits = [
        {
            "name": f"limit_{n}",
            "commands": ["echo"],
            "key": keys[n % len(keys)],
            "rate": "1000000/s",
            "burst": 1000000,
        }
        for n in range(10)
    ]
    document = yaml.safe_load(DEMO_TABLE.read_text())
    waf: list[dict[str, object]] = list(document["waf"])
    for n, name in enumerate(_PROBES):
        waf.append(
            {
                "name": f"php_{name}",
                "in": ["path", "query", "body", "headers"],
                "pattern": rf"(?i)\b{name}\s*\(",
                "action": "deny",
            }
        )
        if len(waf) < 50:
            waf.append(
                {
                    "name": f"sql_{n}",
                    "in": ["query", "body"],
                    "pattern": rf"(?i)\b(select|insert|update|delete)\s+\w+\s+{name}\b",
                    "action": "log",
                }
            )
    return rate_limits, waf[:50]


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=9)
    args = options.parse_args()
    require_wrk()
    rate_limits, waf = policy_rules()
    variants = {
        "none": {"rate_limits": [], "waf": []},
        "10 limits + 50 WAF": {"rate_limits": rate_limits, "waf": waf},
    }
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        with echo_upstream(directory) as port:
            tables = {
                name: write_demo_table(directory / f"table-{n}.yaml", port, overrides)
                for n, (name, overrides) in enumerate(variants.items())
            }
            median = measure_alternating(tables, args.rounds, args.duration)
    figures = FigureTable(
        f"POST /v1/echo (json codec, 200-byte body), 1 worker, wrk -t1 -c{CONNECTIONS} "
        f"-d{args.duration}s, C echo upstream; medians of {args.rounds} alternating runs",
        "policy",
        20,
        RUN_COLUMNS,
    )
    for name, result in median.items():
        figures.row(name, *run_cells(result))
    none, full = (median[name] for name in variants)
    extra = full["cpu_us"] - none["cpu_us"]
    FigureTable(
        "with policy against none",
        "policy",
        20,
        [
            Column("req/s change", "+.1%"),
            Column("CPU us/req added", "+.1f"),
            Column("CPU change", "+.1%"),
        ],
    ).row("10 limits + 50 WAF", full["rps"] / none["rps"] - 1, extra, extra / none["cpu_us"])
    print_target("req/s lost to policy", 1 - full["rps"] / none["rps"], "<", 0.15, ".1%")


if __name__ == "__main__":
    main()

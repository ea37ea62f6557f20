"""The cost of policy on REST throughput (issue 7): 10 rate limits and 50 WAF rules vs none.

Same machine, same run, same gateway process settings: `tlvproxy serve` (one
worker) on the demo table in front of the C echo upstream, POST /v1/echo with
the shared bench's 200-byte JSON body under wrk -t1 -c64, first with no
`rate_limits` and no `waf`, then with 10 rate-limit rules that all apply to
`echo` (rates high enough that nothing is refused: the cost measured is the
bucket work, not refusals) and 50 WAF rules over path, query, body and headers
(the demo's three plus 47 probes of the same kind; none matches the body).
The pair is run `--rounds` times (default 5), alternating, and each figure is
the median of its runs: single runs on the shared 2-core box move by 10% and
more. The gateway's CPU time per request is printed too, steadier than req/s
when wrk and the upstream compete for the cores.

Run: .venv/bin/python benchmarks/bench_policy_rest.py [--duration 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml
from bench_upstream import build_echo, start_echo
from bench_workers import CONNECTIONS, measure, write_table

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
    fixture = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "table.yaml"
    document = yaml.safe_load(fixture.read_text())
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
    options.add_argument("--rounds", type=int, default=5)
    args = options.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    rate_limits, waf = policy_rules()
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        echo, port = start_echo(build_echo(Path(workdir)))
        try:
            tables = {}
            for name, overrides in (
                ("none", {"rate_limits": [], "waf": []}),
                ("10 limits + 50 WAF", {"rate_limits": rate_limits, "waf": waf}),
            ):
                directory = Path(workdir) / name.replace(" ", "_")
                directory.mkdir()
                path, http_port, admin_port = write_table(directory, port)
                document = yaml.safe_load(path.read_text())
                document.update(overrides)
                path.write_text(yaml.safe_dump(document, sort_keys=False))
                tables[name] = (path, http_port, admin_port)
            print(
                f"POST /v1/echo (json codec, 200-byte body), 1 worker, wrk -t1 -c{CONNECTIONS} "
                f"-d{args.duration}s, C echo upstream; medians of {args.rounds} alternating runs"
            )
            print(
                f"{'policy':<20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                f"{'CPU us/req':>11} {'errors':>7}"
            )
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in tables}
            for _ in range(args.rounds):
                for name, (path, http_port, admin_port) in tables.items():
                    runs[name].append(
                        measure(path, http_port, admin_port, 1, args.duration, "info")
                    )
            median = {
                name: {key: statistics.median(run[key] for run in results) for key in results[0]}
                for name, results in runs.items()
            }
            for name, result in median.items():
                print(
                    f"{name:<20} {result['rps']:>10.0f} {result['p50_us'] / 1000:>8.2f} "
                    f"{result['p99_us'] / 1000:>8.2f} {result['cpu_us']:>11.1f} "
                    f"{result['errors']:>7.0f}"
                )
        finally:
            echo.terminate()
            echo.wait()
    none, full = (median[name] for name in tables)
    slower = 1 - full["rps"] / none["rps"]
    verdict = "meets" if slower < 0.15 else "misses"
    print(f"with policy: {slower:.1%} slower ({verdict} the under-15% target)")
    extra = full["cpu_us"] - none["cpu_us"]
    print(f"CPU per request: +{extra:.1f} us (+{extra / none['cpu_us']:.1%}) with policy")


if __name__ == "__main__":
    main()

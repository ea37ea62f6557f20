"""Table load time (issue 3): 500 commands over a 200-message .proto, target < 1 s.

Generates the .proto and commands.yaml in a temporary directory, then times
`load_table` (YAML, validation, protoc, descriptor pool, 500 codecs, router) and,
separately, `compile_schema` alone and matching routes on the loaded router;
printed through benchmarks/harness. Run: `.venv/bin/python benchmarks/bench_table.py`.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from harness.figures import Column, FigureTable, print_target, timings

from tlvproxy.config.loader import load_table
from tlvproxy.errors import MethodNotAllowed, RouteNotFound
from tlvproxy.schema.protos import compile_schema

MESSAGES = 200
COMMANDS = 500
RUNS = 5
TARGET_MS = 1000  # load_table, median
MATCHES = 100_000


def make_proto() -> str:
    lines = ['syntax = "proto3";', "package bench;", "", "enum Kind { KIND_NONE = 0; KIND_A = 1; }"]
    for i in range(MESSAGES):
        nested = f"  M{i - 1} previous = 9;\n  repeated M{i - 1} history = 10;" if i else ""
        lines.append(
            f"message M{i} {{\n"
            "  uint32 id = 1;\n"
            "  string name = 2;\n"
            "  int64 created_at = 3;\n"
            "  bool active = 4;\n"
            "  Kind kind = 5;\n"
            "  repeated string tags = 6;\n"
            "  map<string, int32> counters = 7;\n"
            "  double score = 8;\n"
            f"{nested}\n"
            "}"
        )
    return "\n".join(lines) + "\n"


def make_table() -> str:
    lines = [
        "proto: {paths: [proto], files: [bench.proto]}",
        "upstreams:",
        "  svc: {nodes: [127.0.0.1:7001, 127.0.0.1:7002]}",
        "commands:",
    ]
    methods = ("GET", "POST", "PUT", "DELETE")
    for i in range(COMMANDS):
        request, response = f"bench.M{i % MESSAGES}", f"bench.M{(i * 7) % MESSAGES}"
        path = f"/v1/resource{i // 4}/{{id}}" if i % 2 else f"/v1/static{i // 4}/items"
        lines += [
            f"  - name: cmd_{i}",
            f"    command: {0x1000 + i}",
            "    upstream: svc",
            f"    request: {request}",
            f"    response: {response}",
            f"    http: {{method: {methods[i % 4]}, path: '{path}'}}",
            "    fields: {name: header.X-Name}",
        ]
    lines += [
        "rate_limits: [{name: all, key: remote_addr, rate: 100/s, burst: 10}]",
        "waf: [{name: php, pattern: '(?i)\\b(eval|system)\\s*\\('}]",
    ]
    return "\n".join(lines) + "\n"


def _min_median_ms(seconds: list[float]) -> tuple[float, float]:
    return min(seconds) * 1000, statistics.median(seconds) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "proto").mkdir()
        (root / "proto" / "bench.proto").write_text(make_proto())
        (root / "commands.yaml").write_text(make_table())

        table = load_table(root / "commands.yaml")
        assert len(table.commands) == COMMANDS
        assert len(table.codecs) == COMMANDS
        loading = FigureTable(
            f"table load: {COMMANDS} commands, {MESSAGES} messages (version {table.version}), "
            f"{RUNS} runs",
            "step",
            32,
            [Column("min ms", ".1f", 9), Column("median ms", ".1f", 9)],
        )
        schema = timings(lambda: compile_schema([root / "proto"], ["bench.proto"]), RUNS)
        loading.row("compile_schema (protoc + pool)", *_min_median_ms(schema))
        loads = timings(lambda: load_table(root / "commands.yaml"), RUNS)
        loading.row("load_table (everything)", *_min_median_ms(loads))

        router = table.router
        assert router is not None
        paths = [
            ("GET", "/v1/static0/items"),  # a literal route (dict lookup)
            ("POST", "/v1/resource40/77"),  # a template
            ("PUT", "/v1/resource40/77"),  # 405: the template exists for POST and DELETE
            ("GET", "/nope"),  # 404
        ]
        matching = FigureTable(
            f"router.match, {MATCHES:,} calls", "request", 29, [Column("us", ".2f", 6)]
        )
        for method, path in paths:

            def match(method: str = method, path: str = path) -> None:
                for _ in range(MATCHES):
                    try:
                        router.match(method, path)
                    except (RouteNotFound, MethodNotAllowed):  # timed too: 404 and 405 answers
                        continue

            matching.row(f"{method:6} {path}", timings(match, 1)[0] / MATCHES * 1e6)
    print_target(
        "load_table, median", statistics.median(loads) * 1000, "<", TARGET_MS, ",.0f", " ms"
    )


if __name__ == "__main__":
    main()

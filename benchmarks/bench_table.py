"""Table load time (issue 3): 500 commands over a 200-message .proto, target < 1 s.

Generates the .proto and commands.yaml in a temporary directory, then times
`load_table` (YAML, validation, protoc, descriptor pool, 500 codecs, router) and,
separately, `compile_schema` alone and matching routes on the loaded router.
Run: `.venv/bin/python benchmarks/bench_table.py`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from tlvproxy.config.loader import load_table
from tlvproxy.errors import MethodNotAllowed, RouteNotFound
from tlvproxy.schema.protos import compile_schema

MESSAGES = 200
COMMANDS = 500
RUNS = 5


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


def timed(fn, runs: int = RUNS) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "proto").mkdir()
        (root / "proto" / "bench.proto").write_text(make_proto())
        (root / "commands.yaml").write_text(make_table())

        table = load_table(root / "commands.yaml")
        assert len(table.commands) == COMMANDS
        assert len(table.codecs) == COMMANDS
        print(f"table: {COMMANDS} commands, {MESSAGES} messages, version {table.version}")

        best, median = timed(lambda: compile_schema([root / "proto"], ["bench.proto"]))
        print(
            f"compile_schema (protoc + pool):  min {best * 1000:7.1f} ms  "
            f"median {median * 1000:7.1f} ms"
        )
        best, median = timed(lambda: load_table(root / "commands.yaml"))
        verdict = "ok" if median < 1.0 else "OVER the 1 s target"
        print(
            f"load_table (everything):         min {best * 1000:7.1f} ms  "
            f"median {median * 1000:7.1f} ms  ({verdict})"
        )

        router = table.router
        assert router is not None
        paths = [
            ("GET", "/v1/static0/items"),  # a literal route (dict lookup)
            ("POST", "/v1/resource40/77"),  # a template
            ("PUT", "/v1/resource40/77"),  # 405: the template exists for POST and DELETE
            ("GET", "/nope"),  # 404
        ]
        n = 100_000
        for method, path in paths:
            start = time.perf_counter()
            for _ in range(n):
                try:
                    router.match(method, path)
                except (RouteNotFound, MethodNotAllowed):  # timed too: 404 and 405 answers
                    continue
            per = (time.perf_counter() - start) / n
            print(f"router.match {method:6} {path:22} {per * 1e6:6.2f} us")


if __name__ == "__main__":
    main()

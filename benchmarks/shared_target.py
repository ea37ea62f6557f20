"""Launch tlvproxy as a target of the shared bench harness (../shared/bench).

Usage: python benchmarks/shared_target.py --port P --upstream HOST:PORT
           [--workers N] [--route json|protobuf] [--http-parser P] [--log-level L]

Writes a table (and, for the protobuf route, its .proto file) to a temporary
directory, then execs `python -m tlvproxy serve` on it, so the harness's
SIGTERM reaches the gateway itself. `POST /v1/echo` is command 0x1001 on the
harness's echo upstream:
- `json`: the `json` codec, the body passed through (validated) both ways;
- `protobuf`: the body parsed into `bench.Echo` (the fields of the harness's
  body.json, plus those of its second smoke-check body), serialised, echoed,
  decoded and written back as proto3 JSON (int64 values come back as strings).

Not named `bench_*.py`: `benchmarks/run.py` does not run it as a benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROTO = """\
syntax = "proto3";
package bench;

message Flags {
  bool dry_run = 1;
  int32 priority = 2;
}

message Echo {
  int64 id = 1;
  string user = 2;
  string op = 3;
  int64 ts = 4;
  repeated string tags = 5;
  double amount = 6;
  Flags flags = 7;
  string note = 8;
  string check = 9;
  int64 n = 10;
  string s = 11;
}
"""

_ROUTES = {
    "json": "    codec: json\n",
    "protobuf": "    request: bench.Echo\n    response: bench.Echo\n",
}


def table_text(port: int, upstream: str, route: str) -> str:
    """The YAML table of one bench target."""
    proto = "proto:\n  paths: [.]\n  files: [bench.proto]\n" if route == "protobuf" else ""
    return (
        f"listen:\n  http: 127.0.0.1:{port}\n  admin: null\n"
        f"{proto}"
        "upstreams:\n"
        "  echo:\n"
        f"    nodes: [{upstream}]\n"
        "    connections: 2\n"
        "    timeout: 3s\n"
        "commands:\n"
        "  - name: echo\n"
        "    command: 0x1001\n"
        "    upstream: echo\n"
        f"{_ROUTES[route]}"
        "    http: {method: POST, path: /v1/echo}\n"
        "    idempotent: true\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the TLV echo upstream")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--route", choices=sorted(_ROUTES), default="json")
    parser.add_argument("--http-parser", choices=("auto", "h11", "httptools"), default="auto")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tlvproxy-bench-"))
    (directory / "bench.proto").write_text(PROTO)
    table = directory / "commands.yaml"
    table.write_text(table_text(args.port, args.upstream, args.route))
    command = [
        sys.executable,
        "-m",
        "tlvproxy",
        "serve",
        "-c",
        str(table),
        "--workers",
        str(args.workers),
        "--http-parser",
        args.http_parser,
        "--log-level",
        args.log_level,
    ]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()

"""The command line (SPEC 2): serve, check, call, mock-upstream, openapi.

Owns: argument parsing and exit codes; each sub-command hands off to the module
that does the work. Must not: hold gateway logic of its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TABLE = Path("commands.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlvproxy",
        description="REST and WebSocket gateway for TLV-framed binary TCP services.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def table_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_TABLE,
            metavar="FILE",
            help="the table (default: ./commands.yaml)",
        )

    serve = sub.add_parser("serve", help="run the gateway")
    table_option(serve)
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes")
    serve.add_argument(
        "--http-parser", choices=("auto", "h11", "httptools"), help="HTTP/1.1 parser"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level (default: info)",
    )

    check = sub.add_parser("check", help="validate the table and print its routes")
    table_option(check)

    call = sub.add_parser("call", help="send one request frame to an upstream node")
    call.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the node")
    call.add_argument("cmd", metavar="COMMAND", help="a command name or number (0x1001, 4097)")
    call.add_argument("json", metavar="JSON", nargs="?", default=None, help="the request body")
    table_option(call)

    mock = sub.add_parser("mock-upstream", help="run the bundled demo IM service")
    mock.add_argument("--listen", default="127.0.0.1:7001", metavar="HOST:PORT")
    table_option(mock)

    openapi = sub.add_parser("openapi", help="print an OpenAPI 3.1 document of the REST routes")
    table_option(openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the process exit code."""
    args = _parser().parse_args(argv)
    handlers = {
        "check": _check,
    }
    return handlers[args.command](args)


def _check(args: argparse.Namespace) -> int:
    from tlvproxy.config.loader import TableError, load_table, route_lines

    try:
        table = load_table(args.config)
    except TableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s) in {args.config}", file=sys.stderr)
        return 1
    for line in route_lines(table):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

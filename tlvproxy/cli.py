"""The command line: serve, check, publish, call, mock-upstream, demo-keys, openapi.

Owns: argument parsing and exit codes; each sub-command hands off to the module
that does the work. Must not: hold gateway logic of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tlvproxy import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tlvproxy.config.compiled import CompiledTable

DEFAULT_TABLE = Path("commands.yaml")
DEFAULT_DEMO_KEYS = Path("build/demo-keys")
# Where `serve --etcd` and `publish` keep the table (docs/operations.md "Running a fleet").
DEFAULT_ETCD_PREFIX = "/tlvproxy"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlvproxy",
        description="REST and WebSocket gateway for TLV-framed binary TCP services.",
        epilog="`tlvproxy COMMAND --help` describes each command, with examples.",
    )
    parser.add_argument("--version", action="version", version=f"tlvproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def table_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_TABLE,
            metavar="FILE",
            help="the table (default: ./commands.yaml)",
        )

    def etcd_options(p: argparse.ArgumentParser, summary: str, required: bool) -> None:
        p.add_argument("--etcd", metavar="URL", required=required, type=_endpoint, help=summary)
        p.add_argument(
            "--etcd-prefix",
            default=DEFAULT_ETCD_PREFIX,
            type=_prefix,
            metavar="P",
            help=f"the table's keys are P/table and P/files/PATH (default: {DEFAULT_ETCD_PREFIX})",
        )

    serve = command("serve", "run the gateway", "tlvproxy serve -c commands.yaml --workers 2")
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
    etcd_options(serve, "read the table from etcd at URL instead of FILE, and follow it", False)
    # Set by the supervisor for the worker processes it starts (docs/operations.md "Workers").
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--etcd-run-dir", type=Path, help=argparse.SUPPRESS)

    publish = command(
        "publish",
        "check the table, then store it and every file it names in etcd in one transaction",
        "tlvproxy publish -c commands.yaml --etcd http://127.0.0.1:2379",
    )
    table_option(publish)
    etcd_options(publish, "the etcd to store the table in", True)

    check = command(
        "check",
        "validate the table, print its warnings and its routes",
        "tlvproxy check -c commands.yaml",
    )
    table_option(check)

    call = command(
        "call",
        "send one request frame to an upstream node and print its reply as JSON",
        """tlvproxy call 127.0.0.1:7001 send_message '{"to_uid": 2, "text": "hi"}' --uid 1""",
    )
    call.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the node")
    call.add_argument("cmd", metavar="COMMAND", help="a command name or number (0x1001, 4097)")
    call.add_argument("json", metavar="JSON", nargs="?", default=None, help="the request body")
    call.add_argument(
        "--uid", type=int, default=0, metavar="N", help="the header's uid (default: 0)"
    )
    table_option(call)

    mock = command(
        "mock-upstream",
        "run the bundled demo IM service (a TLV upstream)",
        "tlvproxy mock-upstream --listen 127.0.0.1:7001",
    )
    mock.add_argument(
        "--listen",
        default="127.0.0.1:7001",
        metavar="HOST:PORT",
        help="where it listens (default: 127.0.0.1:7001)",
    )
    mock.add_argument(
        "--token-key",
        type=Path,
        metavar="PEM",
        help="the private key that signs login's demo tokens (made by `tlvproxy demo-keys`)",
    )
    mock.add_argument(
        "--upstream",
        metavar="NAME",
        help="the upstream of the table it plays: command words are read among its commands "
        "(default: the websocket's upstream, else the first)",
    )
    mock.add_argument(
        "--variant",
        choices=("current", "next"),
        default="current",
        help="next: answer as the next version of the demo service (for trying a migration)",
    )
    mock.add_argument(
        "--register",
        metavar="URL",
        type=_endpoint,
        help="register the service's address in the etcd at URL while it runs (needs --prefix)",
    )
    mock.add_argument(
        "--prefix",
        type=_prefix,
        metavar="P",
        help="with --register: the key is P/HOST:PORT, on a lease of 10 s kept alive",
    )
    table_option(mock)

    keys = command(
        "demo-keys",
        "make the demo's token signing key and its public key set",
        "tlvproxy demo-keys build/demo-keys",
    )
    keys.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=DEFAULT_DEMO_KEYS,
        metavar="DIR",
        help=f"where to write {{demo-signing-key.pem, jwks.json}} (default: {DEFAULT_DEMO_KEYS})",
    )

    openapi = command(
        "openapi",
        "print an OpenAPI 3.1 document of the table's REST routes",
        "tlvproxy openapi -c commands.yaml > openapi.json",
    )
    table_option(openapi)
    return parser


def _endpoint(value: str) -> str:
    from tlvproxy.config.upstreams import etcd_endpoint

    try:
        return etcd_endpoint(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _prefix(value: str) -> str:
    from tlvproxy.config.upstreams import etcd_prefix

    try:
        return etcd_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "mock-upstream" and (args.register is None) != (args.prefix is None):
        parser.error("mock-upstream: --register and --prefix go together")
    handlers = {
        "serve": _serve,
        "publish": _publish,
        "check": _check,
        "openapi": _openapi,
        "call": _call,
        "mock-upstream": _mock_upstream,
        "demo-keys": _demo_keys,
    }
    return handlers[args.command](args)


def _serve(args: argparse.Namespace) -> int:
    from tlvproxy.serving import run_serve

    return run_serve(
        args.config,
        workers=args.workers,
        http_parser=args.http_parser,
        log_level=args.log_level,
        worker_index=args.worker_index,
        etcd=args.etcd,
        etcd_prefix=args.etcd_prefix,
        etcd_run_dir=args.etcd_run_dir,
    )


def _publish(args: argparse.Namespace) -> int:
    from tlvproxy.etcd.publish import run_publish

    table = _checked(args.config)
    if table is None:
        return 1
    return run_publish(args.config, table, args.etcd, args.etcd_prefix)


def _load(path: Path) -> CompiledTable | None:
    """The table at `path`, or None after printing every problem to stderr."""
    from tlvproxy.config.loader import TableError, load_table

    try:
        return load_table(path)
    except TableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s) in {path}", file=sys.stderr)
        return None


def _checked(path: Path) -> CompiledTable | None:
    """`_load`, and the table's warnings printed to stderr, as `check` does."""
    table = _load(path)
    if table is not None:
        for warning in table.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return table


def _check(args: argparse.Namespace) -> int:
    from tlvproxy.config.listing import route_lines

    table = _checked(args.config)
    if table is None:
        return 1
    for line in route_lines(table):
        print(line)
    return 0


def _openapi(args: argparse.Namespace) -> int:
    import json

    from tlvproxy.openapi import build_document

    table = _load(args.config)
    if table is None:
        return 1
    print(json.dumps(build_document(table), indent=2, ensure_ascii=False))
    return 0


def _call(args: argparse.Namespace) -> int:
    from tlvproxy.upstream.call import run_call

    return run_call(args.address, args.cmd, args.json, args.config, uid=args.uid)


def _mock_upstream(args: argparse.Namespace) -> int:
    from tlvproxy.mock_upstream import run_mock_upstream

    register = None if args.register is None else (args.register, args.prefix)
    return run_mock_upstream(
        args.listen,
        args.config,
        args.token_key,
        register,
        upstream=args.upstream,
        variant=args.variant,
    )


def _demo_keys(args: argparse.Namespace) -> int:
    from tlvproxy.demo_keys import make_demo_keys

    try:
        key, key_set = make_demo_keys(args.directory)
    except OSError as exc:
        print(f"tlvproxy demo-keys: {args.directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{key}  the private key that signs demo tokens (mode 0600)")
    print(f"{key_set}  its public key set, for the table's jwt authenticator")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HTTP/1.1 layer throughput: a fixed answer served with h11 and with httptools.

For each parser, a trio server runs in its own process (this file run with
`--serve PARSER`) with a handler that returns a fixed 2-header JSON answer;
wrk drives GET requests at it (-t1 -c64, 5 s, keep-alive, through
benchmarks/harness) and this prints requests/s, p50/p99 latency and the
server's CPU per request. Needs `wrk` (apt-get install wrk).

    python benchmarks/bench_http.py [--duration 5] [--connections 64]
"""

from __future__ import annotations

import argparse
import sys

from harness.figures import FigureTable
from harness.load import RUN_COLUMNS, WARMUP_SECONDS, drive, require_wrk, run_cells, wrk
from harness.processes import child

WARMUP_CONNECTIONS = 8


def serve(parser: str) -> None:
    """Run the server (in the child process); print the port once listening."""
    import trio

    from tlvproxy.errors import GatewayError, status_of
    from tlvproxy.server.http_conn import HttpSettings, Request, Response, serve_http_connection

    settings = HttpSettings(
        max_header_bytes=16384,
        max_request_body=1 << 20,
        header_timeout=10.0,
        keepalive_timeout=75.0,
        parser=parser,  # type: ignore[arg-type]
    )
    answer = Response(200, [("Content-Type", "application/json")], b'{"ok":true}')

    async def handler(request: Request) -> Response:
        return answer

    def error_handler(error: GatewayError, request: Request | None) -> Response:
        return Response(status_of(error), [], error.message.encode())

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http_connection(stream, "127.0.0.1", settings, handler, error_handler)

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(on_connection, listeners)

    trio.run(main)


def measure(parser: str, duration: int, connections: int) -> dict[str, float]:
    """One parser's server started, warmed up and driven; its figures (`drive`)."""
    with child([sys.executable, __file__, "--serve", parser]) as (server, port):
        url = f"http://127.0.0.1:{port}/bench"
        wrk(url, WARMUP_SECONDS, WARMUP_CONNECTIONS, BENCH_METHOD="GET")
        result = drive(url, duration, server.pid, None, connections, BENCH_METHOD="GET")
    if result["errors"]:
        raise SystemExit(f"wrk saw {result['errors']:.0f} errors against {parser}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=["h11", "httptools"])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    require_wrk()
    figures = FigureTable(
        f"HTTP layer, fixed answer, wrk -t1 -c{args.connections} -d{args.duration}s",
        "parser",
        10,
        RUN_COLUMNS,
    )
    for name in ("h11", "httptools"):
        figures.row(name, *run_cells(measure(name, args.duration, args.connections)))


if __name__ == "__main__":
    main()

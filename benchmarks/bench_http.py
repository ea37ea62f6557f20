"""HTTP/1.1 layer throughput: a fixed answer served with h11 and with httptools.

For each parser, a trio server runs in its own process with a handler that
returns a fixed 2-header JSON answer; wrk drives it (-t1 -c64, 5 s, keep-alive)
and this prints requests/s and p50/p99 latency. Needs `wrk` (apt-get install wrk).

    python benchmarks/bench_http.py [--duration 5] [--connections 64]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def measure(parser: str, duration: int, connections: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) for one parser."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", parser],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}/bench"
        subprocess.run(["wrk", "-t1", "-c8", "-d1s", url], check=True, capture_output=True)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        server.terminate()
        server.wait()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # Anchored at the line start: the thread stats line ends in a percentage too
    # ("+/- Stdev 87.50%"), which an unanchored "50%" would take.
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors against {parser}:\n{out}")
    return rps, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=["h11", "httptools"])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    print(f"HTTP layer, fixed answer, wrk -t1 -c{args.connections} -d{args.duration}s")
    print(f"{'parser':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("h11", "httptools"):
        rps, p50, p99 = measure(name, args.duration, args.connections)
        print(f"{name:<10} {rps:>10.0f} {p50:>8.2f} {p99:>8.2f}")


if __name__ == "__main__":
    main()

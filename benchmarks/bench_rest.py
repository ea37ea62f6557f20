"""The REST request path in one process: what one request costs, piece by piece.

Prints microseconds per request for
- the whole REST handler (routing, policy, codec, pool round trip, metrics,
  access record) over a real pooled connection to an in-process TLV echo
  server, with 1 and with 64 requests in flight, json and protobuf routes;
- the whole HTTP path (the connection driver with its DeadlineTimer, each
  parser, then the handler) with 64 keep-alive client connections over
  loopback, the clients and the upstream in the same process (their cost is
  in the figure), 64 requests in flight;
- its fixed per-request parts alone: the access record (built, formatted and
  written to /dev/null), the request id, the metric updates.

The side-by-side comparison with other gateways is bench_shared.py.
    python benchmarks/bench_rest.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
import timeit
from pathlib import Path

import attrs
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shared_target import PROTO, table_text  # noqa: E402  # the launcher's table, exactly

from tlvproxy.app import Runtime  # noqa: E402
from tlvproxy.config.loader import load_table  # noqa: E402
from tlvproxy.framing import NEED_DATA, Frame, FrameDecoder, encode_frame  # noqa: E402
from tlvproxy.logs import ACCESS_LOGGER, access_record, json_formatter  # noqa: E402
from tlvproxy.metrics import Metrics  # noqa: E402
from tlvproxy.policy.ratelimit import RateLimiter  # noqa: E402
from tlvproxy.policy.waf import Waf  # noqa: E402
from tlvproxy.server.access_log import AccessLog  # noqa: E402
from tlvproxy.server.http_conn import (  # noqa: E402
    DeadlineTimer,
    DrainSignal,
    HttpSettings,
    Request,
    serve_http_connection,
)
from tlvproxy.server.rest import RestHandler, error_response_for, request_id_of  # noqa: E402
from tlvproxy.upstream.pool import open_pool  # noqa: E402

BODY = (HERE.parent.parent / "shared" / "bench" / "wrk" / "body.json").read_bytes().strip()


async def _echo(stream: trio.SocketStream, layout: object) -> None:
    decoder = FrameDecoder(layout)  # type: ignore[arg-type]
    while data := await stream.receive_some(65536):
        decoder.receive_data(data)
        out = []
        while (frame := decoder.next_event()) is not NEED_DATA:
            assert isinstance(frame, Frame)
            out.append(encode_frame(layout, attrs.evolve(frame, flags=1)))  # type: ignore[arg-type]
        if out:
            await stream.send_all(b"".join(out))


async def handler_cost(route: str, requests: int, concurrency: int) -> float:
    """Microseconds of this process's CPU per request through RestHandler."""
    directory = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    (directory / "bench.proto").write_text(PROTO)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        (directory / "commands.yaml").write_text(table_text(0, f"127.0.0.1:{port}", route))
        table = load_table(directory / "commands.yaml")
        nursery.start_soon(trio.serve_listeners, lambda s: _echo(s, table.framing), listeners)
        metrics = Metrics()
        spec = table.upstreams["echo"]
        async with open_pool(spec, table.framing, metrics) as pool:
            runtime = Runtime(
                table=table, pools={"echo": pool}, limiter=RateLimiter(()), waf=Waf(())
            )
            handler = RestHandler(lambda: runtime, metrics, AccessLog())
            request = Request(
                method="POST",
                target="/v1/echo",
                path="/v1/echo",
                query_string="",
                headers=(("host", "x"), ("content-type", "application/json")),
                body=BODY,
                http_version="1.1",
                remote_addr="127.0.0.1",
                received_at=trio.current_time(),
            )
            assert (await handler(request)).status == 200

            async def client(count: int) -> None:
                for _ in range(count):
                    await handler(request)

            started = time.process_time()
            async with trio.open_nursery() as clients:
                for _ in range(concurrency):
                    clients.start_soon(client, requests // concurrency)
            spent = time.process_time() - started
        nursery.cancel_scope.cancel()
    return spent / (requests // concurrency * concurrency) * 1e6


async def _http_client(port: int, wire: bytes, count: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(wire)
    first = b""
    while b"\r\n\r\n" not in first:
        first += await stream.receive_some(65536)
    head, _, rest = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    # Every answer has the same size (same body, request ids of the same length).
    size = len(head) + 4 + length
    for _ in range(count - 1):
        await stream.send_all(wire)
        got = 0
        while got < size:
            got += len(await stream.receive_some(65536))
    await stream.aclose()


async def http_cost(route: str, parser: str, requests: int, concurrency: int) -> float:
    """Microseconds of this process's CPU per request through the HTTP driver and
    RestHandler, clients and upstream included (they cost the same for any gateway code)."""
    directory = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    (directory / "bench.proto").write_text(PROTO)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        (directory / "commands.yaml").write_text(table_text(0, f"127.0.0.1:{port}", route))
        table = load_table(directory / "commands.yaml")
        nursery.start_soon(trio.serve_listeners, lambda s: _echo(s, table.framing), listeners)
        metrics = Metrics()
        async with open_pool(table.upstreams["echo"], table.framing, metrics) as pool:
            runtime = Runtime(
                table=table, pools={"echo": pool}, limiter=RateLimiter(()), waf=Waf(())
            )
            handler = RestHandler(lambda: runtime, metrics, AccessLog())
            errors = error_response_for(lambda: runtime, metrics)
            settings = HttpSettings.from_limits(table.limits, parser)  # type: ignore[arg-type]
            signal = DrainSignal()
            timer = DeadlineTimer()  # as the gateway runs it (app.py)
            nursery.start_soon(timer.run)

            async def serve(stream: trio.SocketStream) -> None:
                await serve_http_connection(
                    stream,
                    "127.0.0.1",
                    settings,
                    handler,
                    errors,
                    drain_signal=signal,
                    timer=timer,
                )

            http = await trio.open_tcp_listeners(0, host="127.0.0.1")
            http_port = http[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, serve, http)
            wire = (
                b"POST /v1/echo HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
            )
            await _http_client(http_port, wire, 100)
            each = requests // concurrency
            started = time.process_time()
            async with trio.open_nursery() as clients:
                for _ in range(concurrency):
                    clients.start_soon(_http_client, http_port, wire, each)
            spent = time.process_time() - started
        nursery.cancel_scope.cancel()
    return spent / (each * concurrency) * 1e6


def part_costs() -> dict[str, float]:
    """Microseconds of each fixed per-request part."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(json_formatter())
    root = logging.getLogger("tlvproxy")
    root.handlers[:] = [handler]
    root.setLevel("INFO")
    root.propagate = False
    access = logging.getLogger(ACCESS_LOGGER)
    metrics = Metrics()
    count = metrics.http_requests.labels("echo", "POST", "200").inc
    observe = metrics.http_request_duration.labels("echo").observe

    def record() -> None:
        handler.stream.seek(0)
        access.info(
            "request",
            extra=access_record(
                request_id="635fda7f01204baba898430d86445fbe",
                client_ip="127.0.0.1",
                method="POST",
                path="/v1/echo",
                route="echo",
                command=0x1001,
                node="127.0.0.1:7001",
                status=200,
                upstream_status=0,
                duration_ms=1.234,
            ),
        )

    def metric_updates() -> None:
        count()
        observe(0.0012)

    number = 20000
    return {
        "access record (built, formatted, written)": timeit.timeit(record, number=number),
        "request id": timeit.timeit(lambda: request_id_of(None), number=number),
        "metrics (cached children)": timeit.timeit(metric_updates, number=number),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'REST handler, in-process echo upstream':48} {'us/request (CPU)':>16}")
    for route in ("json", "protobuf"):
        for concurrency in (1, 64):
            cost = trio.run(handler_cost, route, args.requests, concurrency)
            print(f"  {route:9} {concurrency:3} in flight{'':25} {cost:16.1f}")
    print(f"{'HTTP path, in-process clients and upstream':48} {'us/request (CPU)':>16}")
    for route in ("json", "protobuf"):
        for parser in ("httptools", "h11"):
            cost = trio.run(http_cost, route, parser, args.requests, 64)
            print(f"  {route:9} {parser:9} 64 connections{'':11} {cost:16.1f}")
    print(f"{'fixed parts':48} {'us/request':>16}")
    for name, seconds in part_costs().items():
        print(f"  {name:46} {seconds / 20000 * 1e6:16.2f}")


if __name__ == "__main__":
    main()

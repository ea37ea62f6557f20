"""The REST request path in one process: what one request costs, piece by piece.

Prints microseconds per request for
- the whole REST handler (routing, policy, codec, pool round trip, metrics,
  access record) over a real pooled connection to an in-process TLV echo
  server, with 1 and with 64 requests in flight, json and protobuf routes;
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
from tlvproxy.server.http_conn import Request  # noqa: E402
from tlvproxy.server.rest import RestHandler, request_id_of  # noqa: E402
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
            handler = RestHandler(lambda: runtime, metrics)
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
    print(f"{'fixed parts':48} {'us/request':>16}")
    for name, seconds in part_costs().items():
        print(f"  {name:46} {seconds / 20000 * 1e6:16.2f}")


if __name__ == "__main__":
    main()

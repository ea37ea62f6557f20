"""The REST request path in one process: what one request costs, piece by piece.

Prints microseconds per request for
- the whole REST handler (`RestHandler.submit`: routing, policy, codec, pool
  round trip, rendering, tally, access record) over a real pooled connection
  to an in-process TLV echo server, closed loop with 1 and with 64 requests in
  flight, json and protobuf routes. An `Answer` stand-in counts each answer
  and submits the request again (no HTTP connection);
- the whole HTTP path (`serve_http_connection` with the gateway's shared
  DeadlineTimer, each parser, then the handler) with 64 keep-alive client
  connections over loopback, the clients and the upstream in the same process
  (their cost is in the figure), 64 requests in flight;
- each part of the gateway's own per-request work alone (timeit, best of 5, on
  the bench table of shared_target.py, the harness's body.json and a request
  with Host, Content-Type and Content-Length): parsing, the request object,
  routing, policy checks, the JSON check, the request id, the response
  headers, the metrics and the access record.

Access records go to /dev/null through the gateway's own log handler
(`LineHandler` with `json_formatter()`, as `setup_logging` installs it), and
`AccessLog.run` publishes the `RequestTally` once per scheduler pass, as in
app.py. Figures are printed through benchmarks/harness. The side-by-side
comparison with other gateways is bench_shared.py.
    python benchmarks/bench_rest.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import attrs
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness.figures import Column, FigureTable  # noqa: E402
from harness.load import BODY_FILE  # noqa: E402
from shared_target import PROTO, table_text  # noqa: E402  # the launcher's table, exactly

from tlvproxy.app import Runtime  # noqa: E402
from tlvproxy.auth.authenticators import Authenticators  # noqa: E402
from tlvproxy.config.loader import load_table  # noqa: E402
from tlvproxy.framing import NEED_DATA, Frame, FrameDecoder, encode_frame  # noqa: E402
from tlvproxy.logs import (  # noqa: E402
    ACCESS_LOGGER,
    LineHandler,
    access_record,
    json_formatter,
    setup_logging,
)
from tlvproxy.metrics import Metrics, RequestTally  # noqa: E402
from tlvproxy.policy.ratelimit import ProcessBuckets  # noqa: E402
from tlvproxy.policy.waf import Waf  # noqa: E402
from tlvproxy.server import parsers  # noqa: E402
from tlvproxy.server.access_log import AccessLog  # noqa: E402
from tlvproxy.server.http_conn import (  # noqa: E402
    DeadlineTimer,
    DrainSignal,
    HttpSettings,
    Request,
    _Connection,
    serve_http_connection,
)
from tlvproxy.server.httptools_parser import HttptoolsParser  # noqa: E402
from tlvproxy.server.rest import RestHandler, error_response_for, request_id_of  # noqa: E402
from tlvproxy.server.view import RequestContext  # noqa: E402
from tlvproxy.stores.limits import RateLimits  # noqa: E402
from tlvproxy.upstream.pool import open_pool  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

    from tlvproxy.config.model import Table
    from tlvproxy.server.http_conn import Response
    from tlvproxy.upstream.pool import Pool

BODY = BODY_FILE.read_bytes().strip()
WIRE = (
    b"POST /v1/echo HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
# One WAF rule and one rate limit on `echo`, for the policy rows: the demo
# table's PHP rule (it does not match the body) and a limit too high to refuse.
_POLICY = """\
rate_limits:
  - name: per_client
    commands: [echo]
    key: remote_addr
    rate: 1000000000/s
    burst: 1000000000
waf:
  - name: php_injection
    in: [path, query, body, headers]
    pattern: '(?i)\\b(eval|assert|base64_decode|system|passthru|shell_exec)\\s*\\('
    action: deny
"""
# Requests answered per scheduler pass, for the amortised per-batch work
# (tally publish, access-record formatting): the closed loop's 64 in flight.
BATCH = 64


def _log_to_devnull() -> None:
    """The gateway's logging (`setup_logging`), its lines written to /dev/null."""
    setup_logging("info")
    handler = LineHandler(os.open(os.devnull, os.O_WRONLY))
    handler.setFormatter(json_formatter())
    logging.getLogger("tlvproxy").handlers[:] = [handler]


def _load(directory: Path, upstream: str, route: str, extra: str = "") -> Table:
    (directory / "bench.proto").write_text(PROTO)
    (directory / "commands.yaml").write_text(table_text(0, upstream, route) + extra)
    return load_table(directory / "commands.yaml")


def _runtime(table: Table, pool: Pool, metrics: Metrics) -> Runtime:
    """The bench table's runtime: no policy, no authenticator (a key set URL is an error)."""

    def no_key_urls(spec: Any) -> Any:
        raise SystemExit(f"the bench table fetches no key set ({spec.keys})")

    auth = Authenticators({}, metrics, no_key_urls)
    return Runtime(
        table=table,
        pools={"echo": pool},
        limiter=RateLimits((), metrics),
        waf=Waf(()),
        auth=auth,
        traffic={},
    )


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


class _Loop:
    """An `Answer` stand-in for one request slot of a closed loop: each answer
    is counted and the request submitted again, `count` times in all."""

    __slots__ = ("done", "failed", "handler", "left", "request")

    def __init__(
        self, handler: RestHandler, request: Request, count: int, done: Callable[[], None]
    ) -> None:
        self.handler = handler
        self.request = request
        self.left = count
        self.done = done
        self.failed: Response | None = None

    def start(self) -> None:
        self.handler.submit(self.request, self)  # type: ignore[arg-type]  # duck-typed Answer

    def set(self, response: Response) -> None:
        self.left -= 1
        if response.status != 200:
            self.failed = response
            self.left = 0  # an error answers synchronously: stop, do not recurse
        if self.left > 0:
            self.handler.submit(self.request, self)  # type: ignore[arg-type]
        else:
            self.done()


async def _closed_loop(handler: RestHandler, request: Request, slots: int, each: int) -> None:
    finished = trio.Event()
    pending = slots

    def done() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            finished.set()

    loops = [_Loop(handler, request, each, done) for _ in range(slots)]
    for loop in loops:
        loop.start()
    await finished.wait()
    for loop in loops:
        if loop.failed is not None:
            raise RuntimeError(f"the handler answered {loop.failed}")


async def handler_cost(route: str, requests: int, concurrency: int) -> float:
    """Microseconds of this process's CPU per request through RestHandler.submit."""
    directory = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        table = _load(directory, f"127.0.0.1:{port}", route)
        nursery.start_soon(trio.serve_listeners, lambda s: _echo(s, table.framing), listeners)
        metrics = Metrics()
        tally = RequestTally(metrics)
        access_log = AccessLog(tally=tally)
        timer = DeadlineTimer()  # as the gateway runs them (app.py)
        nursery.start_soon(timer.run)
        nursery.start_soon(access_log.run)
        async with open_pool(table.upstreams["echo"], table.framing, metrics, timer) as pool:
            runtime = _runtime(table, pool, metrics)
            handler = RestHandler(lambda: runtime, metrics, access_log, tally)
            nursery.start_soon(handler.run)
            request = Request(
                method="POST",
                target="/v1/echo",
                path="/v1/echo",
                query_string="",
                headers=(
                    ("host", "bench"),
                    ("content-type", "application/json"),
                    ("content-length", str(len(BODY))),
                ),
                body=BODY,
                http_version="1.1",
                remote_addr="127.0.0.1",
                received_at=trio.current_time(),
            )
            await _closed_loop(handler, request, 1, 100)  # connects, warms up
            each = requests // concurrency
            started = time.process_time()
            await _closed_loop(handler, request, concurrency, each)
            spent = time.process_time() - started
        nursery.cancel_scope.cancel()
    return spent / (each * concurrency) * 1e6


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
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        table = _load(directory, f"127.0.0.1:{port}", route)
        nursery.start_soon(trio.serve_listeners, lambda s: _echo(s, table.framing), listeners)
        metrics = Metrics()
        tally = RequestTally(metrics)
        access_log = AccessLog(tally=tally)
        timer = DeadlineTimer()  # shared by the connections and the pool, as in app.py
        nursery.start_soon(timer.run)
        nursery.start_soon(access_log.run)
        async with open_pool(table.upstreams["echo"], table.framing, metrics, timer) as pool:
            runtime = _runtime(table, pool, metrics)
            handler = RestHandler(lambda: runtime, metrics, access_log, tally)
            nursery.start_soon(handler.run)
            errors = error_response_for(lambda: runtime, metrics)
            settings = HttpSettings.from_limits(table.limits, parser)  # type: ignore[arg-type]
            signal = DrainSignal()

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
            await _http_client(http_port, WIRE, 100)
            each = requests // concurrency
            started = time.process_time()
            async with trio.open_nursery() as clients:
                for _ in range(concurrency):
                    clients.start_soon(_http_client, http_port, WIRE, each)
            spent = time.process_time() - started
        nursery.cancel_scope.cancel()
    return spent / (each * concurrency) * 1e6


# ------------------------------------------------------------ parts


def _us(function: Callable[[], Any], per_call: int = 1, number: int = 20000) -> float:
    """Microseconds per item of `function` (which does `per_call` items), best of 5."""
    calls = max(1, number // per_call)
    best = min(timeit.repeat(function, number=calls, repeat=5))
    return best / (calls * per_call) * 1e6


def part_costs() -> list[tuple[str, float]]:
    """Microseconds per request of each part of the gateway's own work, measured
    alone, in the order a request meets them."""
    directory = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    (directory / "json").mkdir()
    (directory / "protobuf").mkdir()
    (directory / "policy").mkdir()
    table = _load(directory / "json", "127.0.0.1:9", "json")
    proto_table = _load(directory / "protobuf", "127.0.0.1:9", "protobuf")
    policy_table = _load(directory / "policy", "127.0.0.1:9", "json", _POLICY)
    limits = table.limits
    router = table.router
    assert router is not None

    # Parsing: one keep-alive connection's parser, fed each request whole.
    parser = HttptoolsParser(
        max_header_bytes=limits.max_header_bytes, max_body=limits.max_request_body
    )
    need_data = parsers.NEED_DATA

    def parse() -> None:
        parser.receive_data(WIRE)
        while parser.next_event() is not need_data:
            pass

    parser.receive_data(WIRE)
    head = parser.next_event()
    end = parser.next_event()
    assert isinstance(head, parsers.RequestHead)
    assert isinstance(end, parsers.RequestEnd)
    assert end.body == BODY
    assert parser.next_event() is need_data

    # The request object: http_conn's own `_request`, on a stand-in connection.
    connection = SimpleNamespace(_remote_addr="127.0.0.1", _received_at=time.monotonic())
    build_request = _Connection._request

    def new_request() -> Request:
        return build_request(connection, head, end.body)  # type: ignore[arg-type]

    request = new_request()
    assert request.path == "/v1/echo"

    # Policy: none, then one WAF rule and one rate limit.
    # The rate limit in its `store: local`, as a one-process gateway keeps it.
    local = ProcessBuckets()
    no_waf, no_limits = Waf(table.waf), RateLimits(table.rate_limits, Metrics(), local=local)
    waf, limiter = (
        Waf(policy_table.waf),
        RateLimits(policy_table.rate_limits, Metrics(), local=local),
    )
    assert not no_waf.inspects_requests
    assert waf.inspects_requests
    assert limiter.applies("echo")
    context = RequestContext(
        remote_addr=request.remote_addr,
        headers=request.headers,
        query_string=request.query_string,
        path_params={},
    )

    def no_policy() -> None:
        if no_waf.inspects_requests:
            raise AssertionError
        if no_limits.applies("echo"):
            raise AssertionError

    def one_rule() -> None:
        if waf.inspects_requests:
            found = waf.inspect_request(
                path=request.path,
                query=request.query_string,
                body=request.body,
                headers=request.headers,
            )
            assert not found
        if limiter.applies("echo"):
            assert limiter.check("echo", context) is None

    # The codecs: the json route's check, the protobuf route for comparison.
    codec = table.codecs["echo"]
    proto = proto_table.codecs["echo"]
    frame_body = proto.encode_request(BODY, [{}, {}])

    def proto_encode() -> bytes:
        # The protobuf route's overlays: the query and the path parameters.
        return proto.encode_request(BODY, [{}, {}])

    # The response: what `_write_ready` serialises for the rendered answer.
    request_id = request_id_of(request)
    answer_headers = [("Content-Type", "application/json"), ("X-Request-Id", request_id)]

    def send(checked: bool) -> Callable[[], bytes]:
        return lambda: parser.send_response(
            200, answer_headers, BODY, close=False, method="POST", checked=checked
        )

    # Metrics: the tally (published once per batch) against the client's own
    # cached children (inc + observe per request).
    metrics = Metrics()
    tally = RequestTally(metrics)
    count = tally.count

    def tallied(batch: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(batch):
                count("echo", "POST", 200, 0.0012)
            tally.publish()

        return run

    inc = metrics.http_requests.labels("echo", "POST", "200").inc
    observe = metrics.http_request_duration.labels("echo").observe

    def prometheus() -> None:
        inc()
        observe(0.0012)

    # The access record: built and queued per request, formatted and written
    # (to /dev/null) once per batch.
    access_log = AccessLog(logging.getLogger(ACCESS_LOGGER))

    def record() -> dict[str, Any]:
        return access_record(
            request_id=request_id,
            client_ip="127.0.0.1",
            method="POST",
            path="/v1/echo",
            route="echo",
            command=0x1001,
            node="127.0.0.1:7001",
            status=200,
            upstream_status=0,
            duration_ms=1.234,
        )

    def records(batch: int, flush: bool) -> Callable[[], None]:
        def run() -> None:
            add = access_log.add
            for _ in range(batch):
                add(record())
            if flush:
                access_log.flush()
            else:
                access_log._pending.clear()

        return run

    return [
        ("parse (HttptoolsParser, events drained)", _us(parse)),
        ("request object (_request: split_target + Request)", _us(new_request)),
        ("routing (router.match)", _us(lambda: router.match("POST", "/v1/echo"))),
        ("policy, no rules (inspects_requests, applies)", _us(no_policy)),
        ("policy, 1 WAF rule + 1 rate limit", _us(one_rule)),
        ("JSON check: json encode_request", _us(lambda: codec.encode_request(BODY, ()))),
        ("JSON check: json response_json", _us(lambda: codec.response_json(BODY))),
        (
            "  protobuf encode_request (comparison)",
            _us(lambda: proto.encode_request(BODY, [{}, {}])),
        ),
        ("  protobuf response_json (comparison)", _us(lambda: proto.response_json(frame_body))),
        ("request id (request_id_of, new id)", _us(lambda: request_id_of(request))),
        ("response head + body, checked=True", _us(send(True))),
        ("response head + body, checked=False", _us(send(False))),
        (f"metrics: tally.count + publish/{BATCH}", _us(tallied(BATCH), BATCH)),
        ("metrics: tally.count + publish/1", _us(tallied(1))),
        ("metrics: Counter.inc + Histogram.observe", _us(prometheus)),
        (f"access record: built + add + format/{BATCH}", _us(records(BATCH, True), BATCH)),
        ("  of which access_record + add", _us(records(BATCH, False), BATCH)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    _log_to_devnull()
    cpu = [Column("us/request (CPU)", ".1f")]
    handler = FigureTable("REST handler (submit), in-process echo upstream", "route", 24, cpu)
    for route in ("json", "protobuf"):
        for concurrency in (1, 64):
            cost = trio.run(handler_cost, route, args.requests, concurrency)
            handler.row(f"{route}, {concurrency} in flight", cost)
    http = FigureTable(
        "HTTP path, in-process clients and upstream, 64 connections", "route, parser", 24, cpu
    )
    for route in ("json", "protobuf"):
        for name in ("httptools", "h11"):
            http.row(f"{route}, {name}", trio.run(http_cost, route, name, args.requests, 64))
    parts = FigureTable(
        "per-request parts, each alone (timeit, best of 5)",
        "part",
        50,
        [Column("us/request", ".2f")],
    )
    total = 0.0
    counted = (
        "parse",
        "request object",
        "routing",
        "policy, no rules",
        "JSON check",
        "request id",
        "response head + body, checked=True",
        f"metrics: tally.count + publish/{BATCH}",
        f"access record: built + add + format/{BATCH}",
    )
    for name, micros in part_costs():
        if name.startswith(counted):
            total += micros
        parts.row(name, micros)
    parts.row("sum (json route, no policy, checked, tally)", total)


if __name__ == "__main__":
    main()

"""Fuzz target for the WebSocket frame path (docs/websocket.md), through the real session.

Run with `python fuzz/fuzz_websocket.py -max_total_time=60
-dict=fuzz/websocket.dict build/fuzz-corpus/websocket fuzz/corpus/websocket`
(`make fuzz FUZZ_TARGET=websocket`). An input's first byte picks the session's mode, the
handshake's parser, the stream, the chunking and how the client ends (see
`Plan`); the rest is what the client sends after a valid opening handshake,
usually frames (the seeds' are masked with a zero key, so that their payloads
can be read and mutated as they are).

Each input runs in its own `trio.run` under a mock clock (time limits fire at
once instead of in seconds): the real mock upstream (tlvproxy/mock_upstream.py
on tests/fixtures/table.yaml) on 127.0.0.1:0, a real pool, and the real HTTP
driver with `serve_websocket` as its upgrade handler on one end of a stream
pair, the client on the other. Whatever the input:

- nothing escapes, nothing is logged at ERROR or with a traceback (the
  catch-alls log "upgraded connection from ... failed", "rendering ...
  failed"), and no warning is logged but those a client may cause (a WAF
  match, a client that does not read);
- the client reads the 101 answer and then only well-formed server frames:
  unmasked, final, no RSV bit, text (a JSON object: an answer, a push or an
  error), binary (in binary mode, exactly one TLV frame), pong or close;
  nothing after the close frame, whose code is one of CLOSE_CODES below
  (docs/websocket.md "Close codes");
- the session ends, and with a close frame unless the client half-closed
  first (then it may just close); it never outlives an hour of mock time;
- the run's memory (tracemalloc peak, see harness.py for which runs are
  traced) stays below the peak of a session that sends nothing plus a slack, a
  small multiple of the input's size and what a session may hold (a message of
  `max_message` bytes in up to 1,024 fragments, as docs/websocket.md
  "Close codes" says).

Importing this file does not import atheris; tests/server/test_websocket*.py
cover the same path with hand-made frames.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import random
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs
import trio
import trio.testing
from harness import GatewayLogs, MemoryProbe, instrument_modules

from tlvproxy.auth.authenticators import Authenticators
from tlvproxy.config.loader import load_table
from tlvproxy.config.model import Address, NodeSpec
from tlvproxy.errors import GatewayError, status_of
from tlvproxy.framing import NEED_DATA, Frame, FrameDecoder, FramingError
from tlvproxy.metrics import Metrics
from tlvproxy.mock_upstream import serve_mock_upstream
from tlvproxy.policy.waf import Waf
from tlvproxy.server.http_conn import HttpSettings, Request, Response, serve_http_connection
from tlvproxy.server.websocket import WebSocketSessions, serve_websocket
from tlvproxy.server.ws_reading import MAX_FRAGMENTS
from tlvproxy.stores.limits import RateLimits
from tlvproxy.stores.local_store import LocalBuckets
from tlvproxy.upstream.pool import open_pool

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from tlvproxy.config.model import Table
    from tlvproxy.server.traffic import CommandTraffic
    from tlvproxy.upstream.pool import Pool

# Imported now, not on the first connection, so that `main` instruments them.
importlib.import_module("tlvproxy.server.h11_parser")
importlib.import_module("tlvproxy.server.httptools_parser")

FIXTURE_TABLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "table.yaml"
# Small, so that inputs of a few KiB reach it, in one frame or in fragments.
MAX_MESSAGE = 2048
HANDSHAKE = (
    b"GET /ws?uid=7&did=fuzz HTTP/1.1\r\n"
    b"Host: gateway\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)
MAX_CHUNKS = 256
# An hour of mock time: a session still open by then waits for nothing that
# will come (idle_timeout is 2 minutes, CLOSE_TIMEOUT 5 s).
LIFETIME = 3600.0

# Close codes the gateway may send: its own (docs/websocket.md "Close codes")
# and wsproto's verdicts on protocol errors (1002, 1007); a client's close is
# answered with its code, which may be any the RFC lets a client send (RFC 6455
# 7.4). 1005 and 1006 are never sent on the wire.
CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, *range(3000, 5000)}
)
# Warnings a client may cause; any other warning is a finding.
ALLOWED_WARNINGS = frozenset(
    {
        "waf rule matched a websocket message",
        "websocket client not reading: closing the session",
    }
)

# The memory bound of a run, over the peak of a session that receives nothing
# (`calibrate`): a slack, a few copies of the input, and what a session may
# hold whatever the input: a message of max_message bytes (joined from its
# fragments: twice) and up to MAX_FRAGMENTS fragment objects.
MEMORY_SLACK = 48 * 1024
MEMORY_PER_INPUT_BYTE = 4
MEMORY_HELD = 4 * MAX_MESSAGE + MAX_FRAGMENTS * 64
BASELINE: dict[str, int] = {}

LOGS = GatewayLogs()
MEMORY = MemoryProbe()


def _load_tables() -> tuple[Table, dict[str, Table]]:
    upstream = load_table(FIXTURE_TABLE)
    assert upstream.websocket is not None
    gateway = {
        mode: attrs.evolve(
            upstream,
            websocket=attrs.evolve(upstream.websocket, mode=mode, max_message=MAX_MESSAGE),
        )
        for mode in ("json", "binary")
    }
    return upstream, gateway


UPSTREAM_TABLE, TABLES = _load_tables()
# The `store: local` rate limits of every run, in a directory of the harness's
# own (removed when it exits).
_STORE_DIRECTORY = tempfile.TemporaryDirectory(prefix="tlvproxy-fuzz-")
LOCAL_BUCKETS = LocalBuckets(Path(_STORE_DIRECTORY.name))
WAFS = {mode: Waf(table.waf) for mode, table in TABLES.items()}


def _no_key_urls(spec: object) -> object:
    raise AssertionError(f"the fuzz table fetches no key set ({spec})")


# The table has no `auth`: the authenticators are never asked anything.
AUTH = Authenticators(UPSTREAM_TABLE.auth, Metrics(), _no_key_urls)  # type: ignore[arg-type]


@attrs.frozen
class _Runtime:
    """What a session needs of the table it runs on (server/runtime.py)."""

    table: Table
    pools: Mapping[str, Pool]
    limiter: RateLimits
    waf: Waf
    auth: Authenticators
    traffic: Mapping[str, CommandTraffic]


@attrs.frozen
class Plan:
    """How one input is delivered: decoded from its first byte.

    bit 0: the session's mode (json or binary); bit 1: the parser of the
    handshake (h11 or httptools: they hand the bytes past it over
    differently); bits 2-4: the chunk size (the whole input, or 1, 2, 3, 7,
    16, 64, 200 bytes; the rest in one past MAX_CHUNKS chunks), the handshake
    going out with the first; bits 5-6: how the client ends: "eof" (it
    half-closes once it has sent everything), "close" (once every task is
    blocked, it sends a close frame and reads to the end), "idle" (it reads
    to the end and answers nothing: the session must end on its own) or
    "reply" (the same, but it answers a close frame as a browser does);
    bit 7: the stream, a socket pair (the session reads and writes the
    descriptor itself) or an in-memory pair (any other stream, such as TLS).
    """

    mode: Literal["json", "binary"]
    parser: Literal["h11", "httptools"]
    chunk: int
    client: Literal["eof", "close", "idle", "reply"]
    stream: Literal["memory", "socket"]

    @classmethod
    def of(cls, flags: int) -> Plan:
        return cls(
            mode="binary" if flags & 1 else "json",
            parser="httptools" if flags & 2 else "h11",
            chunk=(0, 1, 2, 3, 7, 16, 64, 200)[(flags >> 2) & 7],
            client=("eof", "close", "idle", "reply")[(flags >> 5) & 3],  # type: ignore[arg-type]
            stream="socket" if flags & 0x80 else "memory",
        )

    def chunks(self, size: int) -> Iterator[tuple[int, int]]:
        """(start, end) of each chunk of `size` bytes, the first taking in the
        handshake, one at a time; past MAX_CHUNKS, the rest in one."""
        step = self.chunk or size
        start = 0
        for number in range(MAX_CHUNKS):
            if start >= size:
                return
            end = min(start + step + (len(HANDSHAKE) if number == 0 else 0), size)
            yield start, end
            start = end
        if start < size:
            yield start, size


@attrs.define
class Run:
    """What one session gave, as the client saw it."""

    plan: Plan
    handshake: bytes | None = None  # the answer's head, once read
    frames: int = 0  # server frames read
    messages: int = 0  # text and binary ones among them
    close: tuple[int, str] | None = None  # the server's close frame: code, reason
    wire_problem: str | None = None  # what was wrong with the server's bytes, once
    wire_tail: bytes = b""  # the last bytes received, to show
    closed: bool = False  # the client read the end of the stream
    reset: bool = False  # ... or a reset
    lived: bool = True  # the session ended within LIFETIME
    peak: int | None = None


class FrameReader:
    """Reads the server's bytes as they arrive, independently of the gateway's
    code (RFC 6455 5.2); the first thing wrong goes to `run.wire_problem`."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.decoder_layout = TABLES[run.plan.mode].framing

    def feed(self, data: bytes) -> None:
        run = self.run
        run.wire_tail = (run.wire_tail + data)[-300:]
        if run.wire_problem is not None:
            return
        self.buffer += data
        try:
            while self._one():
                pass
        except AssertionError as exc:
            run.wire_problem = str(exc) or repr(exc)

    def _one(self) -> bool:
        """Read the answer's head or one frame off the buffer; False when
        none is complete."""
        buffer, run = self.buffer, self.run
        if run.handshake is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                assert len(buffer) < 4096, "an answer head of 4 KiB"
                return False
            run.handshake = bytes(buffer[: end + 4])
            assert run.handshake.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), (
                f"the handshake was refused: {run.handshake!r}"
            )
            del buffer[: end + 4]
            return True
        if not buffer:
            return False
        assert run.close is None, f"bytes after the close frame: {bytes(buffer[:100])!r}"
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        assert first & 0x80, f"a server frame without FIN: {first:#x}"
        assert not first & 0x70, f"a server frame with RSV bits: {first:#x}"
        assert not second & 0x80, "a masked server frame"
        opcode = first & 0x0F
        length = second & 0x7F
        start = 2
        if length == 126:
            if len(buffer) < 4:
                return False
            length = int.from_bytes(buffer[2:4], "big")
            start = 4
            assert length >= 126, "a 16-bit length under 126"
        elif length == 127:
            if len(buffer) < 10:
                return False
            length = int.from_bytes(buffer[2:10], "big")
            start = 10
            assert 65536 <= length < 1 << 63, "a 64-bit length out of range"
        assert length <= 4 * 1024 * 1024, f"a server frame of {length} bytes"
        if len(buffer) < start + length:
            return False
        payload = bytes(buffer[start : start + length])
        del buffer[: start + length]
        run.frames += 1
        if opcode == 0x1:
            self._text(payload)
        elif opcode == 0x2:
            self._binary(payload)
        elif opcode == 0x8:
            self._close(payload)
        else:
            assert opcode in (0x9, 0xA), f"opcode {opcode:#x}"
            assert length <= 125, "a control frame over 125 bytes"
        return True

    def _text(self, payload: bytes) -> None:
        self.run.messages += 1
        text = payload.decode("utf-8")  # UnicodeDecodeError: a finding too
        message = json.loads(text)
        assert isinstance(message, dict), f"a text message that is not an object: {text[:200]}"
        assert "error" in message or "cmd" in message, f"what is this message: {text[:200]}"

    def _binary(self, payload: bytes) -> None:
        self.run.messages += 1
        assert self.run.plan.mode == "binary", "a binary message in json mode"
        decoder = FrameDecoder(self.decoder_layout)
        decoder.receive_data(payload)
        try:
            event = decoder.next_event()
            rest = decoder.next_event()
        except FramingError as exc:
            raise AssertionError(f"a binary message that is no TLV frame: {exc}") from None
        assert isinstance(event, Frame), f"a binary message that is no whole TLV frame: {event}"
        assert rest is NEED_DATA, "a binary message of more than a frame"
        assert decoder.buffered == 0, "a binary message of more than a frame"

    def _close(self, payload: bytes) -> None:
        assert len(payload) != 1, "a close frame of one byte"
        assert len(payload) <= 125, "a close frame over 125 bytes"
        if not payload:
            # No code: the answer to a client's close without one (RFC 6455
            # 5.5.1); 1005 stands for it, and is never sent.
            self.run.close = (1005, "")
            return
        code = int.from_bytes(payload[:2], "big")
        reason = payload[2:].decode("utf-8")
        assert code in CLOSE_CODES, f"close code {code} ({reason!r})"
        self.run.close = (code, reason)

    def finish(self) -> None:
        """The stream ended: nothing may be left half read."""
        run = self.run
        if run.wire_problem is None and self.buffer:
            run.wire_problem = f"the stream ended inside a frame: {bytes(self.buffer[:200])!r}"


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a zero key (RFC 6455 5.3)."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


async def _not_found(request: Request) -> Response:
    return Response(404, [], b"")


def _error_response(error: GatewayError, request: Request | None) -> Response:
    return Response(status_of(error), [("X-Error", error.code)], b"")


async def _drive(plan: Plan, data: bytes, run: Run) -> None:
    table = TABLES[plan.mode]
    stream = HANDSHAKE + data
    # Metrics of their own: each run's node is a new port, a new label value.
    metrics = Metrics()
    with trio.move_on_after(LIFETIME) as lifetime:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_mock_upstream, "127.0.0.1", 0, UPSTREAM_TABLE)
            host, port = address.rsplit(":", 1)
            spec = attrs.evolve(
                table.upstreams["im"],
                nodes=(NodeSpec(address=Address(host, int(port))),),
                heartbeat=None,
            )
            async with open_pool(spec, table.framing, metrics) as pool:
                runtime = _Runtime(
                    table=table,
                    pools={"im": pool},
                    limiter=RateLimits(table.rate_limits, metrics, local=LOCAL_BUCKETS),
                    waf=WAFS[plan.mode],
                    auth=AUTH,
                    traffic={},
                )
                await _session(plan, stream, run, runtime, metrics)
            nursery.cancel_scope.cancel()  # the mock upstream
    run.lived = not lifetime.cancelled_caught


async def _session(
    plan: Plan, stream: bytes, run: Run, runtime: _Runtime, metrics: Metrics
) -> None:
    server: trio.abc.HalfCloseableStream
    client: trio.abc.HalfCloseableStream
    if plan.stream == "socket":
        left, right = trio.socket.socketpair()
        server, client = trio.SocketStream(left), trio.SocketStream(right)
    else:
        server, client = trio.testing.lockstep_stream_pair()
    reader = FrameReader(run)
    sessions = WebSocketSessions()
    settings = HttpSettings.from_limits(runtime.table.limits, plan.parser)

    async def upgrade(request: Request, stream: trio.abc.Stream, leftover: bytes) -> None:
        await serve_websocket(
            request, stream, leftover, runtime=runtime, metrics=metrics, sessions=sessions
        )

    sending = trio.Lock()  # the sender and a close's reply share the stream

    async def send() -> None:
        try:
            for start, end in plan.chunks(len(stream)):
                async with sending:
                    await client.send_all(stream[start:end])
                if plan.stream == "socket":
                    # A socket takes every chunk at once: let the session read
                    # this one before the next is sent.
                    await trio.testing.wait_all_tasks_blocked()
            if plan.client == "eof":
                await client.send_eof()
            elif plan.client == "close":
                await trio.testing.wait_all_tasks_blocked()
                async with sending:
                    await client.send_all(_client_frame(0x8, (1000).to_bytes(2, "big")))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the session closed first

    async def receive() -> None:
        answered = False
        try:
            while chunk := await client.receive_some(65536):
                reader.feed(bytes(chunk))
                if plan.client == "reply" and run.close is not None and not answered:
                    answered = True
                    code = run.close[0].to_bytes(2, "big")
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        async with sending:
                            await client.send_all(_client_frame(0x8, code))
            run.closed = True
        except trio.BrokenResourceError:
            run.reset = True
        reader.finish()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(send)
        await serve_http_connection(
            server, "127.0.0.1", settings, _not_found, _error_response, upgrade=upgrade
        )
    await client.aclose()


def run_one(plan: Plan, data: bytes, *, retried: bool = False) -> Run:
    """One session on `data`, checked."""
    run = Run(plan)
    # trio shuffles its run queue at random: seed it, so that an input replays
    # the same way (a private attribute; without it runs still work).
    scheduler = getattr(trio._core._run, "_r", None)
    if isinstance(scheduler, random.Random):
        scheduler.seed(zlib.crc32(data))
    LOGS.records.clear()
    clock = trio.testing.MockClock(autojump_threshold=0)
    with MEMORY.measure(force=retried) as peak:
        trio.run(_drive, plan, data, run, clock=clock)
    run.peak = peak.bytes
    if run.peak is not None and run.peak > memory_bound(plan, data) and not retried:
        # Once more: the first run of a path may import a module or fill a
        # cache; only an excess that comes back is the input's doing.
        return run_one(plan, data, retried=True)
    check_run(run, data)
    return run


def memory_bound(plan: Plan, data: bytes) -> int:
    """The most one run on `data` may allocate at its peak."""
    base = BASELINE.get(plan.mode, 256 * 1024)
    return base + MEMORY_SLACK + MEMORY_PER_INPUT_BYTE * len(data) + MEMORY_HELD


def check_run(run: Run, data: bytes) -> None:
    """Every promise of one run (see the module docstring)."""
    problems = [
        (record.getMessage(), record.levelname)
        for record in LOGS.records
        if record.levelname != "WARNING"
        or record.exc_info
        or record.getMessage() not in ALLOWED_WARNINGS
    ]
    assert not problems, f"logged: {problems}; {LOGS.problems()}"
    assert run.lived, f"the session was still open after {LIFETIME:g} s (mock time)"
    assert run.wire_problem is None, f"{run.wire_problem}; last bytes received: {run.wire_tail!r}"
    assert run.handshake is not None, f"no answer to the handshake: {run.wire_tail!r}"
    if run.plan.client != "eof":
        # The client kept its side open and read: the session ends with a
        # close frame, the client's answer or its own (idle_timeout at last).
        assert run.close is not None, f"the session ended without a close frame: {run}"
    if run.peak is not None:
        bound = memory_bound(run.plan, data)
        assert run.peak <= bound, f"peaked at {run.peak} bytes (bound {bound})"


def one_input(data: bytes) -> None:
    """The atheris entry point."""
    if not data:
        return
    run_one(Plan.of(data[0]), data[1:])


def calibrate() -> None:
    """Measure each mode's peak for a session that receives nothing, over
    every plan; the memory bound is counted from it."""
    for mode_bit, mode in ((0, "json"), (1, "binary")):
        flags = [bits | mode_bit for bits in range(0, 256, 2)]
        for flag in flags[::4]:
            run_one(Plan.of(flag), b"")  # warm up: imports, caches
        peaks = []
        for flag in flags[::4]:
            with MEMORY.measure(force=True) as peak:
                trio.run(
                    _drive,
                    Plan.of(flag),
                    b"",
                    Run(Plan.of(flag)),
                    clock=trio.testing.MockClock(autojump_threshold=0),
                )
            assert peak.bytes is not None
            peaks.append(peak.bytes)
        BASELINE[mode] = max(peaks)
    sys.stderr.write(f"INFO: memory baseline per run: {BASELINE} bytes\n")
    MEMORY.restart()


def main() -> None:
    # Imported here: only a fuzzing run needs atheris.
    import atheris

    LOGS.install()
    instrument_modules(
        "tlvproxy.server.websocket",
        "tlvproxy.server.ws_session",
        "tlvproxy.server.ws_reading",
        "tlvproxy.server.ws_requests",
        "tlvproxy.server.ws_binary",
        "tlvproxy.server.ws_calls",
        "tlvproxy.server.ws_writing",
        "tlvproxy.server.ws_wire",
        "tlvproxy.server.ws_json",
        "tlvproxy.framing",
        "wsproto",
    )
    if MEMORY.mode != "off":
        calibrate()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

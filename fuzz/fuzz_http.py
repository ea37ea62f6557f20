"""Fuzz target for the HTTP request path of both parsers (docs/reference.md "Limits").

Run with `python fuzz/fuzz_http.py -max_total_time=60 -dict=fuzz/http.dict
build/fuzz-corpus/http fuzz/corpus/http` (`make fuzz FUZZ_TARGET=http`). An input's first byte picks
how the rest is delivered (see `Plan`: the stream, the chunking, how the
handler answers, when the client half-closes); the rest is what the client
sends. The same bytes, the same way, go through the real connection driver
(`serve_http_connection`) once with each parser, under a mock clock (time
limits fire at once instead of in seconds), with a handler that answers 200
and an upgrade handler that takes the stream.

For each parser, whatever the input:

- nothing escapes `serve_http_connection`, and nothing is logged at WARNING
  or above (its catch-all logs "HTTP connection from ... failed");
- the connection ends (within ten minutes of mock time), with a close, not a
  reset;
- the client receives well-formed HTTP/1.1 answers and nothing else: `100
  Continue`s, then finals with a Content-Length and a status among 200, 400,
  408, 413 and 431; the 200s in request order; nothing after `Connection:
  close`, which every refusal carries; then the connection closes (or is
  handed over);
- a client that waits for its answers before half-closing gets one for
  every request the handler was given;
- every request the handler sees is within the limits (its body within
  `max_request_body`, its head within `max_header_bytes`);
- the run's memory (its tracemalloc peak, see harness.py for which runs are
  traced) stays below the peak of a minimal request plus a slack, a small
  multiple of the input's size and the objects of the 32 pipelined requests
  a connection may hold.

Between the parsers (docs/reference.md "Limits": both "accept and refuse the
same bytes, at the same point"): the handler is given the same requests (method,
target, version, headers, body) in the same order, the answers accept and refuse
alike, and an upgrade is taken at the same point; and neither accepts a request
with both Content-Length and Transfer-Encoding. FUZZ_HTTP_DIFF says what a
difference is: `assert` (the default: a crash), `report` (one file per kind in
build/fuzz-http-diffs/, then fuzzing goes on) or `off`.

tests/server/test_http_fuzz.py runs the driver on random bytes under
hypothesis, so CI exercises the path without atheris; importing this file does
not import atheris.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import importlib
import os
import random
import re
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs
import trio
import trio.testing
from harness import GatewayLogs, MemoryProbe, instrument_modules

from tlvproxy.errors import GatewayError, status_of
from tlvproxy.server.http_conn import (
    Answer,
    HttpSettings,
    Request,
    Response,
    serve_http_connection,
)
from tlvproxy.server.parsers import head_size

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

# Imported now, not on the first connection (as `new_parser` does), so that
# `main` instruments them.
importlib.import_module("tlvproxy.server.h11_parser")
importlib.import_module("tlvproxy.server.httptools_parser")

ParserName = Literal["h11", "httptools"]
PARSERS: tuple[ParserName, ...] = ("h11", "httptools")

# Small limits, so that inputs of a few KiB reach both sides of each (a body
# of 4 KiB in one-byte chunks is an input of 24 KiB: see the memory bound).
MAX_HEADER_BYTES = 512
MAX_REQUEST_BODY = 4096
SETTINGS = {
    parser: HttpSettings(
        max_header_bytes=MAX_HEADER_BYTES,
        max_request_body=MAX_REQUEST_BODY,
        header_timeout=5.0,
        keepalive_timeout=10.0,
        parser=parser,
    )
    for parser in PARSERS
}

# The memory bound of a run, over the peak of a minimal request with the same
# parser (`calibrate`): a slack for what varies between runs, a few copies of
# the input (the stream's chunks, the parser's buffer, the pieces it is cut
# into: whatever a connection holds came in as input), and the objects of the
# 32 pipelined requests a connection may hold while they wait for their
# answers. A chunked body in one-byte chunks must cost no more than the same
# body with Content-Length (docs/reference.md "Limits"): a parser that keeps an
# object per chunk (some 60 bytes for each chunk of 6) passes the bound once the
# body has a few thousand chunks (fuzz/corpus/http/post-chunked-4000-one-byte-chunks).
MEMORY_SLACK = 32 * 1024
MEMORY_PER_INPUT_BYTE = 4
MEMORY_HELD = 32 * 1024
BASELINE: dict[ParserName, int] = {}

MAX_CHUNKS = 256
# Ten minutes of mock time: a connection still open by then waits for nothing
# that will come (header_timeout is 5 s, keepalive_timeout 10 s).
LIFETIME = 600.0

FINAL_STATUSES = frozenset({200, 400, 408, 413, 431})
UPGRADED = b"\x00upgraded\x00"  # what the upgrade handler writes on the stream it takes
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-9][0-9][0-9]) [\x20-\x7e]*")
_HEADER_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+): ([\x20-\x7e]*)")
_SHOWN = 6  # requests of a run kept whole, to show in a report

DIFF_MODE = os.environ.get("FUZZ_HTTP_DIFF", "assert")
DIFF_DIR = Path("build/fuzz-http-diffs")
_MAX_DIFF_REPORTS = 200

LOGS = GatewayLogs()
MEMORY = MemoryProbe()


@attrs.frozen
class Plan:
    """How one input is delivered: decoded from its first byte.

    bits 0-2: the chunk size (the whole input, or 1, 2, 3, 7, 16, 64, 200 bytes,
    the rest in one past MAX_CHUNKS chunks);
    bits 3-4: the handler (a Submitter answering at once, one answering from
    another task a few scheduler passes later, later requests first, an async
    handler, or a Submitter whose answers are held until every task is
    blocked); bit 5: whether an upgrade handler is given; bit 6: whether the
    client half-closes as soon as it has sent everything ("eof") or once
    every task is blocked ("wait": the driver has answered what it will);
    bit 7: the stream, a socket pair (the driver reads and writes the
    descriptor itself) or an in-memory pair (any other stream, such as TLS).
    """

    chunk: int
    handler: Literal["now", "later", "async", "held"]
    upgrade: bool
    client: Literal["eof", "wait"]
    stream: Literal["memory", "socket"]

    @classmethod
    def of(cls, flags: int) -> Plan:
        return cls(
            chunk=(0, 1, 2, 3, 7, 16, 64, 200)[flags & 7],
            handler=("now", "later", "async", "held")[(flags >> 3) & 3],  # type: ignore[arg-type]
            upgrade=bool(flags & 0x20),
            client="wait" if flags & 0x40 else "eof",
            stream="socket" if flags & 0x80 else "memory",
        )

    def chunks(self, size: int) -> Iterator[tuple[int, int]]:
        """(start, end) of each chunk of an input of `size` bytes, one at a
        time (a list of them would weigh more than the input); past
        MAX_CHUNKS, the rest in one (each chunk costs a few scheduler passes)."""
        step = self.chunk or size
        start = 0
        for _ in range(MAX_CHUNKS):
            if start >= size:
                return
            yield start, min(start + step, size)
            start += step
        if start < size:
            yield start, size


@attrs.define
class Run:
    """What one run of the driver gave. Requests are kept as a running digest
    (and the first few whole), answers as their statuses: what a run holds
    must not grow with the input faster than the driver's own memory."""

    parser: ParserName
    handled: int = 0  # requests given to the handler
    digest: hashlib._Hash = attrs.Factory(lambda: hashlib.blake2b(digest_size=16))
    shown: list[str] = attrs.Factory(list)  # the first requests, whole
    heads: set[int] = attrs.Factory(set)  # which requests were HEADs (no body answered)
    violations: list[str] = attrs.Factory(list)  # requests over the limits
    statuses: array.array[int] = attrs.Factory(lambda: array.array("H"))
    wire_problem: str | None = None  # what was wrong with the answers, once
    wire_tail: bytes = b""  # the last bytes received, to show
    closed: bool = False  # the client read the end of the stream
    lived: bool = True  # the connection ended within LIFETIME
    upgraded: str | None = None  # the request handed over, whole
    upgrade_seen: bool = False  # the upgrade handler's bytes arrived, last
    cl_te: bool = False  # a request with Content-Length and Transfer-Encoding got through
    before_eof: tuple[int, int] | None = None  # ("wait") requests handled, 200s read
    errors: list[str] = attrs.Factory(list)  # "code: message" of each error answered
    peak: int | None = None

    def oks(self) -> int:
        return self.statuses.count(200)

    def verdict(self) -> tuple[object, ...]:
        """What the parsers must agree on: the requests handled, which
        answers accept and which refuse, and the upgrade taken."""
        finals = tuple(status == 200 for status in self.statuses if status != 100)
        return self.handled, self.digest.digest(), finals, self.upgraded


def _describe(request: Request) -> str:
    return repr(
        (request.method, request.target, request.http_version, request.headers, request.body)
    )


def _response(run: Run, request: Request) -> Response:
    """The 200 answer to the `run.handled`-th request, numbered to check the order."""
    number = run.handled
    run.handled += 1
    described = _describe(request)
    run.digest.update(described.encode("utf-8", "surrogateescape") + b"\x00")
    if number < _SHOWN:
        run.shown.append(described)
    if request.method == "HEAD":
        run.heads.add(number)
    size = head_size(request.method, request.target, request.http_version, request.headers)
    if len(request.body) > MAX_REQUEST_BODY or size > MAX_HEADER_BYTES:
        run.violations.append(f"body {len(request.body)}, head {size}: {described[:300]}")
    if _TOKEN.fullmatch(request.method) is None:
        run.violations.append(f"method {request.method!r}")
    names = {name for name, _ in request.headers}
    if {"content-length", "transfer-encoding"} <= names:
        run.cl_te = True
    text = str(number)
    return Response(200, [("X-N", text)], text.encode(), checked=True)


class _NowSubmitter:
    """Answers in `submit`, as the REST handler does when it refuses a request."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def submit(self, request: Request, answer: Answer) -> None:
        answer.set(_response(self.run, request))


class _LaterSubmitter:
    """Answers from another task a few scheduler passes later, as the upstream
    reader does: later requests are often answered before earlier ones.
    Passes, not time: a client waiting for every task to block must find the
    answers given."""

    def __init__(self, run: Run, nursery: trio.Nursery) -> None:
        self.run = run
        self.nursery = nursery

    def submit(self, request: Request, answer: Answer) -> None:
        response = _response(self.run, request)
        passes = 3 - self.run.handled % 4
        self.nursery.start_soon(self._answer, answer, response, passes)

    async def _answer(self, answer: Answer, response: Response, passes: int) -> None:
        for _ in range(passes):
            await trio.lowlevel.checkpoint()
        answer.set(response)


class _HeldSubmitter:
    """Holds every answer until every task is blocked (the driver waits for
    bytes or for answers, the client for the driver), then gives them all."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.held: list[tuple[Answer, Response]] = []
        self.holding = trio.Event()
        self.scope = trio.CancelScope()

    def submit(self, request: Request, answer: Answer) -> None:
        self.held.append((answer, _response(self.run, request)))
        self.holding.set()

    async def release(self) -> None:
        """Until `scope` is cancelled: once an answer is held and every task is
        blocked, give every answer held."""
        with self.scope:
            while True:
                await self.holding.wait()
                await trio.testing.wait_all_tasks_blocked()
                self.holding = trio.Event()
                held, self.held = self.held, []
                for answer, response in held:
                    answer.set(response)


class AnswerReader:
    """Reads the answers as they arrive, independently of the driver's code,
    into `run.statuses`; the first thing wrong goes to `run.wire_problem`."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.closed = False  # an answer with Connection: close was read

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
        """Read one answer off the buffer; False when none is complete."""
        buffer, run = self.buffer, self.run
        if not buffer:
            return False
        if run.upgraded is not None and buffer.startswith(UPGRADED[: len(buffer)]):
            if len(buffer) < len(UPGRADED):
                return False
            assert not run.upgrade_seen, "the upgrade handler's bytes twice"
            run.upgrade_seen = True
            del buffer[: len(UPGRADED)]
            return True
        assert not run.upgrade_seen, "bytes after the upgrade handler's"
        assert not self.closed, "bytes after Connection: close"
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            assert len(buffer) < 4096, "an answer head of 4 KiB"
            return False
        status_line, *lines = bytes(buffer[:end]).split(b"\r\n")
        match = _STATUS_LINE.fullmatch(status_line)
        assert match, f"status line {status_line!r}"
        status = int(match[1])
        fields: dict[bytes, bytes] = {}
        for line in lines:
            field = _HEADER_LINE.fullmatch(line)
            assert field, f"header line {line!r}"
            name = field[1].lower()
            assert name not in fields, f"{name!r} twice"
            fields[name] = field[2]
        if status == 100:
            assert not fields, f"100 Continue with {fields}"
            del buffer[: end + 4]
            run.statuses.append(status)
            return True
        assert status in FINAL_STATUSES, f"status {status}"
        length = int(fields[b"content-length"])
        body_length = length
        if status == 200:
            number = run.statuses.count(200)
            assert fields.get(b"x-n") == str(number).encode(), (
                f"answer {fields.get(b'x-n')!r} where {number} was due"
            )
            assert length == len(str(number))
            # A HEAD answer has the Content-Length a GET would get, and no body.
            if number in run.heads:
                body_length = 0
        else:
            assert length == 0, "a refusal with a body"  # the error handler gives none
            assert fields.get(b"connection") == b"close", f"a {status} that keeps the connection"
        if len(buffer) < end + 4 + body_length:
            return False
        body = bytes(buffer[end + 4 : end + 4 + body_length])
        if status == 200 and body_length:
            assert body == str(number).encode(), f"body {body!r} for answer {number}"
        del buffer[: end + 4 + body_length]
        self.closed = fields.get(b"connection") == b"close"
        run.statuses.append(status)
        return True

    def finish(self) -> None:
        """The stream ended: nothing may be left half read."""
        if self.run.wire_problem is None and self.buffer:
            self.run.wire_problem = f"the stream ended inside an answer: {bytes(self.buffer)!r}"


async def _drive(parser: ParserName, plan: Plan, data: bytes, run: Run) -> None:
    server: trio.abc.HalfCloseableStream
    client: trio.abc.HalfCloseableStream
    if plan.stream == "socket":
        # The driver's own path for sockets: non-blocking os.read and os.write.
        left, right = trio.socket.socketpair()
        server, client = trio.SocketStream(left), trio.SocketStream(right)
    else:
        # Any other stream (TLS): receive_some and send_all, one chunk each.
        server, client = trio.testing.lockstep_stream_pair()
    reader = AnswerReader(run)

    def error_handler(error: GatewayError, request: Request | None) -> Response:
        run.errors.append(f"{error.code}: {error.message}"[:300])
        # No body: a refusal of a HEAD request has none, and the reader
        # cannot always tell which request a refusal answers.
        return Response(status_of(error), [("X-Error", error.code)], b"")

    async def upgrade(request: Request, stream: trio.abc.Stream, leftover: bytes) -> None:
        run.upgraded = _describe(request) + f" leftover {len(leftover)}"
        if not data.endswith(leftover):
            run.violations.append(f"leftover {leftover[:100]!r} is not the input's end")
        names = {name for name, _ in request.headers}
        if {"content-length", "transfer-encoding"} <= names:
            run.cl_te = True
        await stream.send_all(UPGRADED)

    async def send() -> None:
        try:
            for start, end in plan.chunks(len(data)):
                await client.send_all(data[start:end])
                if plan.stream == "socket":
                    # A socket takes every chunk at once: let the driver read
                    # this one before the next is sent.
                    await trio.testing.wait_all_tasks_blocked()
            if plan.client == "wait":
                # Once the driver has answered what it will. The cushion
                # (real time) puts this after the held answers' release,
                # which waits for the same moment with none.
                await trio.testing.wait_all_tasks_blocked(1e-9)
                run.before_eof = (run.handled, run.oks())
            await client.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the driver closed first, after an answer that closes

    async def receive() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # a reset ends it as well
            while chunk := await client.receive_some(65536):
                reader.feed(bytes(chunk))
            run.closed = True
        reader.finish()

    with trio.move_on_after(LIFETIME) as lifetime:
        async with trio.open_nursery() as nursery:
            held: _HeldSubmitter | None = None
            handler: object
            if plan.handler == "now":
                handler = _NowSubmitter(run)
            elif plan.handler == "later":
                handler = _LaterSubmitter(run, nursery)
            elif plan.handler == "held":
                handler = held = _HeldSubmitter(run)
            else:

                async def handler(request: Request) -> Response:
                    await trio.lowlevel.checkpoint()
                    return _response(run, request)

            nursery.start_soon(receive)
            nursery.start_soon(send)
            if held is not None:
                nursery.start_soon(held.release)
            await serve_http_connection(
                server,
                "127.0.0.1",
                SETTINGS[parser],
                handler,  # type: ignore[arg-type]
                error_handler,
                upgrade=upgrade if plan.upgrade else None,
            )
            if held is not None:
                held.scope.cancel()  # the driver is done: nothing more to answer
    run.lived = not lifetime.cancelled_caught
    await client.aclose()


def run_one(parser: ParserName, plan: Plan, data: bytes, *, retried: bool = False) -> Run:
    """One run of the driver on `data`, checked (all but the agreement)."""
    run = Run(parser)
    # trio shuffles its run queue at random: seed it, so that an input
    # replays the same way (a private attribute; without it runs still work).
    scheduler = getattr(trio._core._run, "_r", None)
    if isinstance(scheduler, random.Random):
        scheduler.seed(zlib.crc32(data))
    LOGS.records.clear()
    clock = trio.testing.MockClock(autojump_threshold=0)
    with MEMORY.measure(force=retried) as peak:
        trio.run(_drive, parser, plan, data, run, clock=clock)
    run.peak = peak.bytes
    if run.peak is not None and run.peak > memory_bound(parser, data) and not retried:
        # Once more: the first run of a path may import a module or fill a
        # cache; only an excess that comes back is the input's doing.
        return run_one(parser, plan, data, retried=True)
    check_run(run, plan, data)
    return run


def memory_bound(parser: ParserName, data: bytes) -> int:
    """The most one run on `data` may allocate at its peak."""
    base = BASELINE.get(parser, 128 * 1024)
    return base + MEMORY_SLACK + MEMORY_PER_INPUT_BYTE * len(data) + MEMORY_HELD


def check_run(run: Run, plan: Plan, data: bytes) -> None:
    """Every promise of one run but the agreement (see the module docstring)."""
    problems = LOGS.problems()
    assert not problems, f"{run.parser} logged: {problems}"
    assert run.wire_problem is None, (
        f"{run.parser}: {run.wire_problem}; last bytes received: {run.wire_tail!r}"
    )
    assert run.lived, f"{run.parser}: the connection was open after {LIFETIME:g} s (mock time)"
    assert run.closed, f"{run.parser}: the connection ended with a reset"
    assert not run.violations, f"{run.parser} let through: {run.violations}"
    if run.upgraded is not None:
        assert plan.upgrade, run.upgraded
        assert run.upgrade_seen, f"{run.parser}: the upgrade handler's bytes did not arrive"
    assert run.oks() <= run.handled, "more 200s than requests handled"
    if run.before_eof is not None:
        # "wait": every request handled was answered, whatever else happened.
        handled, answered = run.before_eof
        assert handled == answered, (
            f"{run.parser}: {handled} requests handled, {answered} answered "
            f"before the client's EOF; answers {list(run.statuses)}"
        )
    if run.peak is not None:
        bound = memory_bound(run.parser, data)
        assert run.peak <= bound, f"{run.parser} peaked at {run.peak} bytes (bound {bound})"


def compare(runs: Sequence[Run], data: bytes) -> None:
    """The parsers' agreement (docs/reference.md "Limits"), asserted or reported per DIFF_MODE."""
    if DIFF_MODE == "off":
        return
    try:
        for run in runs:
            assert not run.cl_te, (
                f"{run.parser} accepted a request with both Content-Length and "
                f"Transfer-Encoding\n{describe(runs)}"
            )
        first, second = (run.verdict() for run in runs)
        assert first == second, describe(runs)
    except AssertionError as exc:
        if DIFF_MODE != "report":
            raise
        _report(str(exc), runs, data)


def describe(runs: Sequence[Run]) -> str:
    lines = ["the parsers disagree:"]
    for run in runs:
        lines.append(
            f"  {run.parser}: {run.handled} handled, answers {list(run.statuses)}, "
            f"errors {run.errors}"
        )
        lines.extend(f"    {shown}" for shown in run.shown)
        if run.upgraded is not None:
            lines.append(f"    upgraded: {run.upgraded}")
    return "\n".join(lines)


_reported: set[str] = set()


def _report(message: str, runs: Sequence[Run], data: bytes) -> None:
    # One file per kind of difference: the error codes, the upgrades, whether
    # the parsers took as many requests and answered as many.
    kind = " / ".join(
        f"{run.parser}:{','.join(e.split(':')[0] for e in run.errors)}"
        f":{'up' if run.upgraded else ''}:{'cl_te' if run.cl_te else ''}"
        for run in runs
    )
    kind += f" / handled {'same' if len({run.handled for run in runs}) == 1 else 'differ'}"
    kind += f" / answers {'same' if len({len(run.statuses) for run in runs}) == 1 else 'differ'}"
    if kind in _reported or len(_reported) >= _MAX_DIFF_REPORTS:
        return
    _reported.add(kind)
    DIFF_DIR.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    (DIFF_DIR / f"diff-{name}").write_bytes(data)
    (DIFF_DIR / f"diff-{name}.txt").write_text(
        f"{kind}\n{Plan.of(data[0])}\n{message}\ninput: {data!r}\n"
    )


def one_input(data: bytes) -> None:
    """The atheris entry point: the input through both parsers, then compared."""
    if not data:
        return
    plan = Plan.of(data[0])
    stream = data[1:]
    runs = [run_one(parser, plan, stream) for parser in PARSERS]
    compare(runs, data)


def calibrate() -> None:
    """Measure each parser's peak on a minimal request, over every plan; the
    memory bound is counted from it."""
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    for parser in PARSERS:
        for flags in range(0, 256, 8):  # every handler, upgrade, client and stream
            run_one(parser, Plan.of(flags), request)  # warm up: imports, caches
        peaks = []
        for flags in range(0, 256, 8):
            with MEMORY.measure(force=True) as peak:
                trio.run(
                    _drive,
                    parser,
                    Plan.of(flags),
                    request,
                    Run(parser),
                    clock=trio.testing.MockClock(autojump_threshold=0),
                )
            assert peak.bytes is not None
            peaks.append(peak.bytes)
        BASELINE[parser] = max(peaks)
    sys.stderr.write(f"INFO: memory baseline per run: {BASELINE} bytes\n")
    MEMORY.restart()


def main() -> None:
    # Imported here: only a fuzzing run needs atheris.
    import atheris

    LOGS.install()
    instrument_modules("tlvproxy.server", "tlvproxy.timer", "tlvproxy.errors", "h11")
    if MEMORY.mode != "off":
        calibrate()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""One strictness for both HTTP parsers (docs/reference.md "Limits").

One table of raw requests and what the gateway answers, run against h11 and
httptools: over a real socket through the connection driver (each request is
followed by a second one on the same connection, which a refused request must
never let through), and through the bare parsers, whole and one byte at a
time, which must yield the same events and the same error.
"""

from __future__ import annotations

import contextlib
import itertools
from functools import partial

import attrs
import pytest
import trio

from tlvproxy.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    status_of,
)
from tlvproxy.server.chunked import MAX_CHUNK_LINE
from tlvproxy.server.http_conn import HttpSettings, Request, Response, serve_http_connection
from tlvproxy.server.parser_choice import new_parser
from tlvproxy.server.parsers import (
    CONNECTION_CLOSED,
    NEED_DATA,
    RequestEnd,
    RequestHead,
)

PARSERS = ["h11", "httptools"]
MAX_HEAD = 1024
MAX_BODY = 4096
ERRORS = {400: BadRequest, 413: PayloadTooLarge, 431: HeadersTooLarge}

H = b"Host: t\r\n"
POST = b"POST /t HTTP/1.1\r\n" + H
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
# The request sent after each case on the same connection.
NEXT = b"GET /next HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"


def chunked(*lines: bytes) -> bytes:
    return CHUNKED + b"".join(lines)


def padded_head(size: int) -> bytes:
    """A GET head of exactly `size` bytes."""
    start = b"GET /t HTTP/1.1\r\n" + H + b"X-Pad: "
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


def padded_chunk_line(size: int) -> bytes:
    """A chunk-size line for 5 bytes, extension included, of exactly `size` bytes."""
    return b"5;x=" + b"e" * (size - 6) + b"\r\n"


def padded_trailers(size: int) -> bytes:
    """A trailer section (blank line included) of exactly `size` bytes."""
    return b"X-T: " + b"t" * (size - 9) + b"\r\n\r\n"


@attrs.frozen
class Case:
    name: str
    raw: bytes
    status: int  # of the answer to `raw`
    body: bytes = b""  # the body the handler sees, for a 200

    @property
    def closes(self) -> bool:
        """True when the answer closes the connection (NEXT is never answered)."""
        return self.status != 200 or b" HTTP/1.0\r\n" in self.raw.split(b"\r\n", 1)[0] + b"\r\n"


CASES = [
    # Accepted, and the next request on the connection is served.
    Case("get", b"GET /t HTTP/1.1\r\n" + H + b"\r\n", 200),
    Case("http-1.0", b"GET /t HTTP/1.0\r\n\r\n", 200),
    Case("content-length", POST + b"Content-Length: 5\r\n\r\nhello", 200, b"hello"),
    Case("content-length-leading-zeros", POST + b"Content-Length: 005\r\n\r\nhello", 200, b"hello"),
    Case("chunked", chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), 200, b"hello world"),
    Case("chunk-size-upper-hex", chunked(b"A\r\n0123456789\r\n0\r\n\r\n"), 200, b"0123456789"),
    Case("chunk-size-16-digits", chunked(b"0000000000000005\r\nhello\r\n0\r\n\r\n"), 200, b"hello"),
    Case(
        "chunk-extensions",
        chunked(b'5;a=b;c;d="x \\" y"\r\nhello\r\n0;e=f\r\n\r\n'),
        200,
        b"hello",
    ),
    Case(
        "chunk-line-at-its-limit",
        chunked(padded_chunk_line(MAX_CHUNK_LINE) + b"hello\r\n0\r\n\r\n"),
        200,
        b"hello",
    ),
    Case("trailers", chunked(b"5\r\nhello\r\n0\r\nX-T: 1\r\nY: a b\r\n\r\n"), 200, b"hello"),
    Case(
        "trailers-at-their-limit",
        chunked(b"5\r\nhello\r\n0\r\n" + padded_trailers(MAX_HEAD)),
        200,
        b"hello",
    ),
    Case(
        "transfer-encoding-after-spaces",
        POST + b"Transfer-Encoding:   chunked\r\n\r\n0\r\n\r\n",
        200,
    ),
    Case("obs-text-value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: caf\xe9\r\n\r\n", 200),
    Case("tab-in-value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\tb\t\r\n\r\n", 200),
    Case("absolute-form", b"GET http://t/x?y HTTP/1.1\r\n" + H + b"\r\n", 200),
    Case("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 200),
    Case("head-at-its-limit", padded_head(MAX_HEAD), 200),
    # Request smuggling: both framings, or framing a proxy may read otherwise.
    Case(
        "content-length-and-chunked",
        POST
        + b"Content-Length: 51\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"0\r\n\r\nGET /v1/users/666/profile HTTP/1.1\r\nX-Ignore: ",
        400,
    ),
    Case(
        "chunked-and-content-length",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        400,
    ),
    Case(
        "chunked-in-http-1.0",
        b"POST /t HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    Case("transfer-encoding-gzip", POST + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    Case(
        "transfer-encoding-gzip-chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    Case(
        "transfer-encoding-chunked-twice",
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    Case(
        "transfer-encoding-two-fields",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    Case(
        "transfer-encoding-capitalised", POST + b"Transfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", 400
    ),
    Case(
        "transfer-encoding-empty-item", POST + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", 400
    ),
    Case(
        "transfer-encoding-tab-after", POST + b"Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n", 400
    ),
    Case("transfer-encoding-identity", POST + b"Transfer-Encoding: identity\r\n\r\n", 400),
    Case("transfer-encoding-empty", POST + b"Transfer-Encoding:\r\n\r\n", 400),
    Case("content-length-list", POST + b"Content-Length: 2, 2\r\n\r\nab", 400),
    Case("content-length-twice", POST + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nab", 400),
    Case(
        "content-length-differs", POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 400
    ),
    Case("content-length-plus", POST + b"Content-Length: +2\r\n\r\nab", 400),
    Case("content-length-negative", POST + b"Content-Length: -1\r\n\r\n", 400),
    Case("content-length-hex", POST + b"Content-Length: 0x2\r\n\r\nab", 400),
    Case("content-length-20-digits", POST + b"Content-Length: 00000000000000000002\r\n\r\nab", 400),
    Case("content-length-empty", POST + b"Content-Length:\r\n\r\n", 400),
    # Line endings and folding.
    Case("obs-fold-space", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    Case("obs-fold-tab", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n", 400),
    Case(
        "obs-fold-hides-transfer-encoding",
        POST + b"Content-Length: 2\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\nab",
        400,
    ),
    Case("bare-lf", b"GET /t HTTP/1.1\nHost: t\n\n", 400),
    Case("bare-lf-in-header", b"GET /t HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", 400),
    Case("bare-lf-ends-head", b"GET /t HTTP/1.1\r\n" + H + b"\n", 400),
    Case("bare-cr", b"GET /t HTTP/1.1\rHost: t\r\n\r\n", 400),
    Case("cr-in-value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    Case("nul-in-value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    Case("control-in-value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    Case("del-in-value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    Case("space-before-colon", b"GET /t HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    Case("no-colon", b"GET /t HTTP/1.1\r\n" + H + b"X-A\r\n\r\n", 400),
    Case("leading-blank-line", b"\r\nGET /t HTTP/1.1\r\n" + H + b"\r\n", 400),
    # The request line.
    Case("http-0.9", b"GET /v1/users/1/profile\r\n\r\n", 400),
    Case("http-1.2", b"GET /t HTTP/1.2\r\n" + H + b"\r\n", 400),
    Case("http-2.0", b"GET /t HTTP/2.0\r\n" + H + b"\r\n", 400),
    Case("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    Case("lowercase-version", b"GET /t http/1.1\r\n" + H + b"\r\n", 400),
    Case("lowercase-method", b"get /t HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("unknown-method", b"PROPFIND /t HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("connect", b"CONNECT t:443 HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("two-spaces-before-target", b"GET  /t HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("two-spaces-after-target", b"GET /t  HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("tab-separator", b"GET\t/t HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("space-before-crlf", b"GET /t HTTP/1.1 \r\n" + H + b"\r\n", 400),
    Case("target-not-a-path", b"GET t HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("asterisk-for-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("ftp-absolute-form", b"GET ftp://t/x HTTP/1.1\r\n" + H + b"\r\n", 400),
    Case("no-host", b"GET /t HTTP/1.1\r\n\r\n", 400),
    Case("two-hosts", b"GET /t HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    # Chunked bodies.
    Case("chunk-size-17-digits", chunked(b"00000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-size-not-hex", chunked(b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-size-negative", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-size-0x", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-size-space-after", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-size-missing", chunked(b"\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-extension-empty", chunked(b"5;\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-extension-space", chunked(b"5; a\r\nhello\r\n0\r\n\r\n"), 400),
    Case("chunk-extension-unclosed-quote", chunked(b'5;a="b\r\nhello\r\n0\r\n\r\n'), 400),
    Case(
        "chunk-line-over-its-limit",
        chunked(padded_chunk_line(MAX_CHUNK_LINE + 1) + b"hello\r\n0\r\n\r\n"),
        400,
    ),
    Case("chunk-data-longer-than-its-size", chunked(b"5\r\nhello!\r\n0\r\n\r\n"), 400),
    Case("bare-lf-after-chunk-size", chunked(b"5\nhello\r\n0\r\n\r\n"), 400),
    Case("bare-lf-after-chunk-data", chunked(b"5\r\nhello\n0\r\n\r\n"), 400),
    Case("bare-lf-in-trailers", chunked(b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n"), 400),
    Case("obs-fold-in-trailers", chunked(b"5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"), 400),
    Case("control-in-trailer", chunked(b"5\r\nhello\r\n0\r\nX-T: a\x01b\r\n\r\n"), 400),
    # Limits.
    Case("head-over-its-limit", padded_head(MAX_HEAD + 1), 431),
    Case(
        "trailers-over-their-limit",
        chunked(b"5\r\nhello\r\n0\r\n" + padded_trailers(MAX_HEAD + 1)),
        431,
    ),
    Case("content-length-over-the-limit", POST + b"Content-Length: 4097\r\n\r\n", 413),
    Case("chunk-over-the-limit", chunked(b"1001\r\n" + b"x" * 100), 413),
    Case(
        "chunks-over-the-limit",
        chunked(b"800\r\n" + b"x" * 0x800 + b"\r\n800\r\n" + b"x" * 0x800 + b"\r\n1\r\n"),
        413,
    ),
]
IDS = [case.name for case in CASES]


def test_the_table_names_are_unique():
    assert len(set(IDS)) == len(IDS)


# Through the connection driver, on a real socket.


async def echo(request: Request) -> Response:
    return Response(200, [("X-Target", request.target)], request.body)


def error_handler(error: GatewayError, request: Request | None) -> Response:
    return Response(status_of(error), [("X-Error", error.code)], error.message.encode())


async def exchange(parser: str, data: bytes) -> bytes:
    """Send `data` to a fresh server; every byte it answers until it closes."""
    settings = HttpSettings(
        max_header_bytes=MAX_HEAD,
        max_request_body=MAX_BODY,
        header_timeout=5.0,
        keepalive_timeout=5.0,
        parser=parser,  # type: ignore[arg-type]
    )
    handler = partial(
        serve_http_connection,
        remote_addr="127.0.0.1",
        settings=settings,
        handler=echo,
        error_handler=error_handler,
    )
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                # Refused and closed, maybe before all of it was sent.
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.send_all(data)
                while True:
                    try:
                        chunk = await client.receive_some(65536)
                    except trio.BrokenResourceError:
                        break  # reset after the answer
                    if not chunk:
                        break
                    received += chunk
            nursery.cancel_scope.cancel()
    return bytes(received)


def answers(wire: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """(status, headers, body) of each answer in `wire`."""
    found = []
    while wire:
        head, separator, wire = wire.partition(b"\r\n\r\n")
        assert separator, f"an incomplete answer: {head!r}"
        status_line, *lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        length = int(headers.get(b"content-length", b"0"))
        found.append((int(status_line.split()[1]), headers, wire[:length]))
        wire = wire[length:]
    return found


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("parser", PARSERS)
async def test_each_request_gets_the_same_answer_from_both_parsers(parser, case):
    replies = answers(await exchange(parser, case.raw + NEXT))
    statuses = [status for status, _, _ in replies]
    if case.closes:
        assert statuses == [case.status]
    else:
        assert statuses == [case.status, 200]
        assert replies[1][1][b"x-target"] == b"/next"
    status, headers, body = replies[0]
    if status == 200:
        assert body == case.body
    else:
        assert headers[b"connection"] == b"close"


# Through the bare parsers: the same events and the same error, whole or byte by byte.


def parse(parser: str, data: bytes, pieces: int | None) -> tuple[list[object], object]:
    """Events and error (type) of `data` fed whole, or in pieces of `pieces` bytes."""
    machine = new_parser(parser, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
    size = pieces or len(data)
    events: list[object] = []
    try:
        for at in range(0, len(data), size):
            machine.receive_data(data[at : at + size])
            while (event := machine.next_event()) is not NEED_DATA:
                events.append(event)
                if event is CONNECTION_CLOSED:
                    return events, None
                if isinstance(event, RequestEnd):
                    head = next(e for e in reversed(events) if isinstance(e, RequestHead))
                    if head.upgrade or not head.keep_alive:
                        return events, None
                    machine.send_response(200, [], b"", close=False)
    except GatewayError as error:
        return events, type(error)
    return events, None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_both_parsers_yield_the_same_events_whole_and_byte_by_byte(case):
    data = case.raw + NEXT
    results = [
        parse(parser, data, pieces) for parser, pieces in itertools.product(PARSERS, (None, 1))
    ]
    assert all(result == results[0] for result in results[1:]), results
    events, error = results[0]
    assert error is ERRORS.get(case.status)
    if case.status == 200:
        bodies = [event.body for event in events if isinstance(event, RequestEnd)]
        assert bodies[0] == case.body

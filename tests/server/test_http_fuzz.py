"""Random bytes in random chunks never crash the connection driver (SPEC 4.3).

Each example runs the real driver on a trio memory stream pair under a mock
clock; the only acceptable outcomes are HTTP answers and a closed stream.
"""

from __future__ import annotations

import logging
from contextlib import suppress

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tlvproxy.errors import GatewayError, status_of
from tlvproxy.server.http_conn import HttpSettings, Request, Response, serve_http_connection

PREFIXES = [
    b"",
    b"GET / HTTP/1.1\r\nHost: a\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
]


async def echo(request: Request) -> Response:
    return Response(200, [("X-Path", request.path.encode("ascii", "replace").decode())], b"")


def error_handler(error: GatewayError, request: Request | None) -> Response:
    return Response(status_of(error), [("X-Error", error.code)], error.message.encode())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def drive(parser: str, chunks: list[bytes]) -> bytes:
    server, client = trio.testing.memory_stream_pair()
    limits = HttpSettings(
        max_header_bytes=256,
        max_request_body=64,
        header_timeout=5.0,
        keepalive_timeout=10.0,
        parser=parser,  # type: ignore[arg-type]
    )
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http_connection, server, "127.0.0.1", limits, echo, error_handler)
        # The driver may close first (after an error answer): sending stops there.
        with suppress(trio.BrokenResourceError):
            for chunk in chunks:
                await client.send_all(chunk)
                await trio.sleep(0.5)
            await client.send_eof()
        while data := await client.receive_some(65536):
            received += data
    return bytes(received)


def answers(wire: bytes) -> list[int]:
    """The statuses of the answers in `wire`, which must be nothing but answers."""
    statuses = []
    while wire:
        head, sep, wire = wire.partition(b"\r\n\r\n")
        assert sep, f"an incomplete answer: {head!r}"
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        length = int(fields.get(b"Content-Length", b"0"))
        assert len(wire) >= length
        wire = wire[length:]
        statuses.append(int(lines[0].split()[1]))
    return statuses


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["h11", "httptools"]),
    st.sampled_from(PREFIXES),
    st.binary(max_size=400),
    st.lists(st.integers(1, 80), min_size=1, max_size=8),
)
def test_random_bytes_in_random_chunks_never_crash_the_driver(parser, prefix, junk, sizes):
    data = prefix + junk
    chunks = []
    for size in sizes:
        if data:
            chunks.append(data[:size])
            data = data[size:]
    if data:
        chunks.append(data)
    records = _Records()
    logger = logging.getLogger("tlvproxy.http")
    logger.addHandler(records)
    try:
        wire = trio.run(drive, parser, chunks, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(records)
    assert records.records == []
    for status in answers(wire):
        assert status in (200, 400, 408, 413, 431)

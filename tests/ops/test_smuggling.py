"""Request smuggling and lenient parsing through a real `tlvproxy serve` process.

Each case is raw bytes on one connection: a request the gateway must refuse
with 400 and `Connection: close`, followed by a second request that must never
be answered (docs/reference.md "Limits"). Run with both HTTP parsers.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import DEADLINE, Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.ops.procs import Gateway

pytestmark = pytest.mark.slow

PARSERS = ["h11", "httptools"]

# The adversarial pass's input: the body hides a second request's head from a
# parser that frames by Content-Length, and ends the chunked body for one that
# frames by Transfer-Encoding.
SMUGGLED = b"0\r\n\r\nGET /v1/users/666/profile HTTP/1.1\r\nX-Ignore: "
CL_TE = (
    b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(SMUGGLED) + SMUGGLED
)
TE_CL = (
    b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n"
)
NEXT = b"GET /v1/users/1/profile HTTP/1.1\r\nHost: gw\r\n\r\n"

CASES = {
    "cl-te": CL_TE,
    "te-cl": TE_CL,
    "http-0.9": b"GET /v1/users/1/profile\r\n\r\n",
    "obs-fold-te": (
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n"
        b"X-A: b\r\n Transfer-Encoding: chunked\r\n\r\n{}"
    ),
    "bare-lf": b"GET /v1/users/1/profile HTTP/1.1\nHost: gw\n\n",
}


@pytest.fixture(scope="module")
def gateways(
    upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Gateway]]:
    """One gateway per parser, shared by the module's tests."""
    started = Processes(tmp_path_factory.mktemp("smuggling"))
    try:
        yield {name: started.gateway(upstream, http_parser=name) for name in PARSERS}
    finally:
        started.close()


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send `data` on a new connection: what the gateway answers, and whether it
    closed the connection (False: it was still open after a quiet second)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        received = bytearray()
        while True:
            sock.settimeout(1.0 if received else DEADLINE)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(received), True
            except TimeoutError:
                return bytes(received), False
            if not chunk:
                return bytes(received), True
            received += chunk


def answers(wire: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(status line, head, body) of each answer in `wire`, framed by Content-Length."""
    found = []
    while wire:
        head, separator, wire = wire.partition(b"\r\n\r\n")
        assert separator, f"an incomplete answer: {head!r}"
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        found.append((head.split(b"\r\n", 1)[0], head, wire[:length]))
        wire = wire[length:]
    return found


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("parser", PARSERS)
def test_a_smuggling_shaped_request_gets_400_and_the_next_is_never_served(
    gateways: dict[str, Gateway], parser: str, case: str
) -> None:
    wire, closed = exchange(gateways[parser].http_port, CASES[case] + NEXT)
    found = answers(wire)
    assert [status for status, _, _ in found] == [b"HTTP/1.1 400 Bad Request"], wire
    [(_, head, body)] = found
    assert b"\r\nConnection: close" in head
    assert b'"code":"bad_request"' in body
    assert closed


@pytest.mark.parametrize("parser", PARSERS)
def test_the_same_connection_serves_a_clean_request_then_the_next(
    gateways: dict[str, Gateway], parser: str
) -> None:
    # The control: well-framed requests on one connection are both answered.
    clean = (
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    last = NEXT.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    wire, closed = exchange(gateways[parser].http_port, clean + last)
    assert [status for status, _, _ in answers(wire)] == [b"HTTP/1.1 200 OK"] * 2
    assert closed

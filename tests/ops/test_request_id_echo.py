"""Header values the gateway echoes never break its answer (issue 16, finding 7;
docs/reference.md "Request ids").

An `X-Request-Id` of `abc\\xe9` is legal obs-text. It used to make the answer
unwritable: the connection closed with no answer and an ERROR traceback. Every
answer of the real `tlvproxy serve`, with both HTTP parsers, must be written,
with header values in printable ASCII, for REST answers, the errors the HTTP
layer answers itself, the WebSocket handshake (101 and its refusals) and the
admin listener; and nothing is logged as an ERROR.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import time
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.ops.procs import Gateway

pytestmark = pytest.mark.slow

NON_ASCII_ID = b"X-Request-Id: abc\xe9\r\n"
_PRINTABLE = re.compile(rb"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_NEW_ID = re.compile(rb"[0-9a-f]{32}")
_KEY = base64.b64encode(os.urandom(16))
_UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"

# name: (listener, request bytes, expected status)
CASES: dict[str, tuple[str, bytes, int]] = {
    "rest_200": ("http", b"GET /v1/users/1/profile HTTP/1.1\r\nHost: x\r\n", 200),
    "rest_404": ("http", b"GET /v1/nowhere HTTP/1.1\r\nHost: x\r\n", 404),
    "rest_post_200": (
        "http",
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n",
        200,
    ),
    "http_400": (
        "http",
        b"GET /v1/users/1/profile HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n",
        400,
    ),
    "http_413": ("http", b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n", 413),
    "http_431": (
        "http",
        b"GET /v1/users/1/profile HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n",
        431,
    ),
    "http_408": ("http", b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n", 408),
    "ws_101": ("http", b"GET /ws?uid=1&did=a HTTP/1.1\r\nHost: x\r\n" + _UPGRADE, 101),
    "ws_404": ("http", b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n" + _UPGRADE, 404),
    "ws_400_version": (
        "http",
        b"GET /ws?uid=1&did=a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 12\r\n",
        400,
    ),
    "ws_403_origin": (
        "http",
        b"GET /ws?uid=1&did=a HTTP/1.1\r\nHost: x\r\nOrigin: https://\xe9vil.example\r\n"
        + _UPGRADE,
        403,
    ),
    "admin_healthz": ("admin", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", 200),
    "admin_404": ("admin", b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n", 404),
    "admin_403_host": ("admin", b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n", 403),
}


def _request(case: str) -> bytes:
    _, head, _ = CASES[case]
    key = b"Sec-WebSocket-Key: " + _KEY + b"\r\n" if case.startswith("ws_") else b""
    if case == "http_408":
        return head + NON_ASCII_ID + b"\r\nab"  # 2 of 10 bytes: the body times out
    if case == "rest_post_200":
        return head + NON_ASCII_ID + b"Connection: close\r\n\r\n{}"
    close = b"" if case.startswith("ws_") else b"Connection: close\r\n"
    return head + NON_ASCII_ID + key + close + b"\r\n"


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data` and read the answer's head (and what came with it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.fixture(scope="module")
def gateways(
    upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Gateway]]:
    started = Processes(tmp_path_factory.mktemp("gateways"))
    try:
        yield {
            parser: started.gateway(
                upstream,
                "--http-parser",
                parser,
                limits={
                    "header_timeout": "1s",
                    "max_request_body": "1 KiB",
                    "max_header_bytes": "1 KiB",
                },
                websocket={"allowed_origins": ["https://ok.example"]},
            )
            for parser in ("h11", "httptools")
        }
    finally:
        started.close()


@pytest.mark.parametrize("parser", ["h11", "httptools"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_non_ascii_request_id_never_breaks_the_answer(
    gateways: dict[str, Gateway], parser: str, case: str
) -> None:
    gateway = gateways[parser]
    listener, _, status = CASES[case]
    port = gateway.http_port if listener == "http" else gateway.admin_port
    answer = _exchange(port, _request(case))
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    lines = head.split(b"\r\n")[1:]
    for line in lines:
        name, _, value = line.partition(b":")
        assert _PRINTABLE.fullmatch(value.strip()), line
        if name.lower() == b"x-request-id":
            # Not the caller's: it cannot go back as it is, so a new one goes.
            assert _NEW_ID.fullmatch(value.strip()), line
    if listener == "http":
        assert any(line.lower().startswith(b"x-request-id:") for line in lines), head
    time.sleep(0.05)  # the log line of a failure is written after the answer
    errors = [line for line in gateway.process.text().splitlines() if '"ERROR"' in line]
    assert not errors, errors[:3]


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_non_ascii_websocket_key_is_refused_with_400(
    gateways: dict[str, Gateway], parser: str
) -> None:
    gateway = gateways[parser]
    request = (
        b"GET /ws?uid=1&did=a HTTP/1.1\r\nHost: x\r\n"
        + _UPGRADE
        + b"Sec-WebSocket-Key: "
        + _KEY[:-2]
        + b"\xe9=\r\n\r\n"
    )
    answer = _exchange(gateway.http_port, request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"Sec-WebSocket-Key" in answer
    time.sleep(0.05)
    errors = [line for line in gateway.process.text().splitlines() if '"ERROR"' in line]
    assert not errors, errors[:3]

"""Passing a push session's connection to the worker that holds the session
(docs/push-sessions.md "Workers"): two workers' `Handoff`s in one process,
real TCP and Unix sockets, and every way a handoff can be malformed."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from tlvproxy.server.admission import Admission, Doorkeeper
from tlvproxy.server.handoff import (
    HANDOFF_TIMEOUT,
    MAX_PENDING,
    Handoff,
    request_bytes,
    socket_path,
)
from tlvproxy.server.http_conn import Request
from tlvproxy.server.parser_choice import new_parser
from tlvproxy.server.parsers import RequestEnd, RequestHead

if TYPE_CHECKING:
    from pathlib import Path


def a_request(**changes: Any) -> Request:
    fields: dict[str, Any] = {
        "method": "POST",
        "target": "/v1/sessions/1-AAAAAAAAAAAAAAAAAAAAAA/messages?x=%20",
        "path": "/v1/sessions/1-AAAAAAAAAAAAAAAAAAAAAA/messages",
        "query_string": "x=%20",
        "headers": (
            ("host", "gw.test"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("x-note", "caf\xe9"),
        ),
        "body": b'{"cmd": "echo", "seq": 1}',
        "http_version": "1.1",
        "remote_addr": "192.0.2.7",
        "received_at": 0.0,
    }
    fields.update(changes)
    return Request(**fields)


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_request_written_again_reads_as_the_same_request(parser: str) -> None:
    request = a_request()
    reader = new_parser(parser, max_header_bytes=16384, max_body=1 << 20)
    reader.receive_data(request_bytes(request) + b"GET /next")
    head = reader.next_event()
    end = reader.next_event()
    assert isinstance(head, RequestHead)
    assert isinstance(end, RequestEnd)
    assert (head.method, head.target) == (request.method, request.target)
    headers = dict(head.headers)
    assert headers["x-note"] == "caf\xe9"  # the bytes received, latin-1 both ways
    assert "transfer-encoding" not in headers
    assert "expect" not in headers
    assert headers["content-length"] == str(len(request.body))
    assert end.body == request.body
    assert reader.trailing_data() == b"GET /next"  # what followed it


def parsed(parser: str, data: bytes, max_header_bytes: int) -> Request:
    """The request `data` begins with, as a worker's parser with
    `max_header_bytes` reads it (one that is too large raises)."""
    reader = new_parser(parser, max_header_bytes=max_header_bytes, max_body=1 << 20)
    reader.receive_data(data)
    head = reader.next_event()
    end = reader.next_event()
    assert isinstance(head, RequestHead), head
    assert isinstance(end, RequestEnd), end
    path, _, query = head.target.partition("?")
    return a_request(
        method=head.method,
        target=head.target,
        path=path,
        query_string=query,
        headers=head.headers,
        body=end.body,
    )


@pytest.mark.parametrize("parser", ["h11", "httptools"])
@pytest.mark.parametrize(
    "framing",
    [
        b"",
        b"Content-Length:2\r\n",
        b"Transfer-Encoding:chunked\r\n",
        b"Content-Length:0\r\nExpect:100-continue\r\n",
    ],
)
def test_a_request_written_again_is_no_larger_than_it_came(parser: str, framing: bytes) -> None:
    # Written tightly (no space after the colons), up to the worker's limit:
    # written again, the owner's parser with the same limit must take it.
    chunked = b"chunked" in framing
    body = b"2\r\n{}\r\n0\r\n\r\n" if chunked else b"{}" if b":2" in framing else b""
    method = b"GET" if not body else b"POST"
    head = method + b" /v1/sessions/1-AAAAAAAAAAAAAAAAAAAAAA/poll?after=0 HTTP/1.1\r\n"
    head += b"Host:gw\r\n" + framing
    n = 0
    while len(head) < 4000:
        head += b"X-%d:v\r\n" % n
        n += 1
    head += b"\r\n"
    request = parsed(parser, head + body, len(head))
    again = parsed(parser, request_bytes(request), len(head))
    framing_names = {"content-length", "transfer-encoding", "expect"}
    assert [h for h in again.headers if h[0] not in framing_names] == [
        h for h in request.headers if h[0] not in framing_names
    ]
    assert again.body == request.body


class Owner:
    """Worker 1: its `Handoff` serving, and what it was handed."""

    def __init__(self, directory: Path) -> None:
        self.handoff = Handoff(directory, 1, Admission(budget=1000))
        self.received: list[tuple[str, bytes]] = []
        self.handed = trio.Event()

    async def accept(self, stream: trio.SocketStream, peer: str, data: bytes) -> None:
        self.received.append((peer, data))
        self.handed.set()
        async with stream:
            await stream.send_all(b"answered by worker 1: " + data[:4])
            assert await stream.receive_some(100) == b"more"


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A client's stream and the gateway's end of it, over real TCP."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    assert isinstance(server, trio.SocketStream)
    return client, server


async def test_a_connection_goes_to_its_owner_with_the_bytes_read(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    owner = Owner(tmp_path)
    await nursery.start(
        owner.handoff.serve, nursery, Doorkeeper(nursery), owner.accept, lambda: 1 << 20
    )
    client, server = await tcp_pair()
    request = a_request()
    sender = Handoff(tmp_path, 0, Admission(budget=1000))
    async with client:
        async with server:
            await sender.handler(1, "r1")(request, server, b"GET /x")
        # This worker closed its end; the owner's copy of the socket serves on.
        assert await client.receive_some(100) == b"answered by worker 1: POST"
        await client.send_all(b"more")
    await owner.handed.wait()
    assert owner.received == [("192.0.2.7", request_bytes(request) + b"GET /x")]


class Relayed(trio.abc.Stream):
    """A stream that is not a socket's, as a TLS stream is not."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_stream_that_is_not_a_socket_is_relayed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    owner = Owner(tmp_path)
    await nursery.start(
        owner.handoff.serve, nursery, Doorkeeper(nursery), owner.accept, lambda: 1 << 20
    )
    client, server = await tcp_pair()
    request = a_request(body=b"{}")
    async with client:

        async def gateway_side() -> None:
            async with Relayed(server) as stream:
                await Handoff(tmp_path, 0, Admission(budget=1000)).handler(1, "r1")(
                    request, stream, b""
                )

        async with trio.open_nursery() as inner:
            inner.start_soon(gateway_side)
            answer = b""
            while len(answer) < 26:
                answer += await client.receive_some(100)
            assert answer == b"answered by worker 1: POST"
            await client.send_all(b"more")  # relayed to the owner, which then closes
            assert await client.receive_some(100) == b""  # the relay ends with it
    assert owner.received == [("192.0.2.7", request_bytes(request))]


async def read_answer(client: trio.SocketStream) -> tuple[int, dict[str, Any]]:
    data = b""
    while chunk := await client.receive_some(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def test_a_session_of_a_worker_not_running_is_not_found(tmp_path: Path) -> None:
    client, server = await tcp_pair()
    async with client:
        async with server:
            await Handoff(tmp_path, 0, Admission(budget=1000)).handler(3, "r9")(
                a_request(), server, b""
            )
        status, body = await read_answer(client)
    assert status == 404
    assert body["error"]["code"] == "session_not_found"
    assert body["error"]["request_id"] == "r9"


async def test_too_many_bytes_past_the_request_are_refused(tmp_path: Path) -> None:
    client, server = await tcp_pair()
    async with client:
        async with server:
            await Handoff(tmp_path, 0, Admission(budget=1000)).handler(1, "r2")(
                a_request(), server, b"x" * 300_000
            )
        status, body = await read_answer(client)
    assert (status, body["error"]["code"]) == (503, "overloaded")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


HEAD = struct.Struct("!4sHId")  # magic, peer length, request length, the sender's deadline
LATER = time.monotonic() + 3600


def rights(*descriptors: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", descriptors).tobytes())]


async def not_taken(sock: trio.socket.SocketType) -> bool:
    """True when the owner closes without saying it took the connection (a
    close with bytes left unread resets it)."""
    try:
        return await sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def test_malformed_handoffs_are_dropped_and_their_descriptors_closed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    owner = Owner(tmp_path)
    await nursery.start(
        owner.handoff.serve, nursery, Doorkeeper(nursery), owner.accept, lambda: 1000
    )
    path = str(socket_path(tmp_path, 1))
    pipe_read, pipe_write = os.pipe()
    victims = [socket.socket() for _ in range(3)]
    head = HEAD.pack(b"TLVH", 9, 3, LATER) + b"192.0.2.1"
    stale = HEAD.pack(b"TLVH", 9, 3, time.monotonic() - 1) + b"192.0.2.1"
    cases: list[tuple[bytes, list[tuple[int, int, bytes]]]] = [
        (b"no descriptor at all", []),
        (HEAD.pack(b"NOPE", 9, 3, LATER) + b"192.0.2.1abc", rights(victims[0].fileno())),
        (head + b"abc", rights(victims[1].fileno(), victims[2].fileno())),
        (head + b"abc", rights(pipe_read)),
        (HEAD.pack(b"TLVH", 9, 1001, LATER) + b"192.0.2.1", rights(victims[0].fileno())),
        (HEAD.pack(b"TLVH", 200, 3, LATER), rights(victims[0].fileno())),
        (head + b"a", rights(victims[0].fileno())),  # ends early
        (stale + b"abc", rights(victims[0].fileno())),  # the sender stopped waiting
    ]
    before = open_descriptors()
    for data, ancillary in cases:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.connect(path)
            await sock.sendmsg([data], ancillary)
            sock.shutdown(socket.SHUT_WR)  # a handoff that ends early ends here
            assert await not_taken(sock)
        await trio.testing.wait_all_tasks_blocked()
    assert open_descriptors() == before  # every descriptor received was closed
    assert owner.received == []
    for victim in victims:
        victim.close()
    os.close(pipe_read)
    os.close(pipe_write)
    # The listener still takes a good one.
    client, server = await tcp_pair()
    async with client:
        async with server:
            await Handoff(tmp_path, 0, Admission(budget=1000)).handler(1, "r3")(
                a_request(body=b""), server, b""
            )
        assert await client.receive_some(100) == b"answered by worker 1: POST"
        await client.send_all(b"more")
    await owner.handed.wait()


async def test_a_handoff_that_stalls_is_dropped_and_pending_ones_are_bounded(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: Any
) -> None:
    owner = Owner(tmp_path)
    await nursery.start(
        owner.handoff.serve, nursery, Doorkeeper(nursery), owner.accept, lambda: 1000
    )
    path = str(socket_path(tmp_path, 1))
    stalled = []
    for _ in range(MAX_PENDING):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        stalled.append(sock)
    await trio.testing.wait_all_tasks_blocked()
    # One more than MAX_PENDING: closed at once.
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
        await extra.connect(path)
        with trio.fail_after(1):
            assert await extra.recv(1) == b""
    # The stalled ones end after HANDOFF_TIMEOUT.
    began = trio.current_time()
    for sock in stalled:
        assert await sock.recv(1) == b""
        sock.close()
    assert trio.current_time() - began == pytest.approx(HANDOFF_TIMEOUT, abs=0.1)


async def test_an_owner_with_too_many_handoffs_under_way_leaves_the_answer_to_the_sender(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    owner = Owner(tmp_path)
    await nursery.start(
        owner.handoff.serve, nursery, Doorkeeper(nursery), owner.accept, lambda: 1 << 20
    )
    path = str(socket_path(tmp_path, 1))
    stalled = []
    for _ in range(MAX_PENDING):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        stalled.append(sock)
    await trio.testing.wait_all_tasks_blocked()
    client, server = await tcp_pair()
    async with client:
        async with server:
            await Handoff(tmp_path, 0, Admission(budget=1000)).handler(1, "r4")(
                a_request(), server, b""
            )
        status, body = await read_answer(client)
    assert (status, body["error"]["code"]) == (503, "overloaded")
    assert owner.received == []
    for sock in stalled:
        sock.close()


async def test_a_runtime_directory_too_long_for_a_socket_address_works(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    directory = tmp_path / ("a-long-temporary-directory-" * 4)
    directory.mkdir()
    assert len(str(socket_path(directory, 1))) > 108  # beyond sun_path
    owner = Owner(directory)
    await nursery.start(
        owner.handoff.serve, nursery, Doorkeeper(nursery), owner.accept, lambda: 1 << 20
    )
    assert socket_path(directory, 1).exists()
    client, server = await tcp_pair()
    async with client:
        async with server:
            await Handoff(directory, 0, Admission(budget=1000)).handler(1, "r5")(
                a_request(), server, b""
            )
        assert await client.receive_some(100) == b"answered by worker 1: POST"
        await client.send_all(b"more")
    await owner.handed.wait()

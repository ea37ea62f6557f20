"""One multiplexed connection against a raw TLV server on a real socket."""

from __future__ import annotations

import math
import random
import socket
import struct
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
from rawtlv import HEADER, PushLog, RawConn, RawUpstream, Request, echo, pack

from tlvproxy.errors import BadRequest, PayloadTooLarge, UpstreamProtocolError
from tlvproxy.framing import HeaderField, HeaderLayout, default_layout
from tlvproxy.metrics import Metrics
from tlvproxy.upstream.connection import Connection, ConnectionLost, Sender, SendFailed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def connected(
    upstream: RawUpstream,
    layout: HeaderLayout | None = None,
    *,
    metrics: Metrics | None = None,
    max_in_flight: int = 1024,
    receiver: PushLog | None = None,
) -> AsyncIterator[Connection]:
    stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
    conn = Connection(
        stream,
        layout or default_layout(),
        metrics or Metrics(),
        node=upstream.address,
        max_in_flight=max_in_flight,
        receiver=receiver,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        yield conn
        conn.close(SendFailed("the test is over"))


async def test_request_gets_its_response(start_upstream) -> None:
    upstream = await start_upstream()
    async with connected(upstream) as conn:
        frame = await conn.request(0x1001, b"hello", uid=42)
    assert (frame.command, frame.uid, frame.body, frame.status, frame.flags) == (
        0x1001,
        42,
        b"hello",
        0,
        1,
    )
    assert upstream.requests[0] == Request(0, 0x1001, frame.seq, 42, b"hello")


async def test_out_of_order_answers_reach_their_own_requests(start_upstream) -> None:
    batch: list[tuple[RawConn, Request]] = []
    full = trio.Event()

    async def hold_then_reverse(conn: RawConn, request: Request) -> None:
        batch.append((conn, request))
        if len(batch) == 50:
            full.set()
        await full.wait()
        if request is batch[0][1]:
            # One write, answers in reverse order of the requests.
            await conn.send(b"".join(pack(r.command, r.seq, r.body) for _, r in reversed(batch)))

    upstream = await start_upstream(hold_then_reverse)
    answers: dict[int, bytes] = {}
    async with connected(upstream) as conn:

        async def one(i: int) -> None:
            answers[i] = (await conn.request(0x1003, b"req-%d" % i)).body

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert answers == {i: b"req-%d" % i for i in range(50)}


async def test_ten_thousand_concurrent_requests_on_one_connection(start_upstream) -> None:
    async def shuffled_echo(conn: RawConn, request: Request) -> None:
        # Yield a random number of times so answers interleave out of order.
        for _ in range(random.randrange(3)):
            await trio.lowlevel.checkpoint()
        await conn.answer(request)

    upstream = await start_upstream(shuffled_echo)
    answers: dict[int, bytes] = {}
    async with connected(upstream, max_in_flight=10_000) as conn:

        async def one(i: int) -> None:
            answers[i] = (await conn.request(0x1003, i.to_bytes(4, "big"), uid=i)).body

        async with trio.open_nursery() as nursery:
            for i in range(10_000):
                nursery.start_soon(one, i)
        assert conn.in_flight == 0
    assert len(upstream.conns) == 1
    assert answers == {i: i.to_bytes(4, "big") for i in range(10_000)}
    assert len({r.seq for r in upstream.requests}) == 10_000


async def test_timeout_leaves_no_waiter_and_a_late_answer_is_counted(start_upstream) -> None:
    late: list[tuple[RawConn, Request]] = []

    async def never(conn: RawConn, request: Request) -> None:
        late.append((conn, request))

    upstream = await start_upstream(never)
    metrics = Metrics()
    async with connected(upstream, metrics=metrics) as conn:
        with trio.move_on_after(0.05) as scope:
            await conn.request(0x1001, b"slow")
        assert scope.cancelled_caught
        assert conn.in_flight == 0
        # The answer comes after the caller gave up: dropped and counted.
        raw, request = late[0]
        await raw.answer(request)
        upstream.respond = echo
        frame = await conn.request(0x1001, b"next")  # the same connection still works
    assert frame.body == b"next"
    assert sample(metrics, "tlvproxy_frames_rejected_total", reason="unknown_seq") == 1


async def test_eof_fails_every_waiter_at_once(start_upstream) -> None:
    arrived: list[Request] = []

    async def close_after_three(conn: RawConn, request: Request) -> None:
        arrived.append(request)
        if len(arrived) == 3:
            await conn.stream.aclose()

    upstream = await start_upstream(close_after_three)
    errors: list[Exception] = []
    async with connected(upstream) as conn:

        async def one() -> None:
            try:
                await conn.request(0x1001, b"x")
            except ConnectionLost as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        await conn.closed.wait()
        assert conn.broken
        assert conn.in_flight == 0
        with pytest.raises(SendFailed, match="connection is closed"):
            await conn.request(0x1001, b"after")
    assert len(errors) == 3
    assert all("connection lost before the response" in e.message for e in errors)


async def test_idle_eof_is_not_a_node_failure(start_upstream) -> None:
    async def ignore(conn: RawConn, request: Request) -> None:
        pass

    upstream = await start_upstream(ignore)
    async with connected(upstream) as conn:
        await trio.testing.wait_all_tasks_blocked()
        await upstream.conns[0].stream.aclose()
        await conn.closed.wait()
        assert not conn.broken
        assert isinstance(conn.error, ConnectionLost)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\x07" + bytes(21), "bad_start_byte"),
        (pack(0x1001, 1, b"abc")[:-1] + b"\x0b", "bad_end_byte"),
        (b"\x09" + HEADER.pack(1, 1, 0x1001, 1, 0, 2**31, 0, 0), "body_too_large"),
    ],
)
async def test_malformed_frame_closes_that_connection_only(
    start_upstream, garbage: bytes, reason: str
) -> None:
    async def poison(conn: RawConn, request: Request) -> None:
        if request.body == b"poison":
            await conn.send(garbage)
        elif request.body == b"wait":
            return
        else:
            await conn.answer(request)

    upstream = await start_upstream(poison)
    metrics = Metrics()
    async with connected(upstream, metrics=metrics) as bad, connected(upstream) as good:
        results: list[Exception] = []

        async def waiting() -> None:
            try:
                await bad.request(0x1001, b"wait")
            except UpstreamProtocolError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(UpstreamProtocolError, match="malformed frame"):
                await bad.request(0x1001, b"poison")
        assert len(results) == 1
        assert bad.error is not None
        assert bad.broken
        assert (await good.request(0x1001, b"fine")).body == b"fine"
    assert sample(metrics, "tlvproxy_frames_rejected_total", reason=reason) == 1


async def test_seq_wraps_at_the_layout_maximum_and_skips_seqs_in_flight(start_upstream) -> None:
    held: list[tuple[RawConn, Request]] = []

    async def hold_first(conn: RawConn, request: Request) -> None:
        if request.body == b"hold":
            held.append((conn, request))
        else:
            await conn.answer(request)

    layout = HeaderLayout(
        fields=(
            HeaderField(name="version", type="u8", value=1),
            HeaderField(name="flags", type="u8"),
            HeaderField(name="command", type="u16"),
            HeaderField(name="seq", type="u8"),
            HeaderField(name="uid", type="u32"),
            HeaderField(name="length", type="u32"),
            HeaderField(name="status", type="u16"),
            HeaderField(name="reserved", type="u16"),
        )
    )
    # A server for this layout: the seq is one byte, the rest as the default header.
    small = struct.Struct(">BBHBIIHH")

    async def serve(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async for chunk in stream:
            buffer += chunk
            while len(buffer) >= 1 + small.size + 1:
                _, _flags, command, seq, uid, length, _, _ = small.unpack_from(buffer, 1)
                end = 1 + small.size + length + 1
                if len(buffer) < end:
                    break
                body = bytes(buffer[1 + small.size : end - 1])
                del buffer[:end]
                seqs.append(seq)
                if body != b"hold":
                    reply = small.pack(1, 1, command, seq, uid, len(body), 0, 0)
                    await stream.send_all(b"\x09" + reply + body + b"\x0a")

    seqs: list[int] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = Connection(stream, layout, Metrics(), node="small", max_in_flight=10_000)
        assert conn.max_in_flight == 256  # the seq space bounds it
        nursery.start_soon(conn.run)
        # Seq 1 stays in flight while 600 more requests wrap around it twice.
        async with trio.open_nursery() as holder:
            holder.start_soon(conn.request, 0x1001, b"hold")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(600):
                assert (await conn.request(0x1001, b"%d" % i)).body == b"%d" % i
            holder.cancel_scope.cancel()
        conn.close(SendFailed("done"))
        nursery.cancel_scope.cancel()
    assert seqs[0] == 1
    assert 1 not in seqs[1:]
    assert seqs[1:4] == [2, 3, 4]
    assert max(seqs) == 255
    assert seqs.count(0) == 2


async def test_in_flight_cap_refuses_before_sending(start_upstream) -> None:
    async def ignore(conn: RawConn, request: Request) -> None:
        pass

    upstream = await start_upstream(ignore)
    async with connected(upstream, max_in_flight=2) as conn, trio.open_nursery() as nursery:
        nursery.start_soon(conn.request, 0x1001, b"a")
        nursery.start_soon(conn.request, 0x1001, b"b")
        await trio.testing.wait_all_tasks_blocked()
        assert not conn.usable
        with pytest.raises(SendFailed, match="2 requests already in flight"):
            await conn.request(0x1001, b"c")
        nursery.cancel_scope.cancel()
    assert len(upstream.requests) == 2


async def test_requests_that_do_not_fit_a_frame_are_refused(start_upstream) -> None:
    upstream = await start_upstream()
    async with connected(upstream, default_layout(max_body=8)) as conn:
        with pytest.raises(PayloadTooLarge, match="over the upstream frame limit of 8 bytes"):
            await conn.request(0x1001, b"123456789")
        with pytest.raises(BadRequest, match="does not fit the frame header"):
            await conn.request(0x1001, b"x", uid=2**32)
        assert conn.in_flight == 0
        assert (await conn.request(0x1001, b"ok")).body == b"ok"
    assert [r.body for r in upstream.requests] == [b"ok"]


async def test_push_frames_go_to_the_push_receiver(start_upstream) -> None:
    async def answer_and_push(conn: RawConn, request: Request) -> None:
        await conn.send(pack(0x2001, 0, b"push-1", uid=7, flags=2))
        await conn.answer(request)

    upstream = await start_upstream(answer_and_push)
    pushes = PushLog()
    async with connected(upstream, receiver=pushes) as conn:
        assert (await conn.request(0x1001, b"hi")).body == b"hi"
        [push] = pushes.frames  # delivered before the answer that followed it
        assert (push.command, push.body, push.uid, push.is_push) == (0x2001, b"push-1", 7, True)
    # The receiver hears of the end, once, with the reason.
    assert pushes.ended.is_set()
    assert isinstance(pushes.error, SendFailed)


async def test_a_push_without_a_receiver_is_counted_and_dropped(start_upstream) -> None:
    async def answer_and_push(conn: RawConn, request: Request) -> None:
        await conn.send(pack(0x2001, 0, b"push", flags=2))
        await conn.answer(request)

    upstream = await start_upstream(answer_and_push)
    metrics = Metrics()
    async with connected(upstream, metrics=metrics) as conn:
        assert (await conn.request(0x1001, b"hi")).body == b"hi"
    assert sample(metrics, "tlvproxy_frames_rejected_total", reason="unexpected_push") == 1


async def test_without_a_flags_field_an_unmatched_seq_is_a_push() -> None:
    # SPEC 1: no flags field -> a frame whose seq is in flight is its response, any
    # other frame a push; no status field -> status 0.
    layout = HeaderLayout(
        fields=(
            HeaderField(name="command", type="u16"),
            HeaderField(name="seq", type="u32"),
            HeaderField(name="length", type="u32"),
        ),
        byte_order="little",
    )
    bare = struct.Struct("<HII")

    async def serve(stream: trio.SocketStream) -> None:
        data = await stream.receive_some()
        command, seq, length = bare.unpack_from(data, 1)
        body = data[1 + bare.size : 1 + bare.size + length]
        push = b"\x09" + bare.pack(0x2001, seq + 1000, 4) + b"ping" + b"\x0a"
        reply = b"\x09" + bare.pack(command, seq, len(body)) + body + b"\x0a"
        await stream.send_all(push + reply)
        await trio.sleep_forever()

    pushes = PushLog()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = Connection(stream, layout, Metrics(), node="bare", max_in_flight=8, receiver=pushes)
        nursery.start_soon(conn.run)
        reply = await conn.request(0x1001, b"body")
        push = await pushes.next()
        conn.close(SendFailed("done"))
        nursery.cancel_scope.cancel()
    assert (reply.command, reply.body, reply.status) == (0x1001, b"body", 0)
    assert (push.command, push.body) == (0x2001, b"ping")


async def test_close_fails_sent_requests_as_lost(start_upstream) -> None:
    async def ignore(conn: RawConn, request: Request) -> None:
        pass

    upstream = await start_upstream(ignore)
    async with connected(upstream) as conn, trio.open_nursery() as nursery:

        async def close_when_sent() -> None:
            while not upstream.requests:
                await trio.testing.wait_all_tasks_blocked()
            conn.close(SendFailed("closed by the test"))

        nursery.start_soon(close_when_sent)
        # Its bytes reached the node, so it is lost, not "never sent": no blind retry.
        with pytest.raises(ConnectionLost, match="lost before the response"):
            await conn.request(0x1001, b"x")


class Answers:
    """A `Waiter` that keeps what it hears."""

    deadline = math.inf

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.errors: list[GatewayError] = []

    def on_response(self, frame: Frame) -> None:
        self.frames.append(frame)

    def on_error(self, error: GatewayError) -> None:
        self.errors.append(error)

    def on_timeout(self) -> None:
        raise AssertionError("no deadline was set")


@asynccontextmanager
async def raw_peer(
    receive_buffer: int | None = None,
) -> AsyncIterator[tuple[trio.SocketStream, socket.socket]]:
    """A connected stream for a Connection, and the other end's socket, which
    the test reads itself (non-blocking) when it wants to."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        if receive_buffer is not None:
            # Before the connection exists: the accepted socket inherits it.
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        stream = await trio.open_tcp_stream("127.0.0.1", server.getsockname()[1])
        peer, _ = server.accept()
    with peer:
        peer.setblocking(False)
        yield stream, peer


async def read_requests(peer: socket.socket, count: int) -> list[Request]:
    """The next `count` request frames that reach `peer`, waited for."""
    buffer = bytearray()
    requests: list[Request] = []
    while len(requests) < count:
        await trio.lowlevel.wait_readable(peer)
        buffer += peer.recv(1 << 20)
        while len(buffer) >= 22:
            _, flags, command, seq, uid, length, _, _ = HEADER.unpack_from(buffer, 1)
            if len(buffer) < 22 + length:
                break
            requests.append(Request(flags, command, seq, uid, bytes(buffer[21 : 21 + length])))
            del buffer[: 22 + length]
    assert not buffer
    return requests


async def test_frames_queued_in_a_pass_leave_once_it_is_over() -> None:
    sender = Sender()
    answers = Answers()
    async with (
        raw_peer() as (stream_a, peer_a),
        raw_peer() as (stream_b, peer_b),
        trio.open_nursery() as nursery,
    ):
        await nursery.start(sender.run)
        conns = [
            Connection(
                stream, default_layout(), Metrics(), node="n", max_in_flight=64, sender=sender
            )
            for stream in (stream_a, stream_b)
        ]
        for conn in conns:
            await nursery.start(conn.run)
        for i in range(3):
            for conn in conns:
                conn.submit(answers, 0x1003, b"pass-%d" % i)
        for peer in (peer_a, peer_b):
            with pytest.raises(BlockingIOError):
                peer.recv(1 << 20)  # nothing is written while the pass goes on
        for peer in (peer_a, peer_b):
            bodies = [request.body for request in await read_requests(peer, 3)]
            assert bodies == [b"pass-0", b"pass-1", b"pass-2"]
        # Twenty frames in one pass, more than the sixteen written before the
        # pass ends: every one arrives whole, in order.
        for i in range(20):
            conns[0].submit(answers, 0x1003, b"long-%d" % i)
        bodies = [request.body for request in await read_requests(peer_a, 20)]
        assert bodies == [b"long-%d" % i for i in range(20)]
        assert answers.errors == []
        nursery.cancel_scope.cancel()


async def test_frames_queued_while_the_socket_is_full_follow_in_their_order() -> None:
    body = bytes(16384)
    answers = Answers()
    async with raw_peer(receive_buffer=4096) as (stream, peer), trio.open_nursery() as nursery:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn = Connection(stream, default_layout(), Metrics(), node="n", max_in_flight=256)
        await nursery.start(conn.run)
        for i in range(40):
            conn.submit(answers, 0x1003, i.to_bytes(2, "big") + body)
        await trio.sleep(0.05)
        assert conn._sending  # the socket pushed back: the writer has the rest
        for i in range(40, 60):
            conn.submit(answers, 0x1003, i.to_bytes(2, "big") + body)
        requests = await read_requests(peer, 60)
        assert answers.errors == []
        nursery.cancel_scope.cancel()
    assert [int.from_bytes(request.body[:2], "big") for request in requests] == list(range(60))
    assert all(request.body[2:] == body for request in requests)

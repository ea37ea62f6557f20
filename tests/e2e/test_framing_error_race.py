"""A framing error on a pooled upstream connection, seen through the gateway (SPEC 4.5).

A connection being torn down (here after a malformed frame) must never make a
request fail while the node can be reached: a request made once the breakage is
known goes on another connection, a new one if needed. Only the requests already
sent on the broken connection may fail (502).
"""

from __future__ import annotations

import json
import os
from typing import Any

import h11
import trio

from tests.e2e.client import Answer, HttpClient, fetch
from tests.e2e.conftest import GatewayFactory
from tests.upstream.rawtlv import RawConn, RawUpstream, Request


class BadCatcher:
    """Echoes, except a request whose body says "bad": `bad` is set with its connection,
    which the test then answers with bytes that are no frame."""

    def __init__(self) -> None:
        self.bad = trio.Event()
        self.conn: RawConn | None = None

    async def __call__(self, conn: RawConn, request: Request) -> None:
        if b"bad" in request.body:
            self.conn = conn
            self.bad.set()
        else:
            await conn.answer(request)


def echo_request(conn: h11.Connection, body: dict[str, Any]) -> bytes:
    """The bytes of POST /v1/echo with `body`, for a keep-alive connection idle now."""
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    data = json.dumps(body).encode()
    headers = [("Host", "gateway.test"), ("Content-Length", str(len(data)))]
    wire = conn.send(h11.Request(method="POST", target="/v1/echo", headers=headers))
    return wire + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())


async def test_a_request_arriving_while_a_broken_connection_is_torn_down_succeeds(
    tmp_path, parser, nursery
) -> None:
    """Pins a race in the pool: a connection broken by a malformed frame stayed among
    the node's live connections until its teardown ended, so with `connections: 1` a
    request arriving then got 502 "every connection has N requests in flight".

    Request A gets a malformed answer; request B's bytes reach the gateway `passes`
    scheduler passes after the malformed bytes (always after the framing error is
    detected). The offsets cover the teardown window whatever the HTTP path's length.
    """
    catcher = BadCatcher()
    upstream = RawUpstream(catcher)
    await nursery.start(upstream.serve)
    gateways = GatewayFactory(tmp_path, upstream.address, parser, nursery)
    gateway = await gateways.start(upstreams={"im": {"connections": 1}})
    b = await HttpClient.connect(gateway.http_address)
    for passes in range(1, 9):
        catcher.bad = trio.Event()
        a_answers = []

        async def ask_a(a_answers: list[Answer] = a_answers) -> None:
            a_answers.append(await fetch(gateway.http_address, "POST", "/v1/echo", {"bad": 1}))

        async with trio.open_nursery() as requests:
            requests.start_soon(ask_a)
            await catcher.bad.wait()
            assert catcher.conn is not None
            os.write(catcher.conn.stream.socket.fileno(), b"\x07not a frame")
            for _ in range(passes):
                await trio.lowlevel.cancel_shielded_checkpoint()
            os.write(b.stream.socket.fileno(), echo_request(b.conn, {"n": passes}))
            answer = await b._read_answer()
        assert (passes, answer.status) == (passes, 200), answer.body
        assert answer.json() == {"n": passes}
        [a_answer] = a_answers
        assert (a_answer.status, a_answer.json()["error"]["code"]) == (
            502,
            "upstream_protocol_error",
        )

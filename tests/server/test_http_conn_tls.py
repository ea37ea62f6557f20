"""The HTTP/1.1 connection driver over TLS (trio.SSLStream on real sockets), with both parsers."""

from __future__ import annotations

import ssl
from functools import partial

import pytest
import trio
import trustme

from tests.server.test_http_conn import Client, echo, error_handler, get, post
from tlvproxy.server.http_conn import _LINGER_TIMEOUT, serve_http_connection


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


async def serve_tls(ca, settings, *, task_status=trio.TASK_STATUS_IGNORED):
    """A TLS server on 127.0.0.1:0 serving `echo`; starts with its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)

    async def on_connection(stream):
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        await serve_http_connection(tls, "127.0.0.1", settings, echo, error_handler)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(on_connection, listeners)


async def tls_client(ca, port) -> Client:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    # As HTTPS clients do, the end of the TCP connection ends TLS too.
    tls = trio.SSLStream(stream, context, server_hostname="localhost", https_compatible=True)
    return Client(tls)


async def test_keep_alive_and_pipelining_over_tls(ca, settings):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_tls, ca, settings))
        client = await tls_client(ca, port)
        await client.send(post("/a", b"one") + post("/b", b"two"))
        first, second = await client.reply(), await client.reply()
        assert (first.status, first.body) == (200, b"one")
        assert (second.status, second.body) == (200, b"two")
        nursery.cancel_scope.cancel()


async def test_the_connection_ends_right_after_a_closing_answer(ca, settings):
    # A client that reads until the connection ends (HTTP/1.0 style) must not
    # wait out the linger that follows the last answer: the end of the
    # connection is sent with the answer, and only reading lingers.
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_tls, ca, settings))
        client = await tls_client(ca, port)
        await client.send(get("/x", "Connection: close"))
        with trio.fail_after(_LINGER_TIMEOUT / 2):
            reply = await client.reply()
            assert reply is not None
            assert reply.headers["connection"] == "close"
            assert await client.closed()
        nursery.cancel_scope.cancel()

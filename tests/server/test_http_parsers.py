"""The sans-I/O parser seam: h11 and httptools give the same events, errors and bytes."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlvproxy.errors import BadRequest, GatewayError, HeadersTooLarge, PayloadTooLarge
from tlvproxy.server.parser_choice import new_parser, resolve_parser_name
from tlvproxy.server.parsers import (
    CONNECTION_CLOSED,
    NEED_DATA,
    InvalidResponse,
    RequestEnd,
    RequestHead,
    split_target,
)

PARSERS = ["h11", "httptools"]
MAX_HEAD = 1024
MAX_BODY = 2048


def run(name, data: bytes, cuts=(), *, eof=False):
    """Feed `data` cut at `cuts`; the events (answered with 200s) and the error, if any."""
    parser = new_parser(name, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    if eof:
        pieces.append(b"")
    events: list[object] = []
    try:
        for piece in pieces:
            parser.receive_data(piece)
            while (event := parser.next_event()) is not NEED_DATA:
                events.append(event)
                if event is CONNECTION_CLOSED:
                    return events, None
                if isinstance(event, RequestEnd):
                    head = next(e for e in reversed(events) if isinstance(e, RequestHead))
                    if head.upgrade:
                        return [*events, ("trailing", parser.trailing_data())], None
                    close = not head.keep_alive
                    events.append(parser.send_response(200, [("X-N", "1")], b"ok", close=close))
                    if close:
                        return events, None
    except GatewayError as error:
        # A dead parser keeps raising the same kind of error.
        with pytest.raises(type(error)):
            parser.next_event()
        return events, type(error)
    return events, None


@pytest.mark.parametrize("name", PARSERS)
def test_pipelined_requests_one_byte_at_a_time(name):
    data = (
        b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n\r\n\r\n4\r\n\r\n\r\n\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    whole = run(name, data)
    assert run(name, data, range(len(data))) == whole
    events, error = whole
    assert error is None
    heads = [e for e in events if isinstance(e, RequestHead)]
    bodies = [e.body for e in events if isinstance(e, RequestEnd)]
    assert [(h.method, h.target) for h in heads] == [
        ("GET", "/a?x=1"),
        ("POST", "/b"),
        ("PUT", "/c"),
    ]
    assert bodies == [b"", b"abc", b"\r\n\r\n\r\n"]
    assert heads[2].headers == (("host", "h"), ("transfer-encoding", "chunked"))


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"garbage\r\n\r\n", BadRequest),
        (b"GET / HTTP/1.1\r\n\r\n", BadRequest),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", BadRequest),
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", BadRequest),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            BadRequest,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", BadRequest),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", BadRequest),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * MAX_HEAD + b"\r\n\r\n", HeadersTooLarge),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * MAX_HEAD, HeadersTooLarge),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2049\r\n\r\n", PayloadTooLarge),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n"
            + b"x" * 0x400
            + b"\r\n"
            + b"401\r\n"
            + b"x" * 0x401,
            PayloadTooLarge,
        ),
    ],
)
def test_errors_are_the_same_whole_or_byte_by_byte(name, data, error):
    assert run(name, data)[1] is error
    assert run(name, data, range(len(data)))[1] is error


@pytest.mark.parametrize("name", PARSERS)
def test_payload_too_large_comes_after_the_head(name):
    events, error = run(name, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9999\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead]
    assert error is PayloadTooLarge


@pytest.mark.parametrize("name", PARSERS)
def test_eof_between_requests_and_inside_one(name):
    assert run(name, b"", eof=True) == ([CONNECTION_CLOSED], None)
    events, error = run(name, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", eof=True)
    assert events[-1] is CONNECTION_CLOSED
    assert error is None
    assert run(name, b"GET / HTTP/1.1\r\nHo", eof=True) == ([], BadRequest)
    body_cut = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab"
    assert run(name, body_cut, eof=True)[1] is BadRequest


@pytest.mark.parametrize("name", PARSERS)
def test_keep_alive_and_upgrade_flags(name):
    def head(data: bytes) -> RequestHead:
        parser = new_parser(name, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
        parser.receive_data(data)
        event = parser.next_event()
        assert isinstance(event, RequestHead)
        return event

    assert head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").keep_alive
    assert not head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive
    assert not head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert not head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert head(
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    ).upgrade
    assert not head(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").upgrade


@pytest.mark.parametrize("name", PARSERS)
def test_upgrade_leaves_the_bytes_after_the_head(name):
    data = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    events, error = run(name, data + b"\x81\x05hello", [len(data) - 2])
    assert error is None
    assert events[-1] == ("trailing", b"\x81\x05hello")


@pytest.mark.parametrize("name", PARSERS)
def test_expects_continue_until_the_body_starts(name):
    parser = new_parser(name, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
    parser.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.next_event() is NEED_DATA
    assert parser.expects_continue
    assert parser.send_continue() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not parser.expects_continue
    parser.receive_data(b"ok")
    assert parser.next_event() == RequestEnd(b"ok")


@pytest.mark.parametrize("name", PARSERS)
def test_no_continue_when_the_body_is_already_there_or_http_1_0(name):
    for data in (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nab",
        b"POST / HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    ):
        parser = new_parser(name, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
        parser.receive_data(data)
        assert isinstance(parser.next_event(), RequestHead)
        assert parser.next_event() is NEED_DATA
        assert not parser.expects_continue


def answer_bytes(name, request: bytes, status, headers, body, *, close=False):
    parser = new_parser(name, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
    parser.receive_data(request)
    assert isinstance(parser.next_event(), RequestHead)
    assert isinstance(parser.next_event(), RequestEnd)
    return parser.send_response(status, headers, body, close=close)


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "headers", "body", "close", "expected"),
    [
        (
            GET,
            200,
            [("Content-Type", "text/plain")],
            b"hi",
            False,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
        ),
        (
            GET,
            404,
            (),
            b"",
            True,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        (HEAD, 200, [], b"12345", False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        (GET, 204, [("X-A", "b")], b"", False, b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"),
        (GET, 299, [], b"", False, b"HTTP/1.1 299 \r\nContent-Length: 0\r\n\r\n"),
    ],
)
@pytest.mark.parametrize("name", PARSERS)
def test_responses_are_the_same_bytes(name, request_bytes, status, headers, body, close, expected):
    assert answer_bytes(name, request_bytes, status, headers, body, close=close) == expected


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (200, [("Bad Name", "v")], b""),
        (200, [("X-A", "v\r\nInjected: 1")], b""),
        (200, [("X-A", "caf\u00e9")], b""),
        (200, [("X-A", " padded")], b""),
        (200, [("Transfer-Encoding", "chunked")], b""),
        (200, [("connection", "keep-alive")], b""),
        (204, [], b"body"),
        (101, [], b""),
        (1000, [], b""),
    ],
)
def test_invalid_responses_are_refused(name, status, headers, body):
    with pytest.raises(InvalidResponse):
        answer_bytes(name, GET, status, headers, body)


@pytest.mark.parametrize("name", PARSERS)
def test_an_error_response_can_follow_a_refused_one(name):
    parser = new_parser(name, max_header_bytes=MAX_HEAD, max_body=MAX_BODY)
    parser.receive_data(GET)
    parser.next_event()
    parser.next_event()
    with pytest.raises(InvalidResponse):
        parser.send_response(200, [("X", "a\nb")], b"", close=False)
    assert parser.send_response(500, [], b"", close=True).startswith(b"HTTP/1.1 500 ")


# Hypothesis: random valid requests, pipelined, under any chunking.

_token = st.text("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789", min_size=1, max_size=12)
_value = st.text("abcdefXYZ0123456789 ;=/.,_-", max_size=30).map(str.strip)
_path = st.lists(st.text("abcxyz019-._~%20", max_size=8), max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    target = draw(_path) + draw(st.sampled_from(["", "?a=1", "?q=x%20y&b"]))
    names = draw(st.lists(_token, max_size=5))
    headers = [("Host", "example")]
    headers += [
        ("X-" + name, draw(_value))
        for name in names
        if name.lower() not in {"host", "content-length", "transfer-encoding"}
    ]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked"] if body else ["none", "length"]))
    wire_body = body
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 64), max_size=10))
        chunks, rest = [], body
        for size in [*sizes, len(body)]:
            if rest:
                chunks.append(rest[:size])
                rest = rest[size:]
        wire_body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return (head + "\r\n").encode() + wire_body, (method, target, body)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(requests(), min_size=1, max_size=3),
    st.lists(st.integers(0, 2000), max_size=12),
)
def test_random_valid_requests_give_the_same_events(batch, cuts):
    data = b"".join(wire for wire, _ in batch)
    results = [run(name, data, cuts) for name in PARSERS]
    assert results[0] == results[1]
    events, error = results[0]
    assert error is None
    heads = [e for e in events if isinstance(e, RequestHead)]
    bodies = [e.body for e in events if isinstance(e, RequestEnd)]
    assert [(h.method, h.target) for h in heads] == [(m, t) for _, (m, t, _) in batch]
    assert bodies == [body for _, (_, _, body) in batch]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"", b"GET / HTTP/1.1\r\nHost: a\r\n", b"POST / HTTP/1.1\r\nHost: a\r\n"]),
    st.binary(max_size=400),
    st.lists(st.integers(0, 500), max_size=10),
    st.booleans(),
)
def test_arbitrary_bytes_give_events_or_gateway_errors(prefix, junk, cuts, eof):
    for name in PARSERS:
        events, error = run(name, prefix + junk, cuts, eof=eof)
        assert error in (None, BadRequest, HeadersTooLarge, PayloadTooLarge)
        assert all(
            isinstance(e, RequestHead | RequestEnd | bytes | tuple) or e is CONNECTION_CLOSED
            for e in events
        )


def test_split_target():
    assert split_target("/a%2Fb/c?x=%20") == ("/a/b/c", "x=%20")
    assert split_target("http://h:1/p%20q?z") == ("/p q", "z")
    assert split_target("*") == ("*", "")


def test_resolve_parser_name():
    assert resolve_parser_name("h11") == "h11"
    assert resolve_parser_name("httptools") == "httptools"
    assert resolve_parser_name("auto") == "httptools"  # installed in the dev environment


def test_parser_modules_do_not_import_trio():
    code = (
        "import sys, tlvproxy.server.parsers, tlvproxy.server.h11_parser, "
        "tlvproxy.server.httptools_parser; assert 'trio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

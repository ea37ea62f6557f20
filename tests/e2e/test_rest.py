"""REST end to end (SPEC 4): a real client, the real gateway and the real mock upstream.

Every test runs with both HTTP parsers (the `parser` fixture).
"""

from __future__ import annotations

import json
import logging

import pytest
import trio

from tests.e2e.client import HttpClient, fetch

SEND = {"to_uid": 2, "text": "hello"}
USER = {"X-User-Id": "1"}


def error_of(answer):
    body = answer.json()
    assert set(body) == {"error"}, body
    assert body["error"]["request_id"] == answer.headers["x-request-id"]
    return body["error"]


# ---------------------------------------------------------------- translation


async def test_send_message_builds_the_request_from_body_header_and_fields(gateway):
    answer = await fetch(gateway.http_address, "POST", "/v1/messages", SEND, USER)
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"msg_id", "sent_at"}
    assert isinstance(body["msg_id"], str)  # uint64 is a string in proto3 JSON
    # The mock stored it with from_uid from the header uid and client_ip from `fields`.
    listed = await fetch(gateway.http_address, "GET", "/v1/users/2/messages")
    message = listed.json()["messages"][-1]
    assert message["from_uid"] == 1
    assert message["to_uid"] == 2
    assert message["text"] == "hello"


async def test_path_parameters_are_converted_to_the_field_type(gateway):
    answer = await fetch(gateway.http_address, "GET", "/v1/users/42/profile")
    assert answer.status == 200
    profile = answer.json()
    assert profile["user_id"] == 42
    assert profile["gender"] in {"GENDER_FEMALE", "GENDER_MALE", "GENDER_UNSPECIFIED"}
    assert isinstance(profile["created_at"], str)  # int64 as a string


async def test_query_then_path_parameters_win_over_the_body(gateway):
    # SPEC 4.1: body, then query, then path segments; later ones win.
    answer = await fetch(gateway.http_address, "GET", "/v1/users/2/messages?limit=1")
    assert answer.status == 200
    assert len(answer.json()["messages"]) <= 1
    await fetch(gateway.http_address, "POST", "/v1/messages", SEND, USER)
    await fetch(gateway.http_address, "POST", "/v1/messages", SEND, USER)
    answer = await fetch(gateway.http_address, "GET", "/v1/users/2/messages?limit=1")
    assert len(answer.json()["messages"]) == 1


async def test_json_codec_passes_the_body_through(gateway):
    body = '{"any": ["json", 1, {"nested": true}], "text": "\\u00e9"}'
    answer = await fetch(gateway.http_address, "POST", "/v1/echo", body)
    assert answer.status == 200
    assert answer.body == body.encode()


async def test_request_id_is_echoed_or_made(gateway):
    given = await fetch(
        gateway.http_address, "GET", "/v1/users/1/profile", None, {"X-Request-Id": "abc-123"}
    )
    assert given.headers["x-request-id"] == "abc-123"
    made = await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    assert len(made.headers["x-request-id"]) >= 16
    missing = await fetch(gateway.http_address, "GET", "/nowhere", None, {"X-Request-Id": "r-404"})
    assert missing.headers["x-request-id"] == "r-404"
    assert error_of(missing)["request_id"] == "r-404"


async def test_untrusted_forwarded_for_is_ignored(gateway, caplog):
    caplog.set_level(logging.INFO, logger="tlvproxy.access")
    await fetch(
        gateway.http_address, "GET", "/v1/users/1/profile", None, {"X-Forwarded-For": "203.0.113.9"}
    )
    gateway.access_log.flush()
    records = [r for r in caplog.records if r.name == "tlvproxy.access"]
    assert records[-1].client_ip == "127.0.0.1"


async def test_trusted_forwarded_for_is_believed(gateways, caplog):
    caplog.set_level(logging.INFO, logger="tlvproxy.access")
    gateway = await gateways.start(trusted_proxies=["127.0.0.0/8"])
    await fetch(
        gateway.http_address,
        "GET",
        "/v1/users/1/profile",
        None,
        {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"},
    )
    gateway.access_log.flush()
    records = [r for r in caplog.records if r.name == "tlvproxy.access"]
    assert records[-1].client_ip == "203.0.113.9"


async def test_access_record_has_the_spec_fields(gateway, caplog):
    caplog.set_level(logging.INFO, logger="tlvproxy.access")
    await fetch(
        gateway.http_address, "POST", "/v1/messages", SEND, {**USER, "X-Request-Id": "log-1"}
    )
    gateway.access_log.flush()
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == "log-1")
    assert record.method == "POST"
    assert record.path == "/v1/messages"
    assert record.route == "send_message"
    assert record.command == "0x1001"
    assert record.upstream_node == gateways_node(gateway)
    assert record.status == 200
    assert record.upstream_status == 0
    assert record.duration_ms >= 0


def gateways_node(gateway):
    [pool] = gateway.runtime.pools.values()
    [state] = pool.node_states()
    return state.address


# ---------------------------------------------------------------- every error row (SPEC 4.2)


async def test_400_bad_json(gateway):
    answer = await fetch(gateway.http_address, "POST", "/v1/messages", "{not json", USER)
    assert answer.status == 400
    assert error_of(answer)["code"] == "bad_request"


async def test_400_unknown_field_is_named(gateway):
    answer = await fetch(
        gateway.http_address, "POST", "/v1/messages", {"to_uid": 2, "colour": "red"}, USER
    )
    assert answer.status == 400
    assert "colour" in error_of(answer)["message"]


async def test_400_wrong_type_names_the_field_and_the_type(gateway):
    answer = await fetch(
        gateway.http_address, "POST", "/v1/messages", {"to_uid": "abc", "text": "x"}, USER
    )
    error = error_of(answer)
    assert answer.status == 400
    assert "to_uid" in error["message"]
    assert "integer" in error["message"]


async def test_400_bad_path_parameter(gateway):
    answer = await fetch(gateway.http_address, "GET", "/v1/users/abc/profile")
    assert answer.status == 400
    assert "user_id" in error_of(answer)["message"]


async def test_400_bad_uid_header(gateway):
    answer = await fetch(gateway.http_address, "POST", "/v1/messages", SEND, {"X-User-Id": "root"})
    assert answer.status == 400
    assert "x-user-id" in error_of(answer)["message"].lower()


async def test_400_json_codec_refuses_invalid_json(gateway):
    answer = await fetch(gateway.http_address, "POST", "/v1/echo", "{oops")
    assert answer.status == 400
    assert error_of(answer)["code"] == "bad_request"


async def test_400_malformed_request_closes_the_connection(gateway):
    stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
    await stream.send_all(b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b'"code":"bad_request"' in data.replace(b" ", b"")
    await stream.aclose()


async def test_403_waf_deny_names_the_rule(gateway):
    answer = await fetch(
        gateway.http_address,
        "POST",
        "/v1/messages",
        {"to_uid": 2, "text": "eval(base64_decode('x'))"},
        USER,
    )
    assert answer.status == 403
    error = error_of(answer)
    assert error["code"] == "forbidden"
    assert "php_injection" in error["message"]
    assert gateway.metrics.waf_blocked.labels("php_injection")._value.get() == 1


async def test_403_waf_checks_query_and_path(gateway):
    query = await fetch(
        gateway.http_address, "GET", "/v1/users/1/profile?q=1%20UNION%20SELECT%20password"
    )
    assert query.status == 403
    traversal = await fetch(gateway.http_address, "GET", "/v1/users/1/../../etc/passwd")
    assert traversal.status == 403


async def test_normal_chat_text_passes_the_waf(gateway):
    answer = await fetch(
        gateway.http_address,
        "POST",
        "/v1/messages",
        {"to_uid": 2, "text": "I'll evaluate the system; a reunion selected us"},
        USER,
    )
    assert answer.status == 200


async def test_404_route_not_found(gateway):
    answer = await fetch(gateway.http_address, "GET", "/v2/nothing")
    assert answer.status == 404
    assert error_of(answer)["code"] == "route_not_found"


async def test_405_method_not_allowed_sets_allow(gateway):
    answer = await fetch(gateway.http_address, "DELETE", "/v1/messages")
    assert answer.status == 405
    assert error_of(answer)["code"] == "method_not_allowed"
    assert answer.headers["allow"] == "POST"


async def test_408_slow_request_head(gateways):
    gateway = await gateways.start(limits={"header_timeout": "300ms"})
    stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
    await stream.send_all(b"GET /v1/users/1/profile HTTP/1.1\r\nHost: x\r\n")
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b"request_timeout" in data
    await stream.aclose()


async def test_408_slowloris_a_byte_at_a_time(gateways):
    gateway = await gateways.start(limits={"header_timeout": "500ms"})
    stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
    request = b"GET /v1/users/1/profile HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    answered = b""
    with trio.fail_after(5):
        for byte in request:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.02)
        while chunk := await stream.receive_some(65536):
            answered += chunk
    assert answered.startswith(b"HTTP/1.1 408 ")
    await stream.aclose()


async def test_413_body_too_large(gateways):
    gateway = await gateways.start(limits={"max_request_body": "1 KiB"})
    answer = await fetch(gateway.http_address, "POST", "/v1/echo", "[" + "1," * 600 + "1]")
    assert answer.status == 413
    assert error_of(answer)["code"] == "payload_too_large"


async def test_431_head_too_large(gateways):
    gateway = await gateways.start(limits={"max_header_bytes": "1 KiB"})
    answer = await fetch(
        gateway.http_address, "GET", "/v1/users/1/profile", None, {"X-Big": "b" * 2000}
    )
    assert answer.status == 431
    assert error_of(answer)["code"] == "headers_too_large"


async def test_429_rate_limited_with_retry_after(gateways):
    gateway = await gateways.start(
        rate_limits=[
            {
                "name": "tight",
                "commands": ["send_message"],
                "key": "header.X-User-Id",
                "rate": "1/m",
                "burst": 1,
            }
        ]
    )
    statuses = []
    for _ in range(3):
        answer = await fetch(gateway.http_address, "POST", "/v1/messages", SEND, USER)
        statuses.append(answer.status)
    assert statuses == [200, 200, 429]
    assert error_of(answer)["code"] == "rate_limited"
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    other_user = await fetch(gateway.http_address, "POST", "/v1/messages", SEND, {"X-User-Id": "9"})
    assert other_user.status == 200  # buckets are per key
    assert gateway.metrics.rate_limited.labels("tight")._value.get() == 1


async def test_mapped_upstream_status(gateway):
    answer = await fetch(gateway.http_address, "GET", "/v1/users/0/profile")
    assert answer.status == 404  # status_map {2: 404}
    error = error_of(answer)
    assert error["code"] == "upstream_status"
    assert error["status"] == 2


async def test_500_unmapped_upstream_status_carries_the_decoded_body(gateway):
    answer = await fetch(gateway.http_address, "POST", "/v1/echo", {"_status": 77, "why": "no"})
    assert answer.status == 500
    error = error_of(answer)
    assert error["code"] == "upstream_status"
    assert error["status"] == 77
    assert error["body"] == {"_status": 77, "why": "no"}


async def test_502_upstream_unavailable(gateways):
    refused = trio.socket.socket()
    await refused.bind(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    gateways.upstream = f"127.0.0.1:{port}"
    gateway = await gateways.start()
    answer = await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    assert answer.status == 502
    assert error_of(answer)["code"] == "upstream_unavailable"


async def serve_bad_upstream(reply: bytes, *, task_status=trio.TASK_STATUS_IGNORED):
    """A TLV 'upstream' that answers every connection's first bytes with `reply`."""

    async def handle(stream):
        await stream.receive_some(65536)
        await stream.send_all(reply)
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    await trio.serve_listeners(handle, listeners)


async def test_502_upstream_protocol_error_on_a_malformed_frame(gateways, nursery):
    gateways.upstream = await nursery.start(serve_bad_upstream, b"\x07not a frame at all")
    gateway = await gateways.start()
    answer = await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    assert answer.status == 502
    assert error_of(answer)["code"] == "upstream_protocol_error"
    assert gateway.metrics.frames_rejected.labels("bad_start_byte")._value.get() == 1


async def test_502_upstream_protocol_error_on_an_undecodable_body(gateways, nursery):
    import struct

    # A well-formed response frame (seq 1, the pool's first) whose body is not a Profile.
    body = b"\xff\xff\xff"
    frame = b"\x09" + struct.pack(">BBHIIIHH", 1, 1, 0x1002, 1, 0, len(body), 0, 0) + body + b"\x0a"
    gateways.upstream = await nursery.start(serve_bad_upstream, frame)
    gateway = await gateways.start(upstreams={"im": {"heartbeat": None}})
    answer = await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    assert answer.status == 502
    assert error_of(answer)["code"] == "upstream_protocol_error"


async def test_503_for_a_request_arriving_on_a_kept_alive_connection_while_draining(gateway):
    client = await HttpClient.connect(gateway.http_address)
    assert (await client.request("GET", "/v1/users/1/profile")).status == 200
    # The next request is on its way when the drain starts (SPEC 4.2 503 row).
    await client.stream.send_all(b"GET /v1/users/1/profile HTTP/1.1\r\n")
    await trio.sleep(0.3)  # let the gateway read the first half of the head
    await trio.testing.wait_all_tasks_blocked()
    gateway.drain()
    await client.stream.send_all(b"Host: x\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while chunk := await client.stream.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503 "), data
    assert b"shutting_down" in data
    assert b"connection: close" in data.lower()
    await client.aclose()


async def test_drain_lets_the_in_flight_request_finish(gateway):
    client = await HttpClient.connect(gateway.http_address)
    async with trio.open_nursery() as nursery:
        answers = []

        async def slow():
            answers.append(await client.request("POST", "/v1/echo", {"_delay_ms": 300}))

        nursery.start_soon(slow)
        await trio.sleep(0.1)  # the request is upstream now
        gateway.drain()
    [answer] = answers
    assert answer.status == 200
    assert answer.headers["connection"] == "close"
    assert not gateway.ready
    await client.aclose()


async def test_504_upstream_timeout(gateways):
    gateway = await gateways.start(upstreams={"im": {"timeout": "200ms"}})
    answer = await fetch(gateway.http_address, "POST", "/v1/echo", {"_delay_ms": 1000})
    assert answer.status == 504
    assert error_of(answer)["code"] == "upstream_timeout"
    # The gateway still answers at once afterwards.
    again = await fetch(gateway.http_address, "POST", "/v1/echo", {"ok": 1})
    assert again.status == 200


# ---------------------------------------------------------------- envelope


async def test_envelope_wraps_success_and_errors_in_200(gateways):
    gateway = await gateways.start(envelope=True)
    ok = await fetch(gateway.http_address, "GET", "/v1/users/3/profile")
    assert ok.status == 200
    assert ok.json()["code"] == 0
    assert ok.json()["data"]["user_id"] == 3
    status = await fetch(gateway.http_address, "GET", "/v1/users/0/profile")
    assert status.status == 200
    assert status.json()["code"] == 2  # the upstream status
    missing = await fetch(gateway.http_address, "GET", "/nowhere")
    assert missing.status == 200
    assert missing.json()["code"] == 404  # a gateway error: its HTTP status
    assert missing.json()["data"] is None


# ---------------------------------------------------------------- HTTP/1.1 behaviour


async def test_keep_alive_serves_many_requests_on_one_connection(gateway):
    client = await HttpClient.connect(gateway.http_address)
    for n in range(20):
        answer = await client.request("POST", "/v1/echo", {"n": n})
        assert answer.json() == {"n": n}
    await client.aclose()


async def test_pipelined_requests_are_answered_in_order(gateway):
    stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
    wire = b""
    for n in range(5):
        # The first is the slowest: order must still hold.
        body = json.dumps({"n": n, "_delay_ms": 100 if n == 0 else 0}).encode()
        wire += b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
    await stream.send_all(wire)
    data = b""
    with trio.fail_after(5):
        while data.count(b"HTTP/1.1 200 ") < 5 or not data.endswith(b"}"):
            data += await stream.receive_some(65536)
    bodies = [
        json.loads(part.rsplit(b"\r\n\r\n", 1)[-1]) for part in data.split(b"HTTP/1.1 200 ")[1:]
    ]
    assert [b["n"] for b in bodies] == [0, 1, 2, 3, 4]
    await stream.aclose()


async def test_chunked_request_body(gateway):
    stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
    pieces = [b'{"to_', b'uid": 2, "text": "', b'hi"}']
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]
    await stream.send_all(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-User-Id: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks[0]
    )
    await trio.sleep(0.05)
    await stream.send_all(chunks[1] + chunks[2] + b"0\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while b"sent_at" not in data:
            data += await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200 ")
    await stream.aclose()


async def test_garbage_bytes_never_crash_the_gateway(gateway):
    import random

    rng = random.Random(7)
    for n in range(50):
        stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        if n % 3 == 0:
            junk = b"POST /v1/echo HTTP/1.1\r\nContent-Length: 5\r\n" + junk
        try:
            await stream.send_all(junk)
            await stream.send_eof()
            with trio.move_on_after(2):
                while await stream.receive_some(65536):
                    pass
        except trio.BrokenResourceError:
            pass
        await stream.aclose()
    answer = await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    assert answer.status == 200


async def test_a_thousand_dropped_connections_leak_no_fd(gateway):
    import gc
    import os

    await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    head = b'POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"partial'

    async def drop(n):
        stream = await trio.open_tcp_stream(gateway.http_address.host, gateway.http_address.port)
        if n % 2:
            await stream.send_all(head)  # dropped mid-request
        await trio.aclose_forcefully(stream)

    for batch in range(10):
        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(drop, batch * 100 + n)
    answer = await fetch(gateway.http_address, "GET", "/v1/users/1/profile")
    assert answer.status == 200
    with trio.fail_after(5):
        # The server notices each close as its read returns; wait until it has.
        while True:
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            if len(os.listdir("/proc/self/fd")) <= before:
                break
            await trio.sleep(0.01)


@pytest.mark.parametrize("stage", ["_inspected", "_admitted", "_forward"])
async def test_a_bug_costs_its_own_request_not_the_others_of_its_pass(
    gateway, monkeypatch, caplog, stage
):
    # The requests of a scheduler pass are worked on together, by one task,
    # in three sweeps: a bug in any of them answers its request 500 and the
    # others as usual.
    from tlvproxy.server.rest import RestHandler

    original = getattr(RestHandler, stage)

    def buggy(handler, exchange, *args):
        if exchange.request.body == b'{"boom": 1}':
            raise RuntimeError("a bug")
        return original(handler, exchange, *args)

    monkeypatch.setattr(RestHandler, stage, buggy)
    answers = {}

    async def post(body: str) -> None:
        answers[body] = await fetch(gateway.http_address, "POST", "/v1/echo", body)

    async with trio.open_nursery() as nursery:
        for body in ('{"a": 1}', '{"boom": 1}', '{"b": 2}', '{"c": 3}'):
            nursery.start_soon(post, body)
    assert {body: answer.status for body, answer in answers.items()} == {
        '{"a": 1}': 200,
        '{"boom": 1}': 500,
        '{"b": 2}': 200,
        '{"c": 3}': 200,
    }
    assert error_of(answers['{"boom": 1}'])["code"] == "internal_error"
    # As before the batching: the connection closes after a bug's answer.
    assert answers['{"boom": 1}'].headers["connection"] == "close"
    assert "handler failed on POST /v1/echo" in caplog.text
    # The task goes on.
    assert (await fetch(gateway.http_address, "POST", "/v1/echo", '{"d": 4}')).status == 200


async def test_a_bug_while_answering_a_bug_costs_only_its_own_request(gateway, monkeypatch, caplog):
    # The error answer itself fails (a bug in the access record, say): the
    # request still gets a bare 500, and the worker and the others go on.
    from tlvproxy.server.rest import Exchange, RestHandler

    forward, finish = RestHandler._forward, Exchange.finish

    def boom(exchange) -> bool:
        return exchange.request.body == b'{"boom": 1}'

    def buggy_forward(handler, exchange, *args):
        if boom(exchange):
            raise RuntimeError("a bug")
        return forward(handler, exchange, *args)

    def buggy_finish(exchange, *args, **kwargs):
        if boom(exchange):
            raise RuntimeError("a bug while answering")
        return finish(exchange, *args, **kwargs)

    monkeypatch.setattr(RestHandler, "_forward", buggy_forward)
    monkeypatch.setattr(Exchange, "finish", buggy_finish)
    answers = {}

    async def post(body: str) -> None:
        answers[body] = await fetch(gateway.http_address, "POST", "/v1/echo", body)

    async with trio.open_nursery() as nursery:
        for body in ('{"a": 1}', '{"boom": 1}', '{"b": 2}'):
            nursery.start_soon(post, body)
    assert {body: answer.status for body, answer in answers.items()} == {
        '{"a": 1}': 200,
        '{"boom": 1}': 500,
        '{"b": 2}': 200,
    }
    assert error_of(answers['{"boom": 1}'])["code"] == "internal_error"
    assert "answering POST /v1/echo after a failure failed" in caplog.text
    assert (await fetch(gateway.http_address, "POST", "/v1/echo", '{"d": 4}')).status == 200

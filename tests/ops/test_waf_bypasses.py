"""WAF bypasses through the real gateway process (issue 16, finding 5).

Each input below once reached the upstream past the table's `php_injection`
rule, `(?i)\\b(eval|assert|...)\\s*\\(`: percent-encoded or `+`-spaced query
values, JSON escapes in a body or a WebSocket message, and a probe in the
middle of a body too long to be scanned whole. Rules now see the decoded
views as well as the raw text, and every byte of a body (docs/configuration.md
`waf`). Ordinary text holding `%`, `+` or backslashes still passes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from wsproto.events import CloseConnection, TextMessage

from tests.ops.procs import Gateway, Processes, WebSocket, metric

if TYPE_CHECKING:
    from collections.abc import Iterator

# The WebSocket sessions take messages up to 256 KiB, so a message can be
# longer than the 64 KiB the WAF used to scan of it (its head and tail).
_WS_MAX = 256 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[Gateway]:
    started = Processes(tmp_path_factory.mktemp("waf"))
    try:
        yield started.gateway(upstream, websocket={"max_message": "256 KiB"})
    finally:
        started.close()


def _blocked(gateway: Gateway) -> float:
    return metric(gateway.metrics(), "tlvproxy_waf_blocked_total", rule="php_injection")


@pytest.mark.parametrize(
    "query",
    [
        "text=eval%28phpinfo%28%29%29",
        "text=system+(id)",
        "text=%65val(x)",
        "%65val%28x%29=1",  # a name is decoded too
        "to_uid=2&text=sy%73tem%20%28id%29",
    ],
)
def test_decoded_query_is_inspected(gateway: Gateway, query: str) -> None:
    before = _blocked(gateway)
    answer = gateway.call(
        "POST", f"/v1/messages?{query}", {"to_uid": 2}, headers={"X-User-Id": "101"}
    )
    assert answer.status == 403, answer
    assert answer.json()["error"]["code"] == "forbidden"
    assert "php_injection" in answer.json()["error"]["message"]
    assert _blocked(gateway) == before + 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "eval\\u0028phpinfo())"}',
        b'{"text": "\\u0065val(x)"}',
        b'{"text": "\\u0053YSTEM\\t(id)"}',  # escaped case and whitespace
        b'{"\\u0065val(x)": 1}',  # an object key
        b'{"a": ["x", {"b": "sys\\u0074em (1)"}]}',  # nested
        '{"text": "eval(x)"}'.encode("utf-16"),  # JSON the codec reads as UTF-16
        '{"text": "eval(x)"}'.encode("utf-32-be"),
    ],
)
def test_json_escapes_in_a_body_are_inspected(gateway: Gateway, body: bytes) -> None:
    answer = gateway.call("POST", "/v1/echo", body, headers={"Content-Type": "application/json"})
    assert answer.status == 403, answer
    assert "php_injection" in answer.json()["error"]["message"]


def test_every_byte_of_a_long_body_is_inspected(gateway: Gateway) -> None:
    # 80,044 bytes with the probe at offset 40,000: once outside the first and
    # last 32 KiB, the only bytes scanned.
    text = "a" * 39_989 + " eval(x) " + "a" * 40_034
    body = json.dumps({"text": text}).encode()
    assert len(body) == 80_044
    assert body.index(b"eval(") == 40_000
    answer = gateway.call("POST", "/v1/echo", body)
    assert answer.status == 403, answer
    # An escaped probe in the middle of a long body too.
    escaped = body.replace(b"eval(x)", b"\\u0065val(x)")
    assert gateway.call("POST", "/v1/echo", escaped).status == 403


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("q=50%25+off&name=%E5%BC%A0", b'{"text": "50% off, caf\\u00e9 \\"system\\" (mostly)"}'),
        ("path=C%3A%5Cevals%5C", b'{"text": "\\\\u0065val(x)"}'),  # an escaped backslash
        ("text=evaluate+(later)", b'{"text": "evaluate\\n(later)"}'),
    ],
)
def test_ordinary_encoded_text_still_passes(gateway: Gateway, query: str, body: bytes) -> None:
    answer = gateway.call("POST", f"/v1/echo?{query}", body)
    assert answer.status == 200, answer
    assert answer.body == body


def _send_text(ws: WebSocket, text: str) -> None:
    ws.sock.sendall(ws.ws.send(TextMessage(data=text)))


def _next_event(ws: WebSocket) -> str | CloseConnection:
    """The next whole text message (its fragments joined), or the close."""
    parts: list[str] = []
    while True:
        while ws._pending:
            event = ws._pending.pop(0)
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts)
            elif isinstance(event, CloseConnection):
                return event
        ws._pending.extend(ws._events())


@pytest.mark.parametrize(
    "text",
    [
        '{"cmd": "echo", "seq": 1, "body": {"text": "eval\\u0028phpinfo())"}}',
        '{"cmd": "echo", "seq": 1, "body": {"text": "\\u0065val(x)"}}',
        '{"cmd": "echo", "seq": 1, "body": {"\\u0065val(x)": 1}}',
        '{"cmd": "echo", "seq": 1, "body": {"text": "'
        + "a" * 100_000
        + " eval(x) "
        + "a" * 100_000
        + '"}}',
    ],
    ids=["escaped-paren", "escaped-letter", "escaped-key", "long-message"],
)
def test_websocket_messages_are_inspected_decoded_and_whole(gateway: Gateway, text: str) -> None:
    assert len(text.encode()) <= _WS_MAX
    ws = WebSocket(gateway.http_port)
    try:
        # The session works, and the ordinary escapes of JSON pass.
        ws.send({"cmd": "echo", "seq": 7, "body": {"text": 'caf\u00e9 "system" (1)'}})
        assert ws.receive() == {
            "cmd": "echo",
            "seq": 7,
            "status": 0,
            "body": {"text": 'caf\u00e9 "system" (1)'},
        }
        _send_text(ws, text)
        closed = _next_event(ws)
        assert isinstance(closed, CloseConnection), closed[:200]
        assert closed.code == 1008
        assert "php_injection" in (closed.reason or "")
    finally:
        ws.close()


@pytest.mark.parametrize("target", ["/ws?uid=1&did=%65val(x)", "/ws/../ws?uid=1&did=a"])
def test_a_websocket_handshake_is_inspected_like_a_request(gateway: Gateway, target: str) -> None:
    # The handshake's query reaches the upstream (the session's uid and hash
    # key are read from it): the rules see it as they see a REST request.
    before = _blocked(gateway)
    with pytest.raises(AssertionError, match="status_code=403"):
        WebSocket(gateway.http_port, target)
    if "eval" in target:
        assert _blocked(gateway) == before + 1

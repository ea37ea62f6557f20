"""WebSocket frames an attacker writes by hand, against a real `tlvproxy serve`
(issue 16, finding 4; docs/websocket.md "Limits").

`max_message` bounds every message however it is fragmented: more than 1,024
fragments, or more than `max_message` bytes in all, closes with 1009, and a
frame whose header declares too much closes at once, before its payload. Pings
are answered without counting as answers the client has not read.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

import pytest

from tests.ops.rawws import (
    BINARY,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    RawWebSocket,
    frame,
    rss_kib,
)

if TYPE_CHECKING:
    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow

TOO_BIG = 1009
# A gateway's growth while 4 sessions flood it: the interpreter's own noise
# (arenas, the access log) stays well under this; the finding was +112 MiB.
MAX_GROWTH_KIB = 4 * 1024


def test_more_than_1024_empty_continuations_close_with_1009(
    upstream: str, procs: Processes
) -> None:
    gateway = procs.gateway(upstream)
    ws = RawWebSocket(gateway.http_port)
    ws.send(frame(TEXT, b"a", fin=False) + frame(CONTINUATION, fin=False) * 1100)
    started = time.monotonic()
    assert ws.close_code(timeout=5) == TOO_BIG
    assert time.monotonic() - started < 5  # not at idle_timeout (120 s)


def test_fragments_over_max_message_in_all_close_with_1009(upstream: str, procs: Processes) -> None:
    gateway = procs.gateway(upstream, websocket={"max_message": "1 KiB"})
    ws = RawWebSocket(gateway.http_port)
    ws.send(frame(BINARY, b"x" * 600, fin=False) + frame(CONTINUATION, b"x" * 600, fin=False))
    assert ws.close_code(timeout=5) == TOO_BIG


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"", id="text"),
        pytest.param(frame(TEXT, b"a", fin=False), id="continuation"),
    ],
)
def test_a_header_declaring_2_63_bytes_closes_before_its_payload(
    upstream: str, procs: Processes, opening: bytes
) -> None:
    gateway = procs.gateway(upstream)
    ws = RawWebSocket(gateway.http_port)
    opcode = CONTINUATION if opening else TEXT
    # The header alone (with its masking key): no payload byte follows.
    ws.send(opening + frame(opcode, length=2**63 - 1))
    assert ws.close_code(timeout=5) == TOO_BIG


def test_an_empty_continuation_flood_costs_no_memory(upstream: str, procs: Processes) -> None:
    gateway = procs.gateway(upstream)
    pid = gateway.process.pid
    # Warm up the paths a flood takes (wsproto, the close), then measure.
    warm = RawWebSocket(gateway.http_port)
    warm.send(frame(TEXT, b"a", fin=False) + frame(CONTINUATION, fin=False) * 1100)
    assert warm.close_code(timeout=5) == TOO_BIG
    sessions = [RawWebSocket(gateway.http_port) for _ in range(4)]
    before = rss_kib(pid)
    codes: list[int] = []
    peaks: list[int] = []
    chunk = frame(CONTINUATION, fin=False) * 10_000

    def flood(ws: RawWebSocket) -> None:
        ws.send(frame(TEXT, b"a", fin=False))
        try:
            for _ in range(400):  # 4 million empty continuations at most
                ws.send(chunk)
                if ws.readable():
                    break
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the gateway stopped reading: it closed the session
        codes.append(ws.close_code(timeout=10))

    threads = [threading.Thread(target=flood, args=(ws,)) for ws in sessions]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peaks.append(rss_kib(pid))
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    peaks.append(rss_kib(pid))
    assert codes == [TOO_BIG] * 4
    assert max(peaks) - before < MAX_GROWTH_KIB, (before, max(peaks))


def test_a_burst_of_pings_while_a_write_is_blocked_is_not_a_slow_client(
    upstream: str, procs: Processes
) -> None:
    gateway = procs.gateway(upstream)
    # A small receive window: the gateway's writes block until the client reads.
    ws = RawWebSocket(gateway.http_port, receive_buffer=4096)
    text = "x" * 50_000
    for seq in range(10):
        ws.send_json({"cmd": "echo", "seq": seq, "body": {"text": text}})
    time.sleep(0.5)  # the answers are written until the client's window is full
    ws.send(b"".join(frame(PING, b"%d" % index) for index in range(64)))
    answers: list[int] = []
    pongs: list[bytes] = []
    while len(answers) < 10 or b"63" not in pongs:
        opcode, payload = ws.receive(timeout=10)
        if opcode == PONG:
            pongs.append(payload)
        else:
            answers.append(json.loads(payload)["seq"])
    assert answers == list(range(10))
    # The latest ping is answered last (RFC 6455 5.5.3: earlier ones may share its pong).
    assert pongs[-1] == b"63"
    ws.send_json({"cmd": "echo", "seq": 99, "body": {"ok": True}})
    assert ws.receive_json(timeout=10)["seq"] == 99


def test_pings_from_a_client_that_never_reads_stay_bounded(upstream: str, procs: Processes) -> None:
    gateway = procs.gateway(upstream)
    pid = gateway.process.pid
    ws = RawWebSocket(gateway.http_port, receive_buffer=4096)
    for seq in range(10):
        ws.send_json({"cmd": "echo", "seq": seq, "body": {"text": "x" * 50_000}})
    time.sleep(0.5)
    before = rss_kib(pid)
    ping = frame(PING, b"p" * 125)
    try:
        for _ in range(20):  # 2.6 MB of pings, never a byte read
            ws.send(ping * 1000)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    assert rss_kib(pid) - before < MAX_GROWTH_KIB

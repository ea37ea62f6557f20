"""Push sessions over SSE and long polling (SPEC 8) through the real gateway
process, with one worker and with two. Every request goes on a new
connection, so with two workers the kernel hands about half of them to the
worker that does not hold the session, which passes them to the one that does.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.ops.procs import DEADLINE, call, metric, wait_for
from tests.ops.push_client import PATH, Session, Stream, push_to, split_head
from tests.ops.tls_helpers import Certificates, start_gateway, tls_socket

if TYPE_CHECKING:
    from tests.ops.procs import Answer, Gateway, Processes

pytestmark = pytest.mark.slow

SESSIONS = {
    "path": PATH,
    "upstream": "im",
    "hash_on": "query.did",
    "uid": "query.uid",
    "idle_timeout": "30s",
    "poll_timeout": "1s",
    "max_buffered": 4,
}


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def start(procs: Processes, upstream: str, workers: int, **overrides: Any) -> Gateway:
    """A gateway of `workers` with `sessions`; it logs at debug level, where
    each request passed between workers is told."""
    options = {"sessions": SESSIONS, **overrides}
    return procs.gateway(upstream, "--workers", str(workers), "--log-level", "debug", **options)


def passed_between_workers(gateway: Gateway) -> int:
    return sum(
        r["message"] == "push session request passed to its worker"
        for r in gateway.process.records()
    )


class Background:
    """A call in a thread of its own (a long poll waiting while the test pushes)."""

    def __init__(self, target: Any) -> None:
        self.answer: Answer | None = None
        self.began = time.monotonic()
        self.took = 0.0

        def run() -> None:
            self.answer = target()
            self.took = time.monotonic() - self.began

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def result(self) -> Answer:
        self._thread.join(20)
        assert self.answer is not None, "the call did not finish"
        return self.answer


def ids(answer: Answer) -> list[int]:
    return [message["id"] for message in answer.json()["messages"]]


def established_to(port: int) -> set[int]:
    """The local ports of the established TCP connections to 127.0.0.1:`port`."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if remote_port == port and fields[3] == "01":
            found.add(local_port)
    return found


def test_create_stream_resume_poll_gap_and_send(
    procs: Processes, upstream: str, workers: int
) -> None:
    gateway = start(procs, upstream, workers)
    port = gateway.http_port
    session = Session(port, "uid=21&did=a")
    created = session.created
    assert created.headers["location"] == session.path
    assert created.json() == {
        "session": session.id,
        "events": f"{session.path}/events",
        "poll": f"{session.path}/poll",
        "messages": f"{session.path}/messages",
    }
    session.register()

    # Messages answer as on a WebSocket, per-message errors included.
    answer = session.send({"cmd": "echo", "seq": 7, "body": {"x": [1, 2]}})
    assert (answer.status, answer.json()) == (
        200,
        {"cmd": "echo", "seq": 7, "status": 0, "body": {"x": [1, 2]}},
    )
    answer = session.send({"cmd": "nope", "seq": 8})
    assert answer.status == 200
    assert answer.json()["seq"] == 8
    assert answer.json()["error"]["code"] == "bad_request"

    # Pushes over SSE, each flushed as it comes.
    stream = session.stream()
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    push_to(port, 21, "one")
    push_to(port, 21, "two")
    first, second = stream.events(2)
    assert (first.kind, first.id, second.id) == ("message", "1", "2")
    assert first.json()["cmd"] == "new_message"
    assert first.json()["push"] is True
    assert first.json()["body"]["text"] == "one"

    # The stream drops; what came meanwhile comes on resuming, nothing lost.
    stream.close()
    push_to(port, 21, "three")
    push_to(port, 21, "four")
    resumed = session.stream({"Last-Event-ID": "2"})
    texts = [event.json()["body"]["text"] for event in resumed.events(2)]
    assert texts == ["three", "four"]
    push_to(port, 21, "five")
    assert resumed.next().id == "5"

    # A poll returns at once what is kept after `after`, and ends the stream.
    began = time.monotonic()
    polled = session.poll(after=3)
    assert time.monotonic() - began < 0.9
    assert (ids(polled), polled.json()["next"]) == ([4, 5], 5)
    assert "gap" not in polled.json()
    ended = resumed.next()
    assert (ended.kind, ended.json()) == ("close", {"closed": "replaced"})
    assert resumed.ended()

    # With nothing new, after poll_timeout, empty; a push ends the wait at once.
    began = time.monotonic()
    assert session.poll(after=5).json() == {"messages": [], "next": 5}
    assert 0.9 <= time.monotonic() - began < 5
    waiting = Background(lambda: session.poll(after=5))
    time.sleep(0.3)  # the poll is on its way: the push finds it waiting
    push_to(port, 21, "six")
    assert ids(waiting.result()) == [6]
    assert waiting.took < 0.9

    # Past max_buffered (4) the oldest go: a gap, reported before what is kept.
    for n in range(7, 12):
        push_to(port, 21, f"n{n}")
    # A push reaches the session after the request that caused it is answered.
    wait_for(lambda: ids(session.poll(after=10)) == [11], "push 11")
    polled = session.poll(after=6)
    assert (ids(polled), polled.json()["gap"]) == ([8, 9, 10, 11], True)
    gapped = session.stream({"Last-Event-ID": "6"})
    gap, *kept = gapped.events(5)
    assert (gap.kind, gap.json()) == ("gap", {"missed_from": 7, "missed_to": 7})
    assert [event.id for event in kept] == ["8", "9", "10", "11"]

    # A second stream ends the first; pushes go to the second.
    second_stream = session.stream(query="after=11")
    closed = gapped.next()
    assert (closed.kind, closed.json()) == ("close", {"closed": "replaced"})
    assert gapped.ended()
    push_to(port, 21, "last")
    assert second_stream.next().json()["body"]["text"] == "last"

    # DELETE closes it: the stream hears why, and the id is gone.
    assert session.delete().status == 204
    closed = second_stream.next()
    assert (closed.kind, closed.json()) == ("close", {"closed": "deleted"})
    assert second_stream.ended()
    gone = session.poll()
    assert (gone.status, gone.json()["error"]["code"]) == (404, "session_not_found")

    record = wait_for(
        lambda: next(
            (r for r in gateway.process.records() if r["message"] == "push session"), None
        ),
        "the session's access record",
    )
    assert record["closed"] == "deleted"
    assert record["request_id"] == created.headers["x-request-id"]
    assert record["uid"] == 21
    assert record["pushes"] == 12
    assert record["status"] == 201
    # About half of the ~40 requests went to the worker without the session.
    assert (passed_between_workers(gateway) > 0) == (workers == 2)


def tight_request(path: str, body: bytes, size: int) -> bytes:
    """POST `path` with a head of exactly `size` bytes, its headers written
    without a space after the colon (padded by many short ones)."""
    head = f"POST {path} HTTP/1.1\r\nHost:gw\r\nContent-Length:{len(body)}\r\n".encode()
    n = 0
    while len(head) < size - 64:
        head += b"X-%d:v\r\n" % n
        n += 1
    head += b"X-Pad:" + b"v" * (size - len(head) - len(b"X-Pad:\r\n\r\n")) + b"\r\n\r\n"
    assert len(head) == size
    return head + body


def raw_answer(port: int, data: bytes) -> tuple[int, bytes]:
    """Send `data` on a connection of its own: the answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        received = b""
        while (head := split_head(received)) is None or len(head[2]) < int(
            head[1]["content-length"]
        ):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    return head[0], head[2]


def test_a_request_as_large_as_max_header_bytes_allows_reaches_its_worker(
    procs: Processes, upstream: str
) -> None:
    gateway = start(procs, upstream, 2, limits={"max_header_bytes": "2 KiB"})
    session = Session(gateway.http_port, "uid=25&did=a")
    session.register()
    body = b'{"cmd": "echo", "seq": 3, "body": 1}'
    request = tight_request(f"{session.path}/messages", body, 2048)
    for _ in range(16):  # on new connections: about half are passed to the owner
        status, answer = raw_answer(gateway.http_port, request)
        assert (status, json.loads(answer)) == (
            200,
            {"cmd": "echo", "seq": 3, "status": 0, "body": 1},
        )
    assert passed_between_workers(gateway) > 0
    # One byte more is too large for either worker.
    status, _ = raw_answer(gateway.http_port, tight_request(f"{session.path}/messages", body, 2049))
    assert status == 431


KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}
PARTNERS = {
    "name": "partners",
    "type": "api_key",
    "header": "X-Api-Key",
    "keys": {
        name: {"sha256": hashlib.sha256(key.encode()).hexdigest(), "uid": uid}
        for (name, key), uid in zip(KEYS.items(), (31, 32), strict=True)
    },
}


def test_a_session_belongs_to_the_identity_that_opened_it(
    procs: Processes, upstream: str, workers: int
) -> None:
    gateway = start(
        procs,
        upstream,
        workers,
        auth=[PARTNERS],
        sessions={**SESSIONS, "auth": "partners", "uid": "auth.claim.uid"},
    )
    port = gateway.http_port
    alice = {"X-Api-Key": KEYS["alice"]}
    refused = call(port, "POST", f"{PATH}?did=a")
    assert (refused.status, refused.json()["error"]["code"]) == (401, "unauthorized")
    session = Session(port, "did=a", headers=alice)
    session.register()
    assert session.poll(after=0).status == 200

    bob = {"X-Api-Key": KEYS["bob"]}
    for method, suffix in (
        ("GET", "/poll"),
        ("GET", "/events"),
        ("POST", "/messages"),
        ("DELETE", ""),
    ):
        for _ in range(4):  # on new connections, whichever worker gets them
            answer = call(port, method, f"{session.path}{suffix}", b"{}", headers=bob)
            assert (answer.status, answer.json()["error"]["code"]) == (404, "session_not_found")
    without = call(port, "GET", f"{session.path}/poll")
    assert without.status == 401
    # Made-up ids, owned by no worker or by a real one, are as unknown.
    for made_up in ("0-AAAAAAAAAAAAAAAAAAAAAA", "7-AAAAAAAAAAAAAAAAAAAAAA", "zz", "1-short"):
        answer = call(port, "GET", f"{PATH}/{made_up}/poll", headers=alice)
        assert (answer.status, answer.json()["error"]["code"]) == (404, "session_not_found")
    # The session still serves its own identity, with the uid of its key.
    push_to(port, 31, "for alice")
    polled = session.poll(after=0).json()
    assert [m["body"]["text"] for m in polled["messages"]] == ["for alice"]


def test_idle_expiry_closes_the_upstream_connection(procs: Processes, workers: int) -> None:
    upstream = procs.upstream()
    upstream_port = int(upstream.rsplit(":", 1)[1])
    gateway = start(procs, upstream, workers, sessions={**SESSIONS, "idle_timeout": "1500ms"})
    before = established_to(upstream_port)
    session = Session(gateway.http_port, "uid=41&did=a")
    session.register()
    opened = wait_for(lambda: established_to(upstream_port) - before, "the session's connection")
    assert len(opened) == 1
    assert metric(gateway.metrics(), "tlvproxy_push_sessions") == 1
    # Activity keeps it: a poll (1 s), then a send, each within idle_timeout.
    session.poll(after=0)
    time.sleep(1.0)
    session.register()
    assert opened <= established_to(upstream_port)

    wait_for(lambda: not (opened & established_to(upstream_port)), "the idle session to close")
    answer = session.poll()
    assert (answer.status, answer.json()["error"]["code"]) == (404, "session_not_found")
    record = wait_for(
        lambda: next(
            (r for r in gateway.process.records() if r["message"] == "push session"), None
        ),
        "the session's access record",
    )
    assert record["closed"] == "idle_timeout"
    values = gateway.metrics()
    assert metric(values, "tlvproxy_push_sessions") == 0
    assert metric(values, "tlvproxy_push_messages_total", direction="in", transport="http") == 2
    assert metric(values, "tlvproxy_push_messages_total", direction="out", transport="http") == 2


def test_upstream_loss_ends_the_stream_and_the_poll_with_close(
    procs: Processes, workers: int
) -> None:
    upstream = procs.upstream()
    gateway = start(procs, upstream, workers, sessions={**SESSIONS, "poll_timeout": "20s"})
    streamed = Session(gateway.http_port, "uid=51&did=a")
    streamed.register()
    polled = Session(gateway.http_port, "uid=52&did=b")
    polled.register()
    stream = streamed.stream()
    push_to(gateway.http_port, 51, "before")
    assert stream.next().json()["body"]["text"] == "before"
    waiting = Background(lambda: polled.poll(after=0))
    time.sleep(0.3)

    [mock] = [p for p in procs._started if p.log_path.name.startswith("upstream")]
    mock.kill()

    closed = stream.next()
    assert (closed.kind, closed.json()) == ("close", {"closed": "upstream_lost"})
    assert stream.ended()
    assert waiting.result().json() == {"messages": [], "next": 0, "closed": "upstream_lost"}
    assert waiting.took < 10
    assert streamed.poll().status == 404


def test_drain_ends_streams_and_polls(procs: Processes, upstream: str, workers: int) -> None:
    gateway = start(procs, upstream, workers, sessions={**SESSIONS, "poll_timeout": "20s"})
    streamed = Session(gateway.http_port, "uid=61&did=a")
    polled = Session(gateway.http_port, "uid=62&did=b")
    stream = streamed.stream()
    waiting = Background(lambda: polled.poll(after=0))
    time.sleep(0.3)

    gateway.process.send(signal.SIGTERM)

    closed = stream.next()
    assert (closed.kind, closed.json()) == ("close", {"closed": "shutting_down"})
    assert stream.ended()
    assert waiting.result().json() == {"messages": [], "next": 0, "closed": "shutting_down"}
    assert waiting.took < 10
    assert gateway.process.wait() == 0
    closes = [r["closed"] for r in gateway.process.records() if r["message"] == "push session"]
    assert closes == ["shutting_down", "shutting_down"]


def test_over_tls_a_request_for_the_other_worker_is_relayed(
    procs: Processes, upstream: str, tmp_path: Path
) -> None:
    certificates = Certificates(tmp_path / "certs")
    gateway = start_gateway(
        procs, upstream, certificates, "--workers", "2", "--log-level", "debug", sessions=SESSIONS
    )
    created = gateway.https("POST", f"{PATH}?uid=71&did=a")
    assert created.status == 201, created
    path = created.headers["location"]
    for seq in range(8):  # each on a new TLS connection, to either worker
        answer = gateway.https("POST", f"{path}/messages", {"cmd": "echo", "seq": seq})
        assert answer.json() == {"cmd": "echo", "seq": seq, "status": 0, "body": {}}, answer
    context = certificates.client_context()
    streams = [
        Stream(0, f"{path}/events", sock=tls_socket(gateway.https_port, context)) for _ in range(4)
    ]
    for stream in streams[:-1]:  # each new stream ends the one before
        closed = stream.next()
        assert (closed.kind, closed.json()) == ("close", {"closed": "replaced"})
    stream = streams[-1]
    push_to(gateway.http_port, 71, "over tls")
    assert stream.next().json()["body"]["text"] == "over tls"
    polled = gateway.https("GET", f"{path}/poll?after=0")
    assert ids(polled) == [1]
    assert passed_between_workers(gateway) > 0

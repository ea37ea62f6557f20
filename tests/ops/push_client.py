"""A blocking client of push sessions (SPEC 8) for tests of real gateway
processes: sessions over `call` (each request on a new connection, as
tests/ops/procs.py does), and an event stream read from a raw socket by a
parser of its own (the text/event-stream rules of the HTML standard), so
the gateway's events are checked by code it did not write.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import attrs

from tests.ops.procs import DEADLINE, Answer, call

PATH = "/v1/sessions"


@attrs.frozen
class Event:
    """One dispatched event: its type ("message" unless named), id and data."""

    kind: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class EventParser:
    """text/event-stream, sans I/O: `feed` bytes, get the events they complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._kind = ""
        self._data: list[str] = []
        self.last_id: str | None = None
        self.comments = 0

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events = []
        while (line := self._line()) is not None:
            event = self._take(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self) -> str | None:
        buffer = self._buffer
        ends = [i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0]
        if not ends:
            return None
        index = min(ends)
        size = 1
        if buffer[index : index + 1] == b"\r":
            if index + 1 == len(buffer):
                return None  # maybe the first half of \r\n
            if buffer[index + 1 : index + 2] == b"\n":
                size = 2
        line, self._buffer = buffer[:index], buffer[index + size :]
        return line.decode()

    def _take(self, line: str) -> Event | None:
        if line == "":
            data, kind = self._data, self._kind
            self._data, self._kind = [], ""
            if not data:
                return None
            return Event(kind or "message", self.last_id, "\n".join(data))
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


def split_head(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, the bytes after the head) once `data` holds a whole head."""
    if b"\r\n\r\n" not in data:
        return None
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers, rest


def stream_request(target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gateway.test", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Stream:
    """GET .../events on a connection of its own; `next()` reads one event."""

    def __init__(
        self,
        port: int,
        target: str,
        headers: dict[str, str] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock.sendall(stream_request(target, headers))
        received = b""
        while (head := split_head(received)) is None:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before the head: {received!r}"
            received += chunk
        self.status, self.headers, rest = head
        self.parser = EventParser()
        self._events = self.parser.feed(rest)

    @property
    def comments(self) -> int:
        return self.parser.comments

    def next(self, timeout: float = DEADLINE) -> Event | None:
        """The next event (comments counted, not returned); None at the end."""
        self.sock.settimeout(timeout)
        while not self._events:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._events = self.parser.feed(chunk)
        return self._events.pop(0)

    def events(self, count: int, timeout: float = DEADLINE) -> list[Event]:
        found = []
        for _ in range(count):
            event = self.next(timeout)
            assert event is not None, f"the stream ended after {found}"
            found.append(event)
        return found

    def ended(self, timeout: float = DEADLINE) -> bool:
        """True when the gateway closes the stream with no further event."""
        return self.next(timeout) is None

    def close(self) -> None:
        self.sock.close()


class Session:
    """One push session, every request of it on a new connection."""

    def __init__(
        self, port: int, query: str = "uid=2&did=a", headers: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.headers = headers or {}
        answer = call(port, "POST", f"{PATH}?{query}", headers=self.headers)
        assert answer.status == 201, answer
        self.created = answer
        self.id = answer.json()["session"]
        self.path = f"{PATH}/{self.id}"

    def send(self, message: dict[str, Any]) -> Answer:
        return call(self.port, "POST", f"{self.path}/messages", message, headers=self.headers)

    def register(self) -> None:
        """Tell the demo upstream whose session this is (its first frame
        carries the session's uid), as the demo page's first request does."""
        answer = self.send({"cmd": "echo", "seq": 0, "body": {}})
        assert answer.json() == {"cmd": "echo", "seq": 0, "status": 0, "body": {}}, answer

    def poll(self, after: int = 0, **options: Any) -> Answer:
        return call(
            self.port,
            "GET",
            f"{self.path}/poll?after={after}",
            headers=self.headers,
            **options,
        )

    def stream(self, headers: dict[str, str] | None = None, query: str = "") -> Stream:
        target = f"{self.path}/events" + (f"?{query}" if query else "")
        return Stream(self.port, target, {**self.headers, **(headers or {})})

    def delete(self) -> Answer:
        return call(self.port, "DELETE", self.path, headers=self.headers)


def push_to(port: int, uid: int, text: str) -> None:
    """A chat message to `uid` over REST: the demo upstream pushes it."""
    answer = call(
        port,
        "POST",
        "/v1/messages",
        {"to_uid": uid, "text": text},
        headers={"X-User-Id": "9"},
    )
    assert answer.status == 200, answer

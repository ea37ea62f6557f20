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
        lines = [f"GET {target} HTTP/1.1", "Host: gateway.test", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before the head: {self._buffer!r}"
            self._buffer += chunk
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.comments = 0
        self.last_id: str | None = None

    def body(self) -> bytes:
        """The rest of a non-stream answer (its Content-Length bytes)."""
        length = int(self.headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._buffer += self.sock.recv(65536)
        return self._buffer[:length]

    def _line(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        while True:
            for end in (b"\r\n", b"\n", b"\r"):
                if end in self._buffer:
                    break
            else:
                end = b""
            if end:
                index = self._buffer.index(end)
                if end == b"\r" and index == len(self._buffer) - 1:
                    end = b""  # maybe the first half of \r\n
                else:
                    line, self._buffer = self._buffer[:index], self._buffer[index + len(end) :]
                    return line.decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk

    def next(self, timeout: float = DEADLINE) -> Event | None:
        """The next event (comments counted, not returned); None at the end."""
        kind, data = "", []
        while True:
            line = self._line(timeout)
            if line is None:
                return None
            if line == "":
                if data:
                    return Event(kind or "message", self.last_id, "\n".join(data))
                kind = ""
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                self.last_id = value

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

"""The bytes of push sessions over HTTP (docs/push-sessions.md): session ids,
server-sent events and long-poll answers.

Owns: the session id (the owning worker's index and 128 random bits), where
a request under `sessions.path` goes (`SessionTarget`), the `after` a resume
names, the event stream's head and events (`id:`/`data:` lines, `event: gap`,
`event: close`, the comment that keeps proxies from closing an idle stream),
and the JSON of a poll's answer.
Must not: do I/O, read a clock or keep state; `server/push_sessions.py` does.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Final, Literal

import attrs

from tlvproxy.errors import BadRequest
from tlvproxy.server import ws_json

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

# The owner's index in hex, then 16 random bytes in URL-safe base64 (22
# characters): any worker reads the owner from the id, nobody can guess one.
_SESSION_ID: Final = re.compile(r"([0-9a-f]{1,4})-[A-Za-z0-9_-]{22}")
_ID_BYTES: Final = 16
# Push ids fit a JavaScript number exactly.
MAX_PUSH_ID: Final = 2**53 - 1
# The comment an idle stream gets (docs/push-sessions.md "Server-sent events").
KEEP_ALIVE: Final = b": keep-alive\n\n"
# Line ends in an event's data: each starts a `data:` line of its own (the
# client joins them with \n, which is whitespace to JSON).
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")

Action = Literal["create", "delete", "events", "poll", "messages"]
_ACTIONS: Final[dict[str, Action]] = {"events": "events", "poll": "poll", "messages": "messages"}
# The method each action takes (anything else: 405 with `Allow`).
METHODS: Final[dict[Action, str]] = {
    "create": "POST",
    "delete": "DELETE",
    "events": "GET",
    "poll": "GET",
    "messages": "POST",
}


def new_session_id(worker: int) -> str:
    """A fresh session id owned by `worker` (0 to 65535)."""
    return f"{worker:x}-{secrets.token_urlsafe(_ID_BYTES)}"


def owner_of(session_id: str) -> int | None:
    """The index of the worker that owns `session_id`; None for text that is
    not a session id."""
    found = _SESSION_ID.fullmatch(session_id)
    return None if found is None else int(found[1], 16)


@attrs.frozen(slots=True)
class SessionTarget:
    """A request under `sessions.path`: what it asks, and of which session
    (None for `create`)."""

    action: Action
    session_id: str | None


def parse_target(prefix: str, path: str) -> SessionTarget | None:
    """Where the decoded `path` goes under `prefix` (`sessions.path`): None
    when it is not under it at all (`/v1/sessionsX`), a target otherwise.
    Raises LookupError for a path under the prefix that names nothing."""
    rest = path[len(prefix) :]
    if not rest:
        return SessionTarget("create", None)
    if rest[0] != "/":
        return None
    parts = rest[1:].split("/")
    if len(parts) == 1 and parts[0]:
        return SessionTarget("delete", parts[0])
    if len(parts) == 2 and parts[0] and (action := _ACTIONS.get(parts[1])) is not None:
        return SessionTarget(action, parts[0])
    raise LookupError(path)


def parse_after(text: str | None, what: str) -> int:
    """The push id a resume or poll names (`Last-Event-ID`, `?after=`); 0
    when absent. Raises BadRequest naming `what` for anything but a
    non-negative integer."""
    if text is None or text == "":
        return 0
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        raise BadRequest(f"{what} must be a push id (a non-negative integer), got {text[:40]!r}")
    return int(text)


# ---------------------------------------------------------------- server-sent events


def stream_head(headers: Iterable[tuple[str, str]]) -> bytes:
    """The head of an event stream: not cached, not buffered by proxies
    (nginx reads `X-Accel-Buffering`), ended by closing the connection."""
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/event-stream; charset=utf-8",
        "Cache-Control: no-cache",
        "X-Accel-Buffering: no",
        *(f"{name}: {value}" for name, value in headers),
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _data(text: bytes) -> bytes:
    if b"\n" not in text and b"\r" not in text:
        return b"data: " + text + b"\n"
    return b"".join(b"data: " + line + b"\n" for line in _LINE_END.split(text))


def push_event(push_id: int, text: bytes) -> bytes:
    """One push as an event: its id, then its json-mode text."""
    return b"id: %d\n" % push_id + _data(text) + b"\n"


def gap_event(missed_from: int, missed_to: int) -> bytes:
    """`event: gap`: pushes `missed_from` to `missed_to` are no longer kept."""
    body = ws_json.dumps({"missed_from": missed_from, "missed_to": missed_to})
    return b"event: gap\n" + _data(body) + b"\n"


def close_event(reason: str) -> bytes:
    """`event: close`: why the stream ends (docs/push-sessions.md "Close reasons")."""
    return b"event: close\n" + _data(ws_json.dumps({"closed": reason})) + b"\n"


# ---------------------------------------------------------------- long polling


def poll_body(
    pushes: Sequence[tuple[int, bytes]], next_id: int, *, gap: bool, closed: str | None
) -> bytes:
    """`{"messages": [{"id": N, ...push}], "next": N}`, with `"gap": true`
    when pushes before them were dropped and `"closed"` when the poll ends
    the session's delivery."""
    parts = [b'{"messages":[']
    parts.append(b",".join(b'{"id":%d,' % push_id + text[1:] for push_id, text in pushes))
    parts.append(b'],"next":%d' % next_id)
    if gap:
        parts.append(b',"gap":true')
    if closed is not None:
        parts.append(b',"closed":' + ws_json.dumps(closed))
    parts.append(b"}")
    return b"".join(parts)

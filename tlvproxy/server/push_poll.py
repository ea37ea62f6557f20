"""One long poll of a push session (docs/push-sessions.md "Long polling").

Owns: the poll waiting for a push, as the session's `Listener`, and its
answer: the pushes kept after its `after`, the gap, and why it ends when it
is not by a push.
Must not: keep pushes or time (the session does both: it ends the poll at
its deadline), or read HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from tlvproxy.server import push_wire

if TYPE_CHECKING:
    from collections.abc import Callable

    from tlvproxy.metrics import Metrics
    from tlvproxy.server.push_kept import Gap


class PushSession(Protocol):
    """What a poll needs of its session (push_sessions.py, which imports this
    module: the session is named by what it does here)."""

    messages_out: int
    metrics: Metrics

    def detach(self, listener: Any) -> None: ...

    def kept_after(self, after: int) -> tuple[Gap | None, list[tuple[int, bytes]]]: ...


class Poll:
    """A long poll waiting for a push (docs/push-sessions.md "Long polling"):
    answered with the first push, when another stream or poll takes over,
    when the session closes, or at `deadline` (empty)."""

    __slots__ = ("after", "deadline", "reply", "session")

    def __init__(
        self, session: PushSession, after: int, deadline: float, reply: Callable[[bytes], None]
    ) -> None:
        self.session = session
        self.after = after
        self.deadline = deadline
        self.reply = reply

    def deliver(self, push_id: int, text: bytes) -> None:
        self.session.detach(self)
        self.answer(None)

    def end(self, reason: str | None) -> None:
        self.answer(reason)

    def answer(self, closed: str | None) -> None:
        """Answer with the pushes kept after `after` (and `closed`, when given)."""
        session = self.session
        gap, pushes = session.kept_after(self.after)
        if pushes:
            session.messages_out += len(pushes)
            session.metrics.push_messages.labels("out", "poll").inc(len(pushes))
        # The next poll's `after`: past what this one tells of, lost or not.
        last_lost = self.after if gap is None else gap[1]
        next_id = pushes[-1][0] if pushes else last_lost
        self.reply(push_wire.poll_body(pushes, next_id, gap=gap is not None, closed=closed))

"""A worker's open WebSocket sessions, for its drain (docs/operations.md "Drain").

Owns: the sessions open now, and closing every one with 1001 when the worker
drains, and any opened afterwards at once.
Must not: close a session itself (its `go_away` does), or hold a task per
session.
"""

from __future__ import annotations

from typing import Protocol


class _Session(Protocol):
    """What the drain needs of a session (ws_session.py, which imports this
    module: named here by what it does)."""

    def go_away(self) -> None: ...


class WebSocketSessions:
    """A worker's open sessions, so that its drain closes them with 1001
    (docs/operations.md "Drain").

    Each session is registered for its life; `drain()` closes every one, and
    any opened afterwards at once. A set, where a task per session waiting for
    the drain would cost a task's memory per idle session.
    """

    __slots__ = ("_draining", "_open")

    def __init__(self) -> None:
        self._open: set[_Session] = set()
        self._draining = False

    def __len__(self) -> int:
        """The sessions open now."""
        return len(self._open)

    def is_draining(self) -> bool:
        """True once `drain()` was called."""
        return self._draining

    def drain(self) -> None:
        """Close every open session with 1001, and every later one at once."""
        self._draining = True
        for session in list(self._open):
            session.go_away()

    def _add(self, session: _Session) -> None:
        self._open.add(session)
        if self._draining:
            session.go_away()

    def _remove(self, session: _Session) -> None:
        self._open.discard(session)

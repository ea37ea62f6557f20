"""What ends an HTTP connection's wait for bytes from outside its task
(docs/reference.md "Keep-alive and pipelining", docs/operations.md "Drain").

Owns: the `Waits` part of a connection: its time limits, registered with the
worker's `DeadlineTimer` around each wait (`_arm`) and checked when the timer
calls (`expire`: `header_timeout` while a request is under way,
`keepalive_timeout` counted from the last answer between requests), and the
drain (`DrainSignal`: a connection waiting for its next request closes now,
or once the answers it owes are written); both end the wait by cancelling the
connection's one cancel scope (`_cancel`).
Must not: read bytes or answer (http_conn.py reads and decides what a
cancelled wait means: a 408 or a silent close), or keep a cancel scope per wait.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

    import trio

    from tlvproxy.server.http_answers import Answer
    from tlvproxy.server.http_types import HttpSettings
    from tlvproxy.timer import DeadlineTimer


class WaitingConnection(Protocol):
    """What ending waits needs of a connection, the `self` of `Waits`'s
    methods (http_conn.py, which imports this module, checks that its
    connection is one)."""

    _settings: HttpSettings
    _drain_signal: DrainSignal | None
    _draining: Callable[[], bool] | None
    _timer: DeadlineTimer | None
    _scope: trio.CancelScope
    _cancelled: bool
    _wanted: float
    timer_deadline: float
    _idle: bool
    _order: deque[Answer]
    _out: bytearray
    _answered_at: float
    _close_after_answers: bool

    def _cancel(self) -> None: ...

    def _drain(self) -> None: ...

    def _arm(self, deadline: float) -> None: ...

    def expire(self, now: float) -> None: ...


class DrainSignal:
    """Tells every connection sharing it that the gateway drains (docs/operations.md "Drain").

    Once `set()`, a new request gets 503 and closes the connection, and idle
    connections close at once: `set()` wakes those waiting for a next request
    (one that still owes answers closes after writing them).
    """

    def __init__(self) -> None:
        self._set = False
        self._connections: set[WaitingConnection] = set()

    def is_set(self) -> bool:
        """True once `set()` was called."""
        return self._set

    def set(self) -> None:
        """Start draining and wake every idle connection so it closes."""
        self._set = True
        for connection in list(self._connections):
            connection._drain()


class Waits:
    """A connection's waits, ended by its time limits or the drain; a base of
    http_conn.py's connection, which holds the state."""

    # What these methods set, declared for the type checker: the attributes
    # are the connection's.
    _cancelled: bool
    _close_after_answers: bool
    _wanted: float
    timer_deadline: float

    def _is_draining(self: WaitingConnection) -> bool:
        signal = self._drain_signal
        if signal is not None and signal._set:
            return True
        draining = self._draining
        return draining is not None and draining()

    def _cancel(self: WaitingConnection) -> None:
        # End the wait under way (and `_serve_requests`): a deadline, the
        # drain, or an answer that closes the connection.
        self._cancelled = True
        self._scope.cancel()

    def _drain(self: WaitingConnection) -> None:
        # The drain signal: a connection waiting for its next request closes
        # now, or once the answers it still owes are written; any other finds
        # out at its next request or wait.
        if not self._idle or self._wanted == math.inf:
            return
        if self._order or self._out:
            self._close_after_answers = True
        else:
            self._cancel()

    def _arm(self: WaitingConnection, deadline: float) -> None:
        self._wanted = deadline
        if deadline < self.timer_deadline:
            self.timer_deadline = deadline
            assert self._timer is not None  # set before serve() runs
            self._timer.watch(self, deadline)

    def expire(self: WaitingConnection, now: float) -> None:
        """The timer's call: end the wait under way if it is over time."""
        self.timer_deadline = math.inf  # the entry that called is used up
        wanted = self._wanted
        if wanted == math.inf:
            return  # not waiting
        if self._idle:
            # keepalive_timeout counts from the last answer (docs/configuration.md
            # `limits`): a connection that still owes answers is not idle yet.
            keepalive = self._settings.keepalive_timeout
            if self._order or self._out:
                wanted = now + keepalive
            else:
                wanted = max(wanted, self._answered_at + keepalive)
        if wanted > now:
            self._arm(wanted)
        else:
            self._cancel()

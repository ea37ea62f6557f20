"""One task that waits for the next request of every idle HTTP connection of
a worker, and for the next message of every WebSocket session
(docs/reference.md "How a request flows").

Owns: `ReadHub`: an epoll set of the worker's plain-TCP client sockets, each
added once for its connection's life, or its session's (edge-triggered: a
readiness is reported when bytes arrive, and never again for the same
bytes), and the task that waits on it. A connection waiting for its next
request, or a session for its next message, parks its task here (`park`).
When bytes arrive for a parked one, the hub's task calls its `on_readable`
(http_conn.py, ws_reading.py), which reads them and handles the requests or
messages they complete itself: the task stays parked, and is woken (`wake`)
only for what it must await.
Must not: read, parse or answer (the connection or session does), or wake a
task that is not parked here.

Why: a connection task woken for each request costs a trio wake-up, a
reschedule and an epoll_ctl per wait: 8 us of CPU per request on the
development box, a fifth of a REST request's. The hub pays one wake-up per
scheduler pass for all the connections that got bytes in it.
"""

from __future__ import annotations

import logging
import select
from typing import TYPE_CHECKING, Protocol

import outcome
import trio

if TYPE_CHECKING:
    from typing import TypeAlias

    from tlvproxy.server.http_types import Request
    from tlvproxy.server.parsers import Closed, RequestEnd, RequestHead

    # What a parked task is woken with: bytes it must parse (read by the hub,
    # or the end of the stream), an event the hub took from the parser but
    # the task must handle, a `Closes`, or None: the hub handled the bytes,
    # and the task goes on with its parser (a request under way, a drain).
    Woken: TypeAlias = "bytes | RequestHead | RequestEnd | Closed | Closes | None"

log = logging.getLogger("tlvproxy.http")

# The most readiness events one poll takes; the rest wait for the next pass.
_MAX_EVENTS = 256
# The events that say the stream ended (the peer's FIN or reset, an error):
# reported with the bytes before them, in one readiness.
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Closes:
    """What the hub hands a connection's task after a request it submitted
    asked to close the connection (or to take it over): `request`."""

    __slots__ = ("request",)

    def __init__(self, request: Request) -> None:
        self.request = request


class ParkedConnection(Protocol):
    """What the hub needs of a connection (http_conn.py's)."""

    # Its task, while parked in `ReadHub.park`; None otherwise.
    parked: trio.lowlevel.Task | None
    # Bytes may have come while its task was not parked: it reads until
    # none are left before it parks again.
    missed: bool

    def on_readable(self, ended: bool) -> None: ...


class ReadHub:
    """The idle connections of one worker, waited on by one task (`run`)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None  # while `run`'s task runs
        self._connections: dict[int, ParkedConnection] = {}
        # Only while `run`'s task runs: connections park only then.
        self.running = False

    def add(self, fd: int, connection: ParkedConnection) -> None:
        """Watch the socket `fd` of `connection` until `remove(fd)`; bytes
        already there are reported too, and the end of the stream (a FIN or a
        reset) with its own flag. Only while `running`; raises OSError when
        the kernel refuses (the caller then waits on its own)."""
        assert self._epoll is not None  # only while running
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._connections[fd] = connection

    def watches(self, fd: int, connection: ParkedConnection) -> bool:
        """Whether `fd` is in this run's set, for `connection`: one added
        during an earlier run of the hub is not, and waits on its own."""
        return self._connections.get(fd) is connection

    def remove(self, fd: int, connection: ParkedConnection) -> None:
        """Stop watching `fd` for `connection`, before it is closed or handed
        on; nothing when this run does not watch it."""
        if self.watches(fd, connection):
            del self._connections[fd]
            assert self._epoll is not None  # the set is cleared when a run ends
            self._epoll.unregister(fd)

    @staticmethod
    async def park(connection: ParkedConnection) -> Woken:
        """Park the calling task, `connection`'s, until `wake`; a cancellation
        ends the wait as any other."""
        connection.parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            connection.parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        woken: Woken = await trio.lowlevel.wait_task_rescheduled(abort)
        return woken

    @staticmethod
    def wake(connection: ParkedConnection, result: outcome.Outcome[Woken]) -> None:
        """Resume `connection`'s parked task with `result`. It reads until no
        bytes are left before it parks again: bytes may come meanwhile, whose
        readiness it misses."""
        task = connection.parked
        assert task is not None  # only a parked task is woken
        connection.parked = None
        connection.missed = True
        trio.lowlevel.reschedule(task, result)

    def _wake_parked(self, connection: ParkedConnection, result: outcome.Outcome[Woken]) -> bool:
        # `wake` when its task is parked; whether it was.
        if connection.parked is None:
            return False
        self.wake(connection, result)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand the bytes that arrive to their connections, until cancelled;
        then wake every parked task, which waits on its own from then on."""
        assert self._epoll is None  # one run at a time
        epoll = self._epoll = select.epoll()
        connections = self._connections
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, events in epoll.poll(0, _MAX_EVENTS):
                    connection = connections.get(fd)
                    if connection is None:
                        continue
                    if connection.parked is None:
                        connection.missed = True
                        continue
                    try:
                        connection.on_readable(events & _ENDED != 0)
                    except Exception as exc:
                        # Its task raises it (a parse error is a 400 and a
                        # close there); never the others'.
                        if not self._wake_parked(connection, outcome.Error(exc)):
                            log.exception("handling received bytes failed")
        finally:
            self.running = False
            for connection in list(connections.values()):
                self._wake_parked(connection, outcome.Value(None))
            connections.clear()
            self._epoll = None
            epoll.close()

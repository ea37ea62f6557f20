"""One task that fires many deadlines: the time limits of a worker's connections.

Owns: a heap of (deadline, object) entries and the task (`run`) that calls
`expire(now)` on each object whose deadline has passed. The objects are HTTP
client connections (their header and keep-alive limits) and upstream
connections (the deadlines of the requests they carry, docs/reference.md
"Timeouts").
Must not: know what expiring means; each object decides in `expire`.

Why one task and not a cancel scope per wait or per request: entering a trio
cancel scope, or setting its deadline, costs several microseconds, about as
much as parsing a request; a heap push costs a fraction of one. An object
registers its *earliest* deadline only, and says which one is current through
its `timer_deadline` attribute: an entry whose deadline no longer matches is
stale and is dropped when it reaches the top of the heap. When stale entries
pile up, the heap is rebuilt from the live ones, so it stays about as large as
the number of objects waiting.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio

# The heap is rebuilt from its live entries past this size (or four times the
# live entries of the last rebuild).
_PRUNE_MIN = 1024


class Expiring(Protocol):
    """An object with one current deadline (`math.inf`: none)."""

    timer_deadline: float

    def expire(self, now: float) -> None:
        """The deadline `timer_deadline` has passed (`now` >= it)."""


class DeadlineTimer:
    """Calls `expire` on the objects given it when their deadline passes (`run`)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Expiring]] = []
        self._order = itertools.count()  # ties: never compare the objects
        self._target = math.inf  # when the sleeping `run` wakes up by itself
        self._sleep: trio.CancelScope | None = None
        self._prune_at = _PRUNE_MIN

    def watch(self, target: Expiring, deadline: float) -> None:
        """Call `target.expire` at `deadline`, unless `target.timer_deadline`
        has changed by then. The caller sets `timer_deadline` to `deadline`."""
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._order), target))
        if len(heap) > self._prune_at:
            self._prune()
        if deadline < self._target and self._sleep is not None:
            # Sleep until this earlier deadline instead: moving the deadline of
            # the sleeping scope wakes `run` only when it is due.
            self._target = deadline
            self._sleep.deadline = deadline

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire the deadlines as they pass, until cancelled."""
        heap = self._heap
        task_status.started()
        while True:
            now = trio.current_time()
            while heap:
                deadline, _, target = heap[0]
                if target.timer_deadline == deadline:
                    if deadline > now:
                        break
                    heapq.heappop(heap)
                    target.expire(now)
                else:
                    heapq.heappop(heap)
            self._target = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._target) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None

    def _prune(self) -> None:
        live = {
            id(target): entry
            for entry in self._heap
            if (target := entry[2]).timer_deadline == entry[0]
        }
        self._heap[:] = live.values()
        heapq.heapify(self._heap)
        self._prune_at = max(_PRUNE_MIN, 4 * len(self._heap))

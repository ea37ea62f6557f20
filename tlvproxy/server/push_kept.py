"""The pushes push sessions keep for resuming (docs/push-sessions.md "Resuming and gaps").

Owns: one session's kept pushes (`Kept`: its latest `max_buffered`, at most
MAX_BUFFERED_BYTES of them), the bound on the pushes all the sessions of one
worker keep (`KeptBudget`: `sessions.max_buffered_per_worker` bytes, past
which the worker's oldest kept push goes first, whichever session's it is),
and what a resume finds: the pushes kept after an id, and the ids no longer
kept before them (a gap).
Must not: deliver pushes, number them (the session does), or know when a
session ends: the session gives its pushes back (`Kept.clear`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Final

# The pushes one session keeps, in bytes of their text: past it the oldest go
# early (reported as a gap), whatever `max_buffered` says.
MAX_BUFFERED_BYTES: Final = 4 * 1024 * 1024

Gap = tuple[int, int]  # the first and the last id no longer kept


class KeptBudget:
    """Every push the sessions of one worker keep, oldest first, and their bytes."""

    __slots__ = ("_oldest", "_serial", "bytes")

    def __init__(self) -> None:
        # Each kept push by a serial number given in the order they came:
        # the first entry is the worker's oldest kept push.
        self._oldest: OrderedDict[int, Kept] = OrderedDict()
        self._serial = 0
        self.bytes = 0

    def trim(self, limit: int) -> None:
        """Drop the oldest kept pushes, whichever sessions keep them, until
        their bytes are `limit` at most."""
        oldest = self._oldest
        while self.bytes > limit and oldest:
            _, kept = oldest.popitem(last=False)
            self.bytes -= kept._drop_first()

    def _add(self, kept: Kept, size: int) -> int:
        self._serial += 1
        self._oldest[self._serial] = kept
        self.bytes += size
        return self._serial

    def _remove(self, serial: int, size: int) -> None:
        del self._oldest[serial]
        self.bytes -= size


class Kept:
    """One session's kept pushes, oldest first; made with its first push (an
    idle session has none)."""

    __slots__ = ("_budget", "_bytes", "_pushes", "_serials")

    def __init__(self, budget: KeptBudget) -> None:
        self._budget = budget
        self._pushes: deque[tuple[int, bytes]] = deque()  # (id, json-mode text)
        self._serials: deque[int] = deque()  # each push's in the budget
        self._bytes = 0

    def add(self, push_id: int, text: bytes, max_count: int) -> None:
        """Keep push `push_id` (one more than the last); the oldest go when
        more than `max_count`, or more than MAX_BUFFERED_BYTES, are kept (the
        newest always stays)."""
        size = len(text)
        self._pushes.append((push_id, text))
        self._serials.append(self._budget._add(self, size))
        self._bytes += size
        pushes = self._pushes
        while len(pushes) > max_count or (self._bytes > MAX_BUFFERED_BYTES and len(pushes) > 1):
            serial = self._serials[0]
            self._budget._remove(serial, self._drop_first())

    def after(self, after: int, last: int) -> tuple[Gap | None, list[tuple[int, bytes]]]:
        """The pushes kept after id `after` (`last` is the latest push's id),
        and the ids no longer kept between `after` and the first of them
        (None when nothing was lost)."""
        if after >= last:
            return None, []
        pushes = self._pushes
        first = pushes[0][0] if pushes else last + 1
        gap = (after + 1, first - 1) if after + 1 < first else None
        if after < first:
            return gap, list(pushes)
        # Ids are consecutive: the one after `after` sits at a known place.
        return gap, [pushes[index] for index in range(after + 1 - first, len(pushes))]

    def clear(self) -> None:
        """Give every push back (the session ended)."""
        budget = self._budget
        for (_, text), serial in zip(self._pushes, self._serials, strict=True):
            budget._remove(serial, len(text))
        self._pushes.clear()
        self._serials.clear()
        self._bytes = 0

    def _drop_first(self) -> int:
        """Drop the oldest kept push (the budget forgets it); its size."""
        _, text = self._pushes.popleft()
        self._serials.popleft()
        self._bytes -= len(text)
        return len(text)

"""The answers `fallback.last_good` keeps (docs/configuration.md "fallback").

Owns: one command's bounded cache of its last status-0 answer per key value:
at most `max_entries` answers and `max_bytes` bytes (keys and bodies), each
served for `ttl` seconds after it was kept; the oldest kept go first.
Must not: read a clock (the caller passes `now`), decode bodies or know which
errors a fallback answers; `server/traffic.py` decides that.

An answer is kept as the frame body and the name of the command whose
response message it is (a split may have sent the request as another
command), so it costs what the upstream sent, not its JSON.
"""

from __future__ import annotations

from typing import Final

import attrs

# What one entry costs besides its key and body (the tuple, the dict slot):
# counted so that many tiny answers still reach `max_bytes`.
ENTRY_OVERHEAD: Final = 100


@attrs.frozen(slots=True)
class Kept:
    """An answer kept: the command whose response it is, and its frame body."""

    command: str
    body: bytes


class LastGood:
    """One command's last good answers by key value, in one worker process."""

    __slots__ = ("_bytes", "_entries", "max_bytes", "max_entries", "ttl")

    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # key -> (kept at, answer); oldest first (a key kept again moves last).
        self._entries: dict[str, tuple[float, Kept]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes counted against `max_bytes` now."""
        return self._bytes

    def keep(self, key: str, now: float, command: str, body: bytes) -> None:
        """Keep `body`, the answer of `command` for `key`, as of `now`; the
        oldest answers make room. An answer bigger than `max_bytes` on its own
        is not kept (and the key's earlier one is forgotten: it is not the last)."""
        self._forget(key)
        cost = _cost(key, body)
        if cost > self.max_bytes:
            return
        entries = self._entries
        while entries and (len(entries) >= self.max_entries or self._bytes + cost > self.max_bytes):
            self._forget(next(iter(entries)))
        entries[key] = (now, Kept(command, body))
        self._bytes += cost

    def fresh(self, key: str, now: float) -> Kept | None:
        """The answer kept for `key` if it is younger than `ttl` at `now`; an
        older one is forgotten."""
        found = self._entries.get(key)
        if found is None:
            return None
        kept_at, answer = found
        if now - kept_at >= self.ttl:
            self._forget(key)
            return None
        return answer

    def _forget(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= _cost(key, found[1].body)


def _cost(key: str, body: bytes) -> int:
    return len(key) + len(body) + ENTRY_OVERHEAD

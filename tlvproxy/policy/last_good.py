"""The answers `fallback.last_good` keeps (docs/configuration.md "fallback").

Owns: what an answer is kept for (`answer_key`), and one command's bounded
cache of its last status-0 answer per such key: at most `max_entries`
answers and `max_bytes` bytes (key values, digests and bodies), each served
for `ttl` seconds after it was kept; the oldest kept go first.
Must not: read a clock (the caller passes `now`), decode bodies or know which
errors a fallback answers; `server/traffic.py` decides that.

An answer is kept for the request that got it, not for the key's value
alone: for the value, the request frame's uid and a digest of the request's
frame body, so that it is served only to a request that would have sent the
upstream the same frame (the same body, the same uid) and has the same key.
An answer made for one caller's request, its own uid or its own fields, is
never served to another request that shares only the key.

An answer is kept as the frame body and the name of the command whose
response message it is (a split may have sent the request as another
command), so it costs what the upstream sent, not its JSON.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Final

import attrs

# What one entry costs besides its key and body (the tuple, the dict slot):
# counted so that many tiny answers still reach `max_bytes`.
ENTRY_OVERHEAD: Final = 100
# The bytes of the BLAKE2b digest of a request's frame body in its key.
REQUEST_DIGEST_SIZE: Final = 16

# What an answer is kept for: the key's value, the request frame's uid, and
# the digest of the request's frame body.
AnswerKey = tuple[str, int, bytes]


def answer_key(value: str, uid: int, request: bytes) -> AnswerKey:
    """The key an answer to the request frame (`uid`, body `request`) whose
    `last_good` key reads `value` is kept and looked up under."""
    return (value, uid, blake2b(request, digest_size=REQUEST_DIGEST_SIZE).digest())


@attrs.frozen(slots=True)
class Kept:
    """An answer kept: the command whose response it is, and its frame body."""

    command: str
    body: bytes


class LastGood:
    """One command's last good answers by `AnswerKey`, in one worker process."""

    __slots__ = ("_bytes", "_entries", "max_bytes", "max_entries", "ttl")

    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # key -> (kept at, answer); oldest first (a key kept again moves last).
        self._entries: dict[AnswerKey, tuple[float, Kept]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes counted against `max_bytes` now."""
        return self._bytes

    def keep(self, key: AnswerKey, now: float, command: str, body: bytes) -> None:
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

    def fresh(self, key: AnswerKey, now: float) -> Kept | None:
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

    def _forget(self, key: AnswerKey) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= _cost(key, found[1].body)


def _cost(key: AnswerKey, body: bytes) -> int:
    return len(key[0]) + len(key[2]) + len(body) + ENTRY_OVERHEAD

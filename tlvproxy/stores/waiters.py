"""What a rate-limit store tells whoever waits for a check (docs/configuration.md
"Where the buckets live").

Owns: `Answer`, a store's answer about one check, and `Waiter`, who receives
it; the same for the LMDB and the Redis store, so that `limits.Pending` waits
on either.
Must not: say what an answer means for a request (`limits.py` does).
"""

from __future__ import annotations

from typing import Protocol

import attrs


@attrs.frozen(slots=True)
class Failed:
    """The store could not answer a check: down, slow, full or stopped."""

    reason: str


# A check's answer: None (every bucket counted), the position in the check's
# buckets of the first refusing one and its retry-after, or Failed.
Answer = tuple[int, int] | Failed | None


class Waiter(Protocol):
    """Whoever waits for a check: resolved once, from the store's task."""

    def resolve(self, answer: Answer) -> None: ...

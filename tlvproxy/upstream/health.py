"""Health of one upstream node, and the reconnect backoff
(docs/operations.md "When the only node is down").

Owns: the counters that turn request outcomes and probes into "healthy or not",
and the capped exponential backoff between connects.
Must not: import trio, read a clock or do I/O; the caller reports outcomes and passes
`now` (from `trio.current_time()`).

Rules:
- A failure is a refused or failed connect, a timeout, a protocol error, a lost
  connection or a missed heartbeat. `unhealthy_after` consecutive failures make a
  node unhealthy. Any answer (whatever its status) resets the count.
- An unhealthy node becomes healthy again after `healthy_after` consecutive probe
  successes. A probe is a heartbeat when the upstream has one; without a heartbeat
  it is a successful reconnect, tried by the pool after each backoff delay. A failed
  probe starts the count again. Ordinary answers never revive a node: no request is
  sent to an unhealthy node while a healthy one exists.
"""

from __future__ import annotations

from typing import Final

BACKOFF_BASE: Final = 0.1  # seconds before the first reconnect after a failed connect
BACKOFF_CAP: Final = 10.0  # the longest wait between two connects


class NodeHealth:
    """Consecutive-failure / consecutive-success counting for one node.

    Raises ValueError if a threshold is below 1.
    """

    __slots__ = ("failures", "healthy", "healthy_after", "successes", "unhealthy_after")

    def __init__(self, *, unhealthy_after: int, healthy_after: int) -> None:
        if unhealthy_after < 1 or healthy_after < 1:
            raise ValueError(
                f"unhealthy_after and healthy_after must be at least 1, "
                f"got {unhealthy_after} and {healthy_after}"
            )
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self.healthy = True
        self.failures = 0  # consecutive failures
        self.successes = 0  # consecutive probe successes while unhealthy

    def record_failure(self) -> bool:
        """Count a failure; True when it has just made the node unhealthy."""
        self.failures += 1
        self.successes = 0
        if self.healthy and self.failures >= self.unhealthy_after:
            self.healthy = False
            return True
        return False

    def record_answer(self) -> None:
        """Count an answer to an ordinary request: the failure streak ends."""
        self.failures = 0

    def record_probe_success(self) -> bool:
        """Count a heartbeat answer or a successful probe; True when the node has just
        become healthy again."""
        self.failures = 0
        if self.healthy:
            return False
        self.successes += 1
        if self.successes >= self.healthy_after:
            self.healthy = True
            self.successes = 0
            return True
        return False


class Backoff:
    """Capped exponential delay between connect attempts to one node.

    `not_before` is the earliest time (in the caller's clock) for the next attempt.
    """

    __slots__ = ("_delay", "base", "cap", "not_before")

    def __init__(self, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base {base} and cap {cap}")
        self.base = base
        self.cap = cap
        self._delay = base
        self.not_before = float("-inf")

    def ready(self, now: float) -> bool:
        """Whether a connect may be tried at `now`."""
        return now >= self.not_before

    def failed(self, now: float) -> float:
        """Record a failed connect at `now`; returns the delay before the next one,
        which doubles after each failure up to `cap`."""
        delay = self._delay
        self.not_before = now + delay
        self._delay = min(delay * 2, self.cap)
        return delay

    def succeeded(self) -> None:
        """Record a successful connect: the next failure waits `base` again."""
        self._delay = self.base
        self.not_before = float("-inf")

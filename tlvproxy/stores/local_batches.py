"""The checks of one scheduler pass on the `store: local` buckets of several
workers, made together (docs/configuration.md "Where the buckets live").

Owns: the queue of checks submitted in a pass, the task that makes them after
it, in one LMDB transaction per _MAX_BATCH (`LocalBuckets.check_batch`), and
telling each waiter its answer; logging a store that cannot answer. A caller
that works on many requests at once (the REST sweep) holds its checks instead
and makes them itself (`hold`, then `make_held`), in the same pass.
Must not: decide what a failed check means (the rule's `on_store_error` does,
in `limits.py`), or wait on a request's task: a check is submitted and its
`Waiter` resolved by this task (a held one by its caller's `make_held`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final

from tlvproxy.passes import PassSignal
from tlvproxy.stores.local_store import StoreError
from tlvproxy.stores.waiters import Failed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tlvproxy.stores.local_store import Check, LocalBuckets, Step
    from tlvproxy.stores.waiters import Answer, Waiter

log = logging.getLogger("tlvproxy.ratelimit")

# Checks in one write transaction at most: the other workers wait for the
# write lock while it is held.
_MAX_BATCH: Final = 256
# How often a store that cannot answer is logged (seconds); every failed
# check is counted by its rules.
_LOG_INTERVAL: Final = 10.0


class LocalChecks:
    """The checks on `buckets` that this process's requests submit.

    `submit` never waits: the check is made with the others of its scheduler
    pass by `run`'s task, after the pass, and its waiter resolved then. `hold`
    neither: its checks are made by the caller's `make_held`, in its own pass.
    """

    def __init__(self, buckets: LocalBuckets) -> None:
        self.buckets = buckets
        # Submitted checks not made yet, and who waits for each.
        self._queued: list[Check] = []
        self._waiters: list[Waiter] = []
        # Held checks, for the caller's make_held.
        self._held: list[Check] = []
        self._held_waiters: list[Waiter] = []
        self._wake = PassSignal()  # a check was queued
        self._stopped = False
        self._next_log = -math.inf

    def submit(
        self, steps: Sequence[Step], values: Sequence[bytes], now: float, waiter: Waiter
    ) -> None:
        """Check one request on the bucket of each rule of `steps` at time `now`
        (seconds): the bucket of the value at the step's key position in
        `values`. `waiter` hears the answer once `run`'s task has made it,
        after this scheduler pass; Failed when the store cannot answer."""
        if self._stopped:
            _settle(waiter, Failed("the store stopped"))
            return
        if not self._queued:
            self._wake.set()
        self._queued.append((steps, values, now))
        self._waiters.append(waiter)

    async def run(self) -> None:
        """Make the submitted checks until cancelled: each time the task runs,
        those of the scheduler pass before, in one transaction per _MAX_BATCH."""
        try:
            await self._wake.each_pass(self.flush)
        finally:
            # Stopped (the gateway exits): the checks not made hear once too,
            # and later ones at once.
            self._stopped = True
            waiters, self._waiters, self._queued = self._waiters, [], []
            for waiter in waiters:
                _settle(waiter, Failed("the store stopped"))

    def hold(
        self, steps: Sequence[Step], values: Sequence[bytes], now: float, waiter: Waiter
    ) -> None:
        """`submit`, but made by the caller's `make_held`, which it calls before
        its scheduler pass ends: the caller's task goes on with the checks'
        requests in the same pass, and this task does not wake for them."""
        if self._stopped:
            _settle(waiter, Failed("the store stopped"))
            return
        self._held.append((steps, values, now))
        self._held_waiters.append(waiter)

    def check_now(
        self, steps: Sequence[Step], values: Sequence[bytes], now: float, waiter: Waiter
    ) -> None:
        """`submit`, but made at once, in a transaction of its own, and
        `waiter` resolved before this returns: for a caller that handles one
        message at a time (a WebSocket session), which would otherwise wait a
        scheduler pass for each."""
        self._make([(steps, values, now)], [waiter])

    def flush(self) -> None:
        """Make every submitted check now and resolve its waiter."""
        self._make_all(self._queued, self._waiters)

    def make_held(self) -> None:
        """Make every held check now and resolve its waiter."""
        self._make_all(self._held, self._held_waiters)

    def _make_all(self, queued: list[Check], waiters: list[Waiter]) -> None:
        # The lists are emptied as they are made: a waiter may queue more.
        while queued:
            checks, found = queued[:_MAX_BATCH], waiters[:_MAX_BATCH]
            del queued[:_MAX_BATCH], waiters[:_MAX_BATCH]
            self._make(checks, found)

    def _make(self, checks: list[Check], waiters: list[Waiter]) -> None:
        answers: Sequence[Answer]
        try:
            answers = self.buckets.check_batch(checks)
        except Exception as exc:
            # The store cannot answer (StoreError), or a bug: these checks
            # fail, and on_store_error decides for each; the worker goes on.
            answers = [Failed(f"{type(exc).__name__}: {exc}")] * len(checks)
            now = checks[0][2]
            if now >= self._next_log:
                self._next_log = now + _LOG_INTERVAL
                log.error(
                    "the local rate-limit store cannot answer",
                    extra={"error": str(exc)},
                    exc_info=not isinstance(exc, StoreError),
                )
        for waiter, answer in zip(waiters, answers, strict=True):
            _settle(waiter, answer)


def _settle(waiter: Waiter, answer: Answer) -> None:
    try:
        waiter.resolve(answer)
    except Exception:
        # A waiter's bug costs its own request, never the other checks of the batch.
        log.exception("a rate-limit waiter failed")

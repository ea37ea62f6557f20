"""A `store: local` rate-limit store in a temporary directory, for tests that
build a runtime by hand."""

from __future__ import annotations

import tempfile
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tlvproxy.stores.limits import Pending
from tlvproxy.stores.local_batches import LocalChecks
from tlvproxy.stores.local_store import LocalBuckets

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from tlvproxy.config.keys import RequestView
    from tlvproxy.policy.ratelimit import ProcessBuckets, Refusal
    from tlvproxy.stores.limits import RateLimits
    from tlvproxy.stores.local_store import Verdict


@contextmanager
def local_buckets(**options: int) -> Iterator[LocalBuckets]:
    """A fresh LMDB store, closed and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tlvproxy-test-") as directory:
        buckets = LocalBuckets(Path(directory), **options)
        try:
            yield buckets
        finally:
            buckets.close()


@contextmanager
def local_checks(**options: int) -> Iterator[LocalChecks]:
    """A fresh LMDB store as the workers of a gateway check it, closed and
    removed afterwards; its task (`run`) not started."""
    with local_buckets(**options) as buckets:
        yield LocalChecks(buckets)


@asynccontextmanager
async def running_local_checks() -> AsyncIterator[LocalChecks]:
    """`local_checks` with its task running, as a gateway's worker has it."""
    with local_checks() as checks:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(checks.run)
            yield checks
            nursery.cancel_scope.cancel()


def check_buckets(
    store: LocalBuckets, buckets: list[tuple[bytes, float, float]], now: float
) -> Verdict:
    """One check, in a transaction of its own, on buckets named in full, each
    (name, rate, burst)."""
    steps = [(name, rate, burst, 0) for name, rate, burst in buckets]
    return store.check_batch([(steps, [b""], now)])[0]


def settled(
    limits: RateLimits,
    local: LocalChecks | ProcessBuckets,
    command: str,
    request: RequestView,
) -> Refusal | None:
    """`limits.check`'s verdict, with the LMDB store's checks made at once (as
    its task makes them after the scheduler pass)."""
    verdict = limits.check(command, request)
    if isinstance(verdict, Pending):
        assert isinstance(local, LocalChecks)
        local.flush()
        return verdict.verdict
    return verdict

"""Where one gateway's rate-limit buckets live (docs/configuration.md "Where
the buckets live"): the `store: local` buckets, and a Redis store per
`redis.url`.

Owns: choosing the local store (an LMDB file in the workers' runtime
directory, or the process's own memory), and starting each Redis store once
and stopping it when a reload names another URL.
Must not: check a rate limit (stores/limits.py does, with these stores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from tlvproxy.policy.ratelimit import ProcessBuckets
from tlvproxy.stores.local_batches import LocalChecks
from tlvproxy.stores.local_store import LocalBuckets
from tlvproxy.stores.redis_store import RedisBuckets

if TYPE_CHECKING:
    from pathlib import Path


def open_local_store(runtime_dir: Path | None) -> LocalChecks | ProcessBuckets:
    """The `store: local` buckets: in the workers' shared `runtime_dir` (LMDB),
    or, for a gateway that runs as one process (no `runtime_dir`), in its own
    memory, where no other process needs them (docs/configuration.md "Where
    the buckets live"). Either way a new gateway starts clean.
    The LMDB store's checks are made by `LocalChecks.run`, which the caller runs."""
    if runtime_dir is None:
        return ProcessBuckets()
    return LocalChecks(LocalBuckets(runtime_dir / "ratelimits"))


class RedisStores:
    """The Redis store of each `redis.url` the current table names, with the
    scope that stops it when a reload names another."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[RedisBuckets, trio.CancelScope]] = {}

    async def for_url(self, url: str | None, nursery: trio.Nursery) -> RedisBuckets | None:
        """The store of `url`, started once in `nursery`; the stores of other URLs
        stop (a check still submitted to one fails at once, as Redis down would)."""
        for other in [other for other in self._running if other != url]:
            _, scope = self._running.pop(other)
            scope.cancel()
        if url is None:
            return None
        found = self._running.get(url)
        if found is None:
            found = self._running[url] = await nursery.start(self._run, url)
        return found[0]

    @staticmethod
    async def _run(
        url: str,
        *,
        task_status: trio.TaskStatus[tuple[RedisBuckets, trio.CancelScope]] = (
            trio.TASK_STATUS_IGNORED
        ),
    ) -> None:
        store = RedisBuckets(url)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                task_status.started((store, scope))

"""A watch that must read its prefix again, after a compaction or an event
that pushed the prefix over its key limit, reads it (with a backoff) rather
than replaying the same events for ever (docs/operations.md "When etcd is
down")."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from tlvproxy.etcd.client import open_etcd
from tlvproxy.etcd.watch import PrefixWatch
from tlvproxy.etcd.wire import WatchAnswer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import pytest

    from tests.fleet.etcd import Etcd


async def test_an_event_over_the_key_limit_is_not_replayed_for_ever(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    etcd.put("/nodes/a", "1")
    etcd.put("/nodes/b", "2")
    async with open_etcd([etcd.url]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=2)
        await watch.read()
        opens = 0
        real_watch = client.watch

        def counted(prefix: bytes, start: int) -> object:
            nonlocal opens
            opens += 1
            return real_watch(prefix, start)

        monkeypatch.setattr(client, "watch", counted)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(etcd.put, "/nodes/c", "3")  # one too many
            await trio.sleep(1.5)
            assert set(watch.keys) == {b"/nodes/a", b"/nodes/b"}  # the keys read stay
            # The prefix is read again (until it fits), not watched from the
            # same revision to get the same event again.
            assert opens == 1
            await trio.to_thread.run_sync(etcd.delete, "/nodes/a")
            with trio.fail_after(10):
                while set(watch.keys) != {b"/nodes/b", b"/nodes/c"}:
                    await watch.wait_changed(watch.generation)
            nursery.cancel_scope.cancel()


async def test_reads_after_compactions_back_off(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_etcd([etcd.url]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=2)
        await watch.read()
        reads = 0
        real_range = client.range_prefix

        async def range_prefix(*args: object, **options: object) -> object:
            nonlocal reads
            reads += 1
            return await real_range(*args, **options)  # type: ignore[arg-type]

        @asynccontextmanager
        async def compacted(prefix: bytes, start: int) -> AsyncIterator[AsyncIterator[WatchAnswer]]:
            async def answers() -> AsyncIterator[WatchAnswer]:
                yield WatchAnswer(revision=start, created=True)
                yield WatchAnswer(revision=start, canceled=True, compact_revision=start + 1)

            yield answers()

        monkeypatch.setattr(client, "range_prefix", range_prefix)
        monkeypatch.setattr(client, "watch", compacted)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.sleep(1.5)
            nursery.cancel_scope.cancel()
        # A backoff from 0.2 s doubling: a handful of reads, not thousands.
        assert 1 <= reads <= 6

"""What a watch brings is untrusted: an event whose revision is not after the
keys' own, or past the answer's header, is refused (a bogus huge one would
make every later event look old), and an unforeseen error in a watch is
logged and retried, never the end of the watcher (docs/operations.md "When
etcd is down")."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from tlvproxy.etcd.client import open_etcd
from tlvproxy.etcd.watch import PrefixWatch
from tlvproxy.etcd.wire import Event, KeyValue, WatchAnswer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import pytest

    from tests.fleet.etcd import Etcd


def put(key: bytes, revision: int) -> Event:
    return Event(kv=KeyValue(key=key, value=b"v", mod_revision=revision), deleted=False)


async def follow(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch, streams: list[list[WatchAnswer | Exception]]
) -> PrefixWatch:
    """A watcher of /nodes/ whose watches bring `streams`, one per open,
    followed for a second."""
    async with open_etcd([etcd.url]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=10)
        await watch.read()
        opened = iter(streams)

        @asynccontextmanager
        async def fake(prefix: bytes, start: int) -> AsyncIterator[AsyncIterator[WatchAnswer]]:
            stream = next(opened, [])

            async def answers() -> AsyncIterator[WatchAnswer]:
                yield WatchAnswer(revision=start, created=True)
                for item in stream:
                    if isinstance(item, Exception):
                        raise item
                    yield item
                await trio.sleep_forever()

            yield answers()

        monkeypatch.setattr(client, "watch", fake)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    return watch


async def test_events_out_of_the_revision_window_are_refused(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    etcd.put("/nodes/a", "1")
    now = etcd.revision()
    bogus = [
        WatchAnswer(revision=now + 1, events=(put(b"/nodes/huge", 2**62),)),
        WatchAnswer(revision=now + 1, events=(put(b"/nodes/old", now),)),
    ]
    fine = [WatchAnswer(revision=now + 1, events=(put(b"/nodes/b", now + 1),))]
    watch = await follow(etcd, monkeypatch, [bogus[:1], bogus[1:], fine])
    assert set(watch.keys) == {b"/nodes/a", b"/nodes/b"}
    assert watch.revision == now + 1


async def test_an_unforeseen_error_is_logged_and_the_watch_retried(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = etcd.revision()
    fine = [WatchAnswer(revision=now + 1, events=(put(b"/nodes/b", now + 1),))]
    with caplog.at_level(logging.ERROR, "tlvproxy.etcd"):
        watch = await follow(etcd, monkeypatch, [[ValueError("a bug")], fine])
    assert set(watch.keys) == {b"/nodes/b"}
    [record] = [r for r in caplog.records if r.exc_info]
    assert "a bug" in str(record.exc_info[1])

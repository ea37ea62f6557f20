"""With several etcd endpoints, one that takes connections and never answers
(a member stopped with SIGSTOP, or black-holed) does not hold the watcher:
a read, a probe or a watch open that times out moves on to the next
endpoint (docs/operations.md "When etcd is down")."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio

from tlvproxy.etcd import watch as watch_module
from tlvproxy.etcd.client import EtcdUnavailable, open_etcd
from tlvproxy.etcd.watch import PrefixWatch

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fleet.etcd import Etcd


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint whose connections are accepted by the kernel and never read."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(watch_module, "PROBE_TIMEOUT", 0.5)
    monkeypatch.setattr(watch_module, "OPEN_TIMEOUT", 0.5, raising=False)
    monkeypatch.setattr(watch_module, "BACKOFF_MIN", 0.05)


async def test_a_read_that_times_out_goes_to_the_next_endpoint(
    etcd: Etcd, black_hole: str, short_timeouts: None
) -> None:
    etcd.put("/nodes/a", "127.0.0.1:1")
    async with open_etcd([black_hole, etcd.url]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=10)
        with pytest.raises(EtcdUnavailable):
            await watch.read()
        assert client.endpoint == etcd.url
        with trio.fail_after(5):
            await watch.read()
        assert set(watch.keys) == {b"/nodes/a"}


async def test_a_watch_that_does_not_open_goes_to_the_next_endpoint(
    etcd: Etcd, black_hole: str, short_timeouts: None
) -> None:
    async with open_etcd([etcd.url, black_hole]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=10)
        await watch.read()
        client.failed(etcd.url)  # the next request goes to the black hole
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.to_thread.run_sync(etcd.put, "/nodes/b", "127.0.0.1:2")
            with trio.fail_after(10):
                await watch.wait_changed(0)
            assert set(watch.keys) == {b"/nodes/b"}
            nursery.cancel_scope.cancel()


async def test_a_quiet_watch_on_a_member_gone_dark_moves_on(
    etcd: Etcd, black_hole: str, short_timeouts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "PROBE_INTERVAL", 0.3)
    async with open_etcd([etcd.url, black_hole]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=10)
        await watch.read()
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.to_thread.run_sync(etcd.put, "/nodes/a", "127.0.0.1:1")
            with trio.fail_after(5):
                generation = await watch.wait_changed(0)
            client.failed(etcd.url)  # the probes now go to the black hole
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(etcd.put, "/nodes/b", "127.0.0.1:2")
            with trio.fail_after(5):
                while b"/nodes/b" not in watch.keys:
                    generation = await watch.wait_changed(generation)
            nursery.cancel_scope.cancel()
        assert client.endpoint == etcd.url

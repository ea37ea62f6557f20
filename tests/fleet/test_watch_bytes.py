"""A watcher holds at most `max_value` bytes of one value and `max_total` in
all: an oversize value is kept as a key marked oversize (its bytes dropped,
logged), and a prefix whose values add up to more is refused like one with
too many keys (docs/operations.md "When etcd is down")."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest
import trio

from tlvproxy.etcd.client import open_etcd
from tlvproxy.etcd.watch import PrefixWatch, TooManyKeys
from tlvproxy.etcd.wire import KeyValue
from tlvproxy.upstream.discovery import read_nodes

if TYPE_CHECKING:
    from tests.fleet.etcd import Etcd


async def test_an_oversize_value_is_not_held(etcd: Etcd, caplog: pytest.LogCaptureFixture) -> None:
    etcd.put("/nodes/big", "x" * 100)
    etcd.put("/nodes/ok", "127.0.0.1:7001")
    async with open_etcd([etcd.url]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=10, max_value=32, max_total=64)
        with caplog.at_level(logging.WARNING, "tlvproxy.etcd"):
            await watch.read()
        assert watch.keys[b"/nodes/big"].value == b""
        assert watch.keys[b"/nodes/big"].oversize
        assert any(getattr(r, "key", None) == "/nodes/big" for r in caplog.records)
        assert [str(n.address) for n in read_nodes(watch.keys.values())] == ["127.0.0.1:7001"]
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.to_thread.run_sync(etcd.put, "/nodes/later", "y" * 100)
            with trio.fail_after(5):
                while b"/nodes/later" not in watch.keys:
                    await watch.wait_changed(watch.generation)
            assert watch.keys[b"/nodes/later"].oversize
            nursery.cancel_scope.cancel()


async def test_values_adding_up_to_more_than_the_bound_are_refused(etcd: Etcd) -> None:
    for name in "abc":
        etcd.put(f"/nodes/{name}", "z" * 30)
    async with open_etcd([etcd.url]) as client:
        watch = PrefixWatch(client, b"/nodes/", max_keys=10, max_value=32, max_total=64)
        with pytest.raises(TooManyKeys, match="64 bytes"):
            await watch.read()


def test_an_oversize_key_is_a_malformed_node() -> None:
    kv = KeyValue(key=b"/svc/a", value=b"", mod_revision=1, oversize=True)
    assert read_nodes([kv]) == []

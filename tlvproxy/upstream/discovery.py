"""An upstream's nodes discovered in etcd (docs/configuration.md "discovery").

Owns: reading `discovery: {etcd: PREFIX}`'s keys (each key a node, its value
`HOST:PORT` or `{"address": "HOST:PORT", "weight": N}`), skipping a malformed
value (logged once), and handing each new node set to the pool, which applies
it between requests (`Pool.set_nodes`).
Must not: choose nodes or connect; the pool does. Values are untrusted input:
at most MAX_VALUE bytes, UTF-8, and `node_value`'s strict syntax.
"""

from __future__ import annotations

import logging
import os
import random
from typing import TYPE_CHECKING, Final

import trio

from tlvproxy.config.nodes import Invalid
from tlvproxy.config.upstreams import node_value
from tlvproxy.etcd.client import EtcdUnavailable, open_etcd
from tlvproxy.etcd.watch import BACKOFF_MAX, BACKOFF_MIN, PrefixWatch, TooManyKeys
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

    from tlvproxy.config.model import NodeSpec
    from tlvproxy.etcd.wire import KeyValue
    from tlvproxy.upstream.pool import Pool

log = logging.getLogger("tlvproxy.upstream")

MAX_NODES: Final = 1000
MAX_VALUE: Final = 1024


def read_nodes(
    kvs: Iterable[KeyValue], skipped: set[tuple[bytes, int]] | None = None
) -> list[NodeSpec]:
    """The nodes of the keys read, in key order; a malformed value or a second
    key for one address is skipped and logged (once per key and revision
    when `skipped` remembers them)."""
    found: dict[str, NodeSpec] = {}
    for kv in sorted(kvs, key=lambda kv: kv.key):
        try:
            if kv.oversize or len(kv.value) > MAX_VALUE:
                raise Invalid(f"longer than {MAX_VALUE} bytes")
            spec = node_value(kv.value.decode("utf-8"))
            if str(spec.address) in found:
                raise Invalid(f"{spec.address} is registered under another key too")
        except (Invalid, UnicodeDecodeError) as exc:
            if skipped is None or (kv.key, kv.mod_revision) not in skipped:
                log.warning(
                    "a discovered node's value is malformed; the key is skipped",
                    extra={"key": kv.key[:200].decode("utf-8", "replace"), "error": str(exc)},
                )
                if skipped is not None:
                    if len(skipped) > 4 * MAX_NODES:
                        skipped.clear()  # bounded, whatever is written to the prefix
                    skipped.add((kv.key, kv.mod_revision))
            continue
        found[str(spec.address)] = spec
    return list(found.values())


def load_saved(path: Path) -> list[NodeSpec]:
    """The nodes `save_nodes` wrote to `path` (none when it cannot be read);
    each line is read as a registered value, so the file is trusted no more
    than etcd."""
    try:
        with path.open("rb") as file:
            text = file.read(MAX_NODES * (MAX_VALUE + 1))
    except OSError:
        return []
    found = []
    for line in text.splitlines()[:MAX_NODES]:
        try:
            found.append(node_value(line.decode("utf-8")))
        except (Invalid, UnicodeDecodeError):
            continue
    return found


def save_nodes(path: Path, specs: Sequence[NodeSpec]) -> None:
    """Write `specs` to `path` (replaced at once: a reader sees all or nothing)."""
    lines = [f'{{"address": "{spec.address}", "weight": {spec.weight}}}\n' for spec in specs]
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    path.parent.mkdir(mode=0o700, exist_ok=True)
    partial.write_text("".join(lines), encoding="utf-8")
    partial.replace(path)


async def run_discovery(
    pool: Pool,
    endpoints: tuple[str, ...],
    prefix: str,
    *,
    seed: Sequence[NodeSpec] = (),
    saved: Path | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `pool`'s nodes those registered under `prefix`, until cancelled.

    Started once the first read has been tried and the nodes it found have
    joined (or connect_timeout has passed): a gateway starts serving with
    them. While etcd cannot be reached, the pool keeps the nodes it has; a
    pool whose first read fails starts from `seed` (the nodes of the pool it
    replaces), else from those last written to `saved`, where every node set
    read is written (docs/configuration.md "discovery")."""
    skipped: set[tuple[bytes, int]] = set()
    started = False
    written: list[NodeSpec] | None = None

    async def follow(specs: list[NodeSpec]) -> None:
        nonlocal written
        pool.set_nodes(specs)
        if saved is not None and specs != written:
            written = specs
            try:
                await trio.to_thread.run_sync(save_nodes, saved, specs)
            except OSError as exc:
                log.warning(
                    "cannot keep the upstream's nodes for a restart",
                    extra={"upstream": pool.spec.name, "path": str(saved), "error": str(exc)},
                )

    async with open_etcd(endpoints) as client:
        watch = PrefixWatch(
            client,
            f"{prefix}/".encode(),
            max_keys=MAX_NODES,
            max_value=MAX_VALUE,
            max_total=MAX_NODES * MAX_VALUE,
        )
        backoff = BACKOFF_MIN
        jitter = random.Random()
        while True:
            try:
                await watch.read()
                break
            except (EtcdUnavailable, EtcdRefused, MalformedAnswer, TooManyKeys) as exc:
                log.warning(
                    "cannot read the upstream's nodes from etcd; retrying",
                    extra={"upstream": pool.spec.name, "prefix": prefix, "error": str(exc)},
                )
            if not started:
                known = list(seed) or (
                    [] if saved is None else await trio.to_thread.run_sync(load_saved, saved)
                )
                if known:
                    log.warning(
                        "starting from the upstream's nodes last read from etcd",
                        extra={"upstream": pool.spec.name, "nodes": len(known)},
                    )
                    pool.set_nodes(known)
                    with trio.move_on_after(pool.spec.connect_timeout):
                        await pool.wait_joined()
                task_status.started()
                started = True
            await trio.sleep(backoff * (0.5 + jitter.random() / 2))
            backoff = min(backoff * 2, BACKOFF_MAX)
        await follow(read_nodes(watch.keys.values(), skipped))
        if not started:
            with trio.move_on_after(pool.spec.connect_timeout):
                await pool.wait_joined()
            task_status.started()
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            generation = watch.generation
            while True:
                generation = await watch.wait_changed(generation)
                await follow(read_nodes(watch.keys.values(), skipped))

"""The upstream pools of the current table, kept across reloads
(docs/operations.md "Reload", docs/configuration.md "discovery").

Owns: which pools a new table keeps (same spec, same header layout, same
etcd for a `discovery` upstream) and which it starts or retires; running a
pool with its discovery task, seeded with the nodes of the pool it replaces
and saved for the worker that replaces this one; and how long a retired
pool must stay open.
Must not: pick nodes or send requests (tlvproxy/upstream does), or swap the
table: the caller installs the pools `build` returns.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from tlvproxy.upstream.discovery import run_discovery
from tlvproxy.upstream.pool import Pool, open_pool

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import NodeSpec, UpstreamSpec
    from tlvproxy.framing import HeaderLayout
    from tlvproxy.metrics import Metrics
    from tlvproxy.timer import DeadlineTimer
    from tlvproxy.upstream.connection import Sender

# The gateway's records, under the logger name docs/operations.md "Logs" gives.
log = logging.getLogger("tlvproxy.app")


@attrs.frozen
class PoolHandle:
    """A running pool, what it was started for, and the event that closes it."""

    spec: UpstreamSpec
    layout: HeaderLayout
    etcd: tuple[str, ...]  # where a `discovery` upstream's nodes are read
    pool: Pool
    close: trio.Event


class UpstreamPools:
    """The pools of the current table by upstream name (`handles`, which the
    gateway replaces with what `build` returns when it installs a table)."""

    def __init__(
        self, metrics: Metrics, timer: DeadlineTimer, sender: Sender, runtime_dir: Path | None
    ) -> None:
        self._metrics = metrics
        self._timer = timer
        self._sender = sender
        self._runtime_dir = runtime_dir
        self.handles: dict[str, PoolHandle] = {}

    async def build(
        self, table: CompiledTable, nursery: trio.Nursery
    ) -> tuple[dict[str, PoolHandle], list[PoolHandle]]:
        """The pools of `table` by upstream name, those of `handles` it keeps and
        new ones started in `nursery`; and those of `handles` it retires."""
        keep: dict[str, PoolHandle] = {}
        retired: list[PoolHandle] = []
        etcd = _discovery_endpoints(table)
        for name, handle in self.handles.items():
            spec = table.upstreams.get(name)
            same_etcd = spec is None or spec.discovery is None or handle.etcd == etcd
            if spec == handle.spec and table.framing == handle.layout and same_etcd:
                keep[name] = handle
            else:
                retired.append(handle)
        for name, spec in table.upstreams.items():
            if name not in keep:
                # A pool rebuilt on the same prefix starts from the old one's
                # nodes, in case etcd cannot be read now (docs/configuration.md
                # "discovery").
                old_handle = self.handles.get(name)
                seed: tuple[NodeSpec, ...] = ()
                if (
                    old_handle is not None
                    and spec.discovery is not None
                    and old_handle.spec.discovery == spec.discovery
                    and old_handle.etcd == etcd
                ):
                    seed = old_handle.pool.node_specs()
                keep[name] = await nursery.start(self._run_pool, spec, table.framing, etcd, seed)
        return keep, retired

    async def _run_pool(
        self,
        spec: UpstreamSpec,
        layout: HeaderLayout,
        etcd: tuple[str, ...],
        seed: tuple[NodeSpec, ...] = (),
        *,
        task_status: trio.TaskStatus[PoolHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        close = trio.Event()
        async with (
            open_pool(spec, layout, self._metrics, self._timer, self._sender) as pool,
            trio.open_nursery() as discovery,
        ):
            if spec.discovery is not None:
                if etcd:
                    await discovery.start(
                        partial(
                            run_discovery,
                            seed=seed,
                            saved=_saved_nodes(self._runtime_dir, etcd, spec.discovery),
                        ),
                        pool,
                        etcd,
                        spec.discovery,
                    )
                else:
                    log.error(
                        "an upstream's nodes are discovered in etcd, but the table has no "
                        "etcd section and the gateway was not started with --etcd",
                        extra={"upstream": spec.name},
                    )
            handle = PoolHandle(spec=spec, layout=layout, etcd=etcd, pool=pool, close=close)
            task_status.started(handle)
            await close.wait()
            discovery.cancel_scope.cancel()


def _discovery_endpoints(table: CompiledTable) -> tuple[str, ...]:
    """Where `discovery` reads nodes: the table's `etcd`, else the etcd the
    table itself came from (docs/configuration.md "discovery")."""
    if table.etcd is not None:
        return table.etcd.endpoints
    return () if table.origin is None else table.origin.endpoints


def _saved_nodes(runtime_dir: Path | None, etcd: tuple[str, ...], prefix: str) -> Path | None:
    """Where a worker keeps the nodes discovered under `prefix`, for the
    worker that replaces it should etcd be down then (docs/configuration.md
    "discovery"): in the supervisor's private runtime directory, gone with it.
    A gateway of one process has none (it is not restarted on its own)."""
    if runtime_dir is None:
        return None
    name = hashlib.sha256(repr((etcd, prefix)).encode()).hexdigest()[:32]
    return runtime_dir / "discovery" / name


def longest_timeout(table: CompiledTable) -> float:
    """How long a request that started on `table` may still run, and a second:
    when its retired pools may close."""
    timeouts = [spec.timeout for spec in table.upstreams.values()]
    timeouts += [c.timeout for c in table.commands if c.timeout is not None]
    return max(timeouts, default=0.0) + 1.0

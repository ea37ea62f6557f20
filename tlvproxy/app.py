"""The gateway in one process: the composition of its parts (tlvproxy/gateway/)
and the servers.

Owns: the `Runtime` of each loaded table (pools, rate limits, WAF,
authenticators, traffic rules) and swapping it on reload, what the admin
listener reads and drives, the descriptor budget of client connections, the
order things start in, and the drain sequence (docs/operations.md "Reload",
"Drain"). Its parts own the rest: the listening sockets and the connections
they accept, the upstream pools, the certificates, the rate-limit stores and
the key sets fetched from URLs.
Must not: parse HTTP, frames or YAML; it wires the modules that do.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import generate_latest

from tlvproxy.auth.authenticators import Authenticators
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.gateway.certificates import ServingCertificates
from tlvproxy.gateway.connections import ClientConnections, ParserChoice
from tlvproxy.gateway.key_sets import RemoteKeySets, keys_wanted
from tlvproxy.gateway.listeners import address_of, bind_listener
from tlvproxy.gateway.pools import PoolHandle, UpstreamPools, longest_timeout
from tlvproxy.gateway.stores import RedisStores, open_local_store
from tlvproxy.metrics import RequestTally
from tlvproxy.policy.waf import Waf
from tlvproxy.server.access_log import AccessLog
from tlvproxy.server.admin import AdminHandler, admin_error
from tlvproxy.server.admission import (
    MAX_ADMIN_CONNECTIONS,
    MAX_REFUSING,
    SPARE_DESCRIPTORS,
    Admission,
    Doorkeeper,
    descriptor_budget,
    log_capacity,
    open_descriptors,
    raise_descriptor_limit,
    upstream_reserve,
)
from tlvproxy.server.handoff import DESCRIPTORS as HANDOFF_DESCRIPTORS
from tlvproxy.server.handoff import Handoff
from tlvproxy.server.http_answers import ReadyAnswers
from tlvproxy.server.http_conn import (
    DeadlineTimer,
    DrainSignal,
)
from tlvproxy.server.push_http import PushEndpoints
from tlvproxy.server.push_sessions import PushSessions
from tlvproxy.server.read_hub import ReadHub
from tlvproxy.server.rest import RestHandler, error_response_for
from tlvproxy.server.traffic import CommandTraffic, Traffic
from tlvproxy.server.websocket import WebSocketSessions
from tlvproxy.stores.limits import RateLimits
from tlvproxy.stores.local_batches import LocalChecks
from tlvproxy.upstream.connection import Sender

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import Address, UpstreamSpec
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.ratelimit import ProcessBuckets
    from tlvproxy.upstream.pool import Pool

log = logging.getLogger("tlvproxy.app")


@attrs.frozen
class Runtime:
    """Everything a request needs of one loaded table; replaced whole on reload."""

    table: CompiledTable
    pools: Mapping[str, Pool]
    limiter: RateLimits
    waf: Waf
    auth: Authenticators
    traffic: Mapping[str, CommandTraffic]


class Gateway:
    """One worker's gateway. `run()` serves until `drain()` finishes."""

    def __init__(
        self,
        table: CompiledTable,
        metrics: Metrics,
        *,
        http_parser: ParserChoice | None = None,
        reuse_port: bool = False,
        serve_admin: bool = True,
        load: Callable[[], CompiledTable] | None = None,
        runtime_dir: Path | None = None,
        worker: int = 0,
    ) -> None:
        """`runtime_dir`: where the `store: local` rate limits live, shared with
        the other workers of the gateway (the supervisor's), and where the
        workers pass each other the requests of their push sessions; None: a
        store of this gateway's own (`open_local_store`), and every push
        session is this process's. `worker`: this worker's index."""
        self.metrics = metrics
        self._runtime_dir = runtime_dir
        self._local: LocalChecks | ProcessBuckets | None = None
        self._redis = RedisStores()
        self._initial = table
        # How a reload loads the table (docs/operations.md "Reload"): the
        # table file again by default.
        self._load = load
        self._parser_override = http_parser
        self._reuse_port = reuse_port
        self._serve_admin = serve_admin
        self._runtime: Runtime | None = None
        self._key_sets = RemoteKeySets()
        self._reload_lock = trio.Lock()
        self.shutdown = trio.Event()  # set when draining starts
        self.ready = False
        self.http_address: Address | None = None
        self.https_address: Address | None = None
        # The certificates new TLS handshakes use: the latest table's (a table
        # without `tls` leaves a bound https listener on the last ones).
        self._certificates = ServingCertificates(metrics)
        self.admin_address: Address | None = None
        self._drain_requested = trio.Event()
        self._drain_signal = DrainSignal()  # wakes idle keep-alive connections to close
        self.websockets = WebSocketSessions()  # the drain closes them with 1001
        self._timer = DeadlineTimer()  # fires every connection's time limits
        # Writes the answers that other tasks set, after their scheduler pass.
        self._ready_answers = ReadyAnswers()
        # Waits for every idle client connection's next request, in one task.
        self._read_hub = ReadHub()
        # Writes the frames upstream connections queued, after their scheduler
        # pass; a worker's, so that sessions outlive the pool they came from.
        self._sender = Sender()
        self._pools = UpstreamPools(metrics, self._timer, self._sender, runtime_dir)
        # REST requests are counted in plain numbers and published with each
        # batch of access records, once per scheduler pass.
        self.tally = RequestTally(metrics)
        self.access_log = AccessLog(tally=self.tally)
        # Mirrored copies in flight and `last_good` answers, across reloads
        # (docs/configuration.md "split, mirror, fallback").
        self.traffic = Traffic(metrics)
        # Connection limits and descriptors (docs/operations.md "Connections and
        # file descriptors"): counted once per connection, never per request.
        self._admission = Admission(budget=0)  # the budget is set once listening
        self._descriptor_limit = 0
        self._descriptors_at_start: int | None = None
        # Push sessions (docs/push-sessions.md): this worker's, and, with
        # workers, the way to the others' (the drain closes them).
        self.push_sessions = PushSessions(metrics, self._admission, worker)
        self._handoff = (
            None if runtime_dir is None else Handoff(runtime_dir, worker, self._admission)
        )

    # ------------------------------------------------------------ the table

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "the gateway is not running"
        return self._runtime

    def current(self) -> Runtime:
        """The runtime of the current table (once running); read per request."""
        return self._runtime  # type: ignore[return-value]  # set by _install before serving

    # ------------------------------------------------------------ admin backend

    @property
    def table(self) -> CompiledTable:
        return self.runtime.table

    def metrics_exposition(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def upstream_states(self) -> dict[str, Any]:
        return {
            name: {
                "balance": pool.spec.balance,
                "discovery": pool.spec.discovery,
                "nodes": [attrs.asdict(state) for state in pool.node_states()],
            }
            for name, pool in self.runtime.pools.items()
        }

    async def reload(self, path: Path | None = None) -> str:
        """Load the table again from disk and swap it in; returns its version.

        Raises TableError with every problem; the running table stays
        (docs/operations.md "Reload").
        """
        async with self._reload_lock:
            load = self._load
            if path is not None or load is None:
                source = path or self.runtime.table.source
                assert source is not None, "a table loaded from text cannot be reloaded"
                load = partial(load_table, source)
            try:
                table = await trio.to_thread.run_sync(load)
            except Exception:
                self.metrics.config_reloads.labels("error").inc()
                raise
            await self._install(table)
            self.metrics.config_reloads.labels("ok").inc()
            log.info("table reloaded", extra={"version": table.version})
            return table.version

    async def replace(self, table: CompiledTable) -> None:
        """Swap in `table`, loaded by the caller (a change read from etcd), as
        a reload does."""
        async with self._reload_lock:
            await self._install(table)
            self.metrics.config_reloads.labels("ok").inc()
        log.info("table from etcd installed", extra=_described(table))

    def refused(self, error: TableError) -> None:
        """A change read from etcd did not load: counted and logged; the
        running table stays."""
        self.metrics.config_reloads.labels("error").inc()
        log.error(
            "a table from etcd did not load; the running table stays",
            extra={"errors": error.problems},
        )

    async def _install(self, table: CompiledTable) -> None:
        for warning in table.warnings:
            log.warning("the table has a warning (see tlvproxy check)", extra={"warning": warning})
        old = self._runtime
        keep, retired = await self._pools.build(table, self._pool_nursery)
        if (
            old is not None
            and old.table.rate_limits == table.rate_limits
            and old.table.redis == table.redis
        ):
            limiter = old.limiter
        else:
            limiter = RateLimits(
                table.rate_limits,
                self.metrics,
                local=self._local,
                redis=await self._redis.for_url(
                    None if table.redis is None else table.redis.url, self._pool_nursery
                ),
            )
        waf = old.waf if old is not None and old.table.waf == table.waf else Waf(table.waf)
        remote = await self._key_sets.start(table, self._pool_nursery)
        authenticators = Authenticators(
            table.auth,
            self.metrics,
            lambda spec: remote[keys_wanted(spec)],
            None if old is None else old.auth,
        )
        self._pools.handles = keep
        if table.certificates is not None:
            self._certificates.install(table.certificates)
        # Retired pools keep their connections until _retire closes them.
        self._update_budget([handle.spec for handle in (*keep.values(), *retired)])
        self.metrics.config_revision.set(0 if table.origin is None else table.origin.revision)
        pools = {name: handle.pool for name, handle in keep.items()}
        self._runtime = Runtime(
            table=table,
            pools=pools,
            limiter=limiter,
            waf=waf,
            auth=authenticators,
            traffic=self.traffic.for_table(table, pools),
        )
        if retired and old is not None:
            # Requests that started on the old table finish on it
            # (docs/operations.md "Reload"); none can outlive its longest upstream
            # timeout, so retire pools after that.
            self._pool_nursery.start_soon(self._retire, retired, longest_timeout(old.table))

    async def _retire(self, handles: list[PoolHandle], delay: float) -> None:
        await trio.sleep(delay)
        for handle in handles:
            handle.close.set()
        self._update_budget([handle.spec for handle in self._pools.handles.values()])

    def _update_budget(self, upstreams: Iterable[UpstreamSpec]) -> None:
        """Set how many descriptors client connections may hold: what the limit
        leaves once those open at start and the reserve are taken."""
        if self._descriptors_at_start is None:
            return  # not listening yet: `run` sets it
        reserve = upstream_reserve(upstreams) + MAX_REFUSING + SPARE_DESCRIPTORS
        if self._serve_admin:
            reserve += MAX_ADMIN_CONNECTIONS
        if self._handoff is not None:
            reserve += HANDOFF_DESCRIPTORS
        self._admission.budget = descriptor_budget(
            self._descriptor_limit, self._descriptors_at_start, reserve
        )

    # ------------------------------------------------------------ serving

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained: bind, report readiness, then run every connection.

        Drain (docs/operations.md "Drain"): stop accepting, /readyz answers 503,
        in-flight requests get up to shutdown_timeout, idle keep-alive connections
        close, WebSocket sessions close with 1001, push sessions end.
        """
        # Opened here, in the process that uses it: LMDB must not cross a fork.
        local = self._local = open_local_store(self._runtime_dir)
        try:
            await self._serve(task_status)
        finally:
            if isinstance(local, LocalChecks):
                local.buckets.close()
        log.info("gateway stopped")

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        table = self._initial
        self._descriptor_limit = raise_descriptor_limit()
        async with trio.open_nursery() as pool_nursery:
            self._pool_nursery = pool_nursery
            accepting = ClientConnections(
                self.current,
                self.metrics,
                self._admission,
                Doorkeeper(pool_nursery),
                timer=self._timer,
                ready_answers=self._ready_answers,
                read_hub=self._read_hub,
                drain_signal=self._drain_signal,
                websockets=self.websockets,
                certificates=self._certificates,
                http_parser=self._parser_override,
            )
            # In the outermost nursery: it outlives every connection, drain included.
            pool_nursery.start_soon(self._timer.run)
            await pool_nursery.start(self._sender.run)
            await pool_nursery.start(self._ready_answers.run)
            await pool_nursery.start(self._read_hub.run)
            pool_nursery.start_soon(self.access_log.run)
            pool_nursery.start_soon(self.traffic.run)
            if isinstance(self._local, LocalChecks):
                pool_nursery.start_soon(self._local.run)
            pool_nursery.start_soon(self._certificates.run)
            await self._install(table)
            listeners: list[tuple[trio.SocketListener, bool]] = []  # (listener, tls)
            if table.listen.http is not None:
                listeners.append(
                    (bind_listener(table.listen.http, reuse_port=self._reuse_port), False)
                )
                self.http_address = address_of(listeners[-1][0])
            if table.listen.https is not None:
                listeners.append(
                    (bind_listener(table.listen.https, reuse_port=self._reuse_port), True)
                )
                self.https_address = address_of(listeners[-1][0])
            admin_listener = None
            if self._serve_admin and table.listen.admin is not None:
                admin_listener = bind_listener(table.listen.admin, reuse_port=False)
                self.admin_address = address_of(admin_listener)
            self._descriptors_at_start = open_descriptors()
            self._update_budget([handle.spec for handle in self._pools.handles.values()])
            log_capacity(
                self._descriptor_limit,
                self._descriptors_at_start,
                self._admission.budget,
                table.limits,
            )
            push = PushEndpoints(self.push_sessions, self.metrics, self._handoff)
            rest = RestHandler(self.current, self.metrics, self.access_log, self.tally, push)
            # In the outermost nursery: queued requests are worked on through the drain.
            pool_nursery.start_soon(rest.run)
            errors = error_response_for(self.current, self.metrics)
            async with trio.open_nursery() as admin_nursery:
                if admin_listener is not None:
                    admin = AdminHandler(self, bound=address_of(admin_listener))
                    admin_nursery.start_soon(
                        accepting.accept, admin_listener, admin, admin_error, False, admin_nursery
                    )
                async with trio.open_nursery() as connections:
                    await connections.start(self.push_sessions.run)
                    if self._handoff is not None:
                        await connections.start(
                            self._handoff.serve,
                            connections,
                            accepting.door,
                            partial(accepting.serve_handed, rest, errors),
                            accepting.handoff_bytes,
                        )
                    for listener, tls in listeners:
                        connections.start_soon(
                            accepting.accept, listener, rest, errors, True, connections, tls
                        )
                    self.ready = True
                    log.info(
                        "gateway listening",
                        extra={
                            "http": str(self.http_address),
                            "https": str(self.https_address),
                            "admin": str(self.admin_address),
                            "version": table.version,
                        },
                    )
                    task_status.started()
                    await self._drain_requested.wait()
                    self.ready = False
                    for listener, _ in listeners:
                        await listener.aclose()
                    if self._handoff is not None:
                        self._handoff.close()
                    connections.cancel_scope.deadline = (
                        trio.current_time() + self.runtime.table.shutdown_timeout
                    )
                if connections.cancel_scope.cancelled_caught:
                    log.warning(
                        "shutdown_timeout passed; the remaining connections were closed",
                        extra={"shutdown_timeout": self.runtime.table.shutdown_timeout},
                    )
                admin_nursery.cancel_scope.cancel()
            pool_nursery.cancel_scope.cancel()

    def drain(self) -> None:
        """Start the graceful drain; `run()` returns when it is done.

        Connections see the drain at once (a request head parsed after this call
        gets 503); `run()` then closes the listener and sets the deadline.
        """
        self.ready = False
        self.shutdown.set()
        self._drain_signal.set()
        self.websockets.drain()
        self.push_sessions.drain()
        self._drain_requested.set()


def _described(table: CompiledTable) -> dict[str, Any]:
    """A table's version, and its etcd revision when it has one, for a log record."""
    extra: dict[str, Any] = {"version": table.version}
    if table.origin is not None:
        extra["revision"] = table.origin.revision
    return extra

"""The gateway in one process: the current table, its pools and policy, the listeners.

Owns: the `Runtime` of each loaded table (pools, rate limits, WAF), swapping it
on reload, the rate-limit stores (the local one in the runtime directory, one
per Redis URL), the HTTP and admin listeners, and the drain sequence
(docs/operations.md "Reload", "Drain").
Must not: parse HTTP, frames or YAML; it wires the modules that do.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio
from prometheus_client import generate_latest

from tlvproxy.auth.authenticators import Authenticators
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.errors import Overloaded
from tlvproxy.gateway.certificates import ServingCertificates
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
    Refusal,
    closing_answer,
    counted_address,
    descriptor_budget,
    log_capacity,
    open_descriptors,
    raise_descriptor_limit,
    refuse,
    upstream_reserve,
)
from tlvproxy.server.handoff import DESCRIPTORS as HANDOFF_DESCRIPTORS
from tlvproxy.server.handoff import MAX_LEFTOVER, Handoff
from tlvproxy.server.http_conn import (
    DeadlineTimer,
    DrainSignal,
    ErrorHandler,
    Handler,
    HttpSettings,
    Request,
    Submitter,
    serve_http_connection,
)
from tlvproxy.server.parser_choice import resolve_parser_name
from tlvproxy.server.push_http import PushEndpoints
from tlvproxy.server.push_sessions import PushSessions
from tlvproxy.server.rest import RestHandler, error_response_for, render_error, request_id_of
from tlvproxy.server.tls import handshake
from tlvproxy.server.traffic import CommandTraffic, Traffic
from tlvproxy.server.view import client_address
from tlvproxy.server.websocket import WebSocketSessions, serve_websocket
from tlvproxy.stores.limits import RateLimits
from tlvproxy.stores.local_store import LocalBuckets

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping
    from pathlib import Path

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import Address, UpstreamSpec
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.ratelimit import ProcessBuckets
    from tlvproxy.upstream.pool import Pool

log = logging.getLogger("tlvproxy.app")

ParserChoice = Literal["auto", "h11", "httptools"]


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
        self._local: LocalBuckets | ProcessBuckets | None = None
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
        self._pools = UpstreamPools(metrics, self._timer, runtime_dir)
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
        self._admin_connections = 0
        # The WebSocket sessions admitted, by their stream: the client address
        # each counts against when a trusted proxy forwarded it, else None.
        self._session_addresses: dict[trio.abc.Stream, str | None] = {}
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

    def _settings(self, table: CompiledTable) -> HttpSettings:
        parser = resolve_parser_name(self._parser_override or table.http_parser)
        return HttpSettings.from_limits(table.limits, parser)

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
            if isinstance(local, LocalBuckets):
                local.close()
        log.info("gateway stopped")

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        table = self._initial
        self._descriptor_limit = raise_descriptor_limit()
        async with trio.open_nursery() as pool_nursery:
            self._pool_nursery = pool_nursery
            self._door = Doorkeeper(pool_nursery)
            # In the outermost nursery: it outlives every connection, drain included.
            pool_nursery.start_soon(self._timer.run)
            pool_nursery.start_soon(self.access_log.run)
            pool_nursery.start_soon(self.traffic.run)
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
            errors = error_response_for(self.current, self.metrics)
            async with trio.open_nursery() as admin_nursery:
                if admin_listener is not None:
                    admin = AdminHandler(self, bound=address_of(admin_listener))
                    admin_nursery.start_soon(
                        self._accept, admin_listener, admin, admin_error, False, admin_nursery
                    )
                async with trio.open_nursery() as connections:
                    await connections.start(self.push_sessions.run)
                    if self._handoff is not None:
                        await connections.start(
                            self._handoff.serve,
                            connections,
                            self._door,
                            partial(self._serve_handed, rest, errors),
                            self._handoff_bytes,
                        )
                    for listener, tls in listeners:
                        connections.start_soon(
                            self._accept, listener, rest, errors, True, connections, tls
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

    async def _accept(
        self,
        listener: trio.SocketListener,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        public: bool,
        nursery: trio.Nursery,
        tls: bool = False,
    ) -> None:
        """Accept connections on `listener` until it closes: serve each one the
        limits admit (over TLS when `tls`), answer the others 503 `overloaded`
        (docs/operations.md "Connections and file descriptors"), or on the TLS
        listener close them: a handshake is the very work an overload must not
        buy."""
        while (accepted := await self._door.accept(listener)) is not None:
            stream, peer = accepted
            refusal: Refusal | None
            if public:
                table = self.runtime.table
                counted = counted_address(peer, table.trusted_proxies)
                refusal = self._admission.admit(counted, table.limits)
                if refusal is None:
                    nursery.start_soon(
                        self._serve_connection, stream, peer, counted, handler, errors, tls
                    )
                    continue
                if tls:
                    self._door.log_refusal(refusal, peer, answered=False)
                    stream.socket.close()
                    continue
            elif self._admin_connections < MAX_ADMIN_CONNECTIONS:
                self._admin_connections += 1
                nursery.start_soon(self._serve_admin_connection, stream, peer, handler, errors)
                continue
            else:
                refusal = Refusal(
                    "admin_connections",
                    f"the admin listener holds {MAX_ADMIN_CONNECTIONS} connections; "
                    "try again later",
                )
            answer = closing_answer(errors(Overloaded(refusal.message), None))
            self._door.refuse(nursery, stream, peer, refusal, answer)

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        peer: str,
        counted: str | None,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        tls: bool,
        received: bytes = b"",
    ) -> None:
        """Serve one admitted client connection, after a TLS handshake when
        `tls`; `counted` is the address it counts against (`counted_address`),
        released when it ends. `received`: what another worker read of it."""
        served: trio.abc.Stream = stream
        try:
            table = self.runtime.table
            if tls:
                certificates = self._certificates.current
                assert certificates is not None  # listen.https needs tls
                # The handshake has header_timeout, as the first request after
                # it does (docs/configuration.md "limits").
                deadline = trio.current_time() + table.limits.header_timeout
                wrapped = await handshake(
                    stream, peer, certificates, deadline, self.metrics, errors
                )
                if wrapped is None:
                    return
                served = wrapped
            upgrade = self._upgrade if table.websocket is not None else None
            await serve_http_connection(
                served,
                peer,
                self._settings(table),
                handler,
                errors,
                upgrade=upgrade,
                drain_signal=self._drain_signal,
                timer=self._timer,
                received=received,
            )
        finally:
            sessions = self._session_addresses
            if sessions and served in sessions:
                self._admission.release_session(sessions.pop(served))
            self._admission.release(counted)

    async def _serve_handed(
        self,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        stream: trio.SocketStream,
        peer: str,
        received: bytes,
    ) -> None:
        """Serve a connection another worker passed on for a push session of
        this one, as one accepted here (docs/push-sessions.md "Workers")."""
        table = self.runtime.table
        counted = counted_address(peer, table.trusted_proxies)
        refusal = self._admission.admit(counted, table.limits)
        if refusal is not None:
            answer = closing_answer(errors(Overloaded(refusal.message), None))
            await self._door.refuse_here(stream, peer, refusal, answer)
            return
        await self._serve_connection(stream, peer, counted, handler, errors, False, received)

    def _handoff_bytes(self) -> int:
        """The most request bytes one handoff may carry: a whole request and
        what may follow it."""
        limits = self.runtime.table.limits
        return limits.max_header_bytes + limits.max_request_body + MAX_LEFTOVER + 1024

    async def _serve_admin_connection(
        self,
        stream: trio.SocketStream,
        peer: str,
        handler: Handler | Submitter,
        errors: ErrorHandler,
    ) -> None:
        # The admin listener keeps answering while draining: /readyz must say
        # 503 to the load balancer until the process exits (docs/operations.md "Drain").
        try:
            await serve_http_connection(
                stream, peer, self._settings(self.runtime.table), handler, errors, timer=self._timer
            )
        finally:
            self._admin_connections -= 1

    def _upgrade(
        self, request: Request, stream: trio.abc.Stream, leftover: bytes
    ) -> Awaitable[None]:
        # A session holds a second descriptor, its upstream connection: admitted
        # here, released by _serve_connection. Through a trusted proxy it also
        # counts against the client the proxy forwarded.
        table = self.runtime.table
        address = None
        trusted = table.trusted_proxies
        if trusted and counted_address(request.remote_addr, trusted) is None:
            address = client_address(request.remote_addr, request.headers, trusted)
        refusal = self._admission.admit_session(address, table.limits)
        if refusal is not None:
            self._door.log_refusal(refusal, address or request.remote_addr)
            error = Overloaded(refusal.message)
            answer = render_error(error, request_id_of(request), envelope=False)
            return refuse(stream, closing_answer(answer))
        self._session_addresses[stream] = address
        # Returns the session's coroutine rather than awaiting it: no frame of
        # this method stays with every idle WebSocket session.
        return serve_websocket(
            request,
            stream,
            leftover,
            runtime=self.runtime,
            metrics=self.metrics,
            sessions=self.websockets,
        )


def _described(table: CompiledTable) -> dict[str, Any]:
    """A table's version, and its etcd revision when it has one, for a log record."""
    extra: dict[str, Any] = {"version": table.version}
    if table.origin is not None:
        extra["revision"] = table.origin.revision
    return extra

"""The gateway in one process: the current table, its pools and policy, the listeners.

Owns: the `Runtime` of each loaded table (pools, rate limiter, WAF), swapping it
on reload, the HTTP and admin listeners, and the drain sequence (SPEC 7).
Must not: parse HTTP, frames or YAML; it wires the modules that do.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio
from prometheus_client import generate_latest

from tlvproxy.auth.authenticators import Authenticators
from tlvproxy.auth.remote_keys import RemoteKeys
from tlvproxy.config.loader import load_table
from tlvproxy.config.model import Address, JwtAuthSpec, Table, UpstreamSpec
from tlvproxy.metrics import RequestTally
from tlvproxy.policy.ratelimit import RateLimiter
from tlvproxy.policy.waf import Waf
from tlvproxy.server.access_log import AccessLog
from tlvproxy.server.admin import AdminHandler, admin_error
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
from tlvproxy.server.parsers import resolve_parser_name
from tlvproxy.server.rest import RestHandler, error_response_for
from tlvproxy.server.websocket import WebSocketSessions, serve_websocket
from tlvproxy.upstream.pool import Pool, open_pool

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping
    from pathlib import Path

    from tlvproxy.framing import HeaderLayout
    from tlvproxy.metrics import Metrics

log = logging.getLogger("tlvproxy.app")

ParserChoice = Literal["auto", "h11", "httptools"]

_BACKLOG = 1024


@attrs.frozen
class Runtime:
    """Everything a request needs of one loaded table; replaced whole on reload."""

    table: Table
    pools: Mapping[str, Pool]
    limiter: RateLimiter
    waf: Waf
    auth: Authenticators


# A key set URL is fetched once for every authenticator that reads it the same way.
_KeysWanted = tuple[str, tuple[str, ...], float]


def _keys_wanted(spec: JwtAuthSpec) -> _KeysWanted:
    return (spec.keys, spec.algorithms, spec.refresh)


@attrs.frozen
class _PoolHandle:
    spec: UpstreamSpec
    layout: HeaderLayout
    pool: Pool
    close: trio.Event


def bind_listener(address: Address, *, reuse_port: bool) -> trio.SocketListener:
    """A listening socket on `address`; SO_REUSEPORT lets workers share a port (SPEC 7)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # bind() on a trio socket is synchronous for numeric addresses.
        sock._sock.bind((address.host, address.port))  # type: ignore[attr-defined]  # trio hides the stdlib socket; binding a numeric address never blocks
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class Gateway:
    """One worker's gateway. `run()` serves until `drain()` finishes."""

    def __init__(
        self,
        table: Table,
        metrics: Metrics,
        *,
        http_parser: ParserChoice | None = None,
        reuse_port: bool = False,
        serve_admin: bool = True,
    ) -> None:
        self.metrics = metrics
        self._initial = table
        self._parser_override = http_parser
        self._reuse_port = reuse_port
        self._serve_admin = serve_admin
        self._runtime: Runtime | None = None
        self._pools: dict[str, _PoolHandle] = {}
        # The key set URLs of the current table's `jwt` authenticators, fetched
        # by a task each, kept across reloads that keep them.
        self._remote_keys: dict[_KeysWanted, tuple[RemoteKeys, trio.CancelScope]] = {}
        self._reload_lock = trio.Lock()
        self.shutdown = trio.Event()  # set when draining starts
        self.ready = False
        self.http_address: Address | None = None
        self.admin_address: Address | None = None
        self._drain_requested = trio.Event()
        self._drain_signal = DrainSignal()  # wakes idle keep-alive connections to close
        self.websockets = WebSocketSessions()  # the drain closes them with 1001
        self._timer = DeadlineTimer()  # fires every connection's time limits
        # REST requests are counted in plain numbers and published with each
        # batch of access records, once per scheduler pass.
        self.tally = RequestTally(metrics)
        self.access_log = AccessLog(tally=self.tally)

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
    def table(self) -> Table:
        return self.runtime.table

    def metrics_exposition(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def upstream_states(self) -> dict[str, Any]:
        return {
            name: {
                "balance": pool.spec.balance,
                "nodes": [attrs.asdict(state) for state in pool.node_states()],
            }
            for name, pool in self.runtime.pools.items()
        }

    async def reload(self, path: Path | None = None) -> str:
        """Load the table again from disk and swap it in; returns its version.

        Raises TableError with every problem; the running table stays (SPEC 6, 7).
        """
        async with self._reload_lock:
            source = path or self.runtime.table.source
            assert source is not None, "a table loaded from text cannot be reloaded"
            try:
                table = await trio.to_thread.run_sync(load_table, source)
            except Exception:
                self.metrics.config_reloads.labels("error").inc()
                raise
            await self._install(table)
            self.metrics.config_reloads.labels("ok").inc()
            log.info("table reloaded", extra={"version": table.version})
            return table.version

    async def _install(self, table: Table) -> None:
        for warning in table.warnings:
            log.warning("the table has a warning (see tlvproxy check)", extra={"warning": warning})
        old = self._runtime
        keep: dict[str, _PoolHandle] = {}
        retired: list[_PoolHandle] = []
        for name, handle in self._pools.items():
            spec = table.upstreams.get(name)
            if spec == handle.spec and table.framing == handle.layout:
                keep[name] = handle
            else:
                retired.append(handle)
        for name, spec in table.upstreams.items():
            if name not in keep:
                keep[name] = await self._pool_nursery.start(self._run_pool, spec, table.framing)
        limiter = (
            old.limiter
            if old is not None and old.table.rate_limits == table.rate_limits
            else RateLimiter(table.rate_limits)
        )
        waf = old.waf if old is not None and old.table.waf == table.waf else Waf(table.waf)
        remote = await self._start_remote_keys(table)
        authenticators = Authenticators(
            table.auth,
            self.metrics,
            lambda spec: remote[_keys_wanted(spec)],
            None if old is None else old.auth,
        )
        self._pools = keep
        self._runtime = Runtime(
            table=table,
            pools={name: handle.pool for name, handle in keep.items()},
            limiter=limiter,
            waf=waf,
            auth=authenticators,
        )
        if retired and old is not None:
            # Requests that started on the old table finish on it (SPEC 7); none
            # can outlive its longest upstream timeout, so retire pools after that.
            self._pool_nursery.start_soon(self._retire, retired, _longest_timeout(old.table))

    async def _start_remote_keys(self, table: Table) -> dict[_KeysWanted, RemoteKeys]:
        """The key sets `table` fetches from URLs: those already fetched are kept,
        new ones fetched once before the table is used, the others stopped."""
        wanted = {
            _keys_wanted(spec): spec
            for spec in table.auth.values()
            if isinstance(spec, JwtAuthSpec) and spec.remote
        }
        for key, spec in wanted.items():
            if key not in self._remote_keys:
                self._remote_keys[key] = await self._pool_nursery.start(self._run_remote_keys, spec)
        for key in [key for key in self._remote_keys if key not in wanted]:
            _, scope = self._remote_keys.pop(key)
            scope.cancel()
        return {key: keys for key, (keys, _) in self._remote_keys.items()}

    @staticmethod
    async def _run_remote_keys(
        spec: JwtAuthSpec,
        *,
        task_status: trio.TaskStatus[
            tuple[RemoteKeys, trio.CancelScope]
        ] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        keys = RemoteKeys(spec.keys, spec.algorithms, spec.refresh)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(keys.run)
                task_status.started((keys, scope))

    async def _run_pool(
        self,
        spec: UpstreamSpec,
        layout: HeaderLayout,
        *,
        task_status: trio.TaskStatus[_PoolHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        close = trio.Event()
        async with open_pool(spec, layout, self.metrics, self._timer) as pool:
            task_status.started(_PoolHandle(spec=spec, layout=layout, pool=pool, close=close))
            await close.wait()

    @staticmethod
    async def _retire(handles: list[_PoolHandle], delay: float) -> None:
        await trio.sleep(delay)
        for handle in handles:
            handle.close.set()

    # ------------------------------------------------------------ serving

    def _settings(self, table: Table) -> HttpSettings:
        parser = resolve_parser_name(self._parser_override or table.http_parser)
        return HttpSettings.from_limits(table.limits, parser)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained: bind, report readiness, then run every connection.

        Drain (SPEC 7): stop accepting, /readyz answers 503, in-flight requests get
        up to shutdown_timeout, idle keep-alive connections close, WebSocket
        sessions close with 1001.
        """
        table = self._initial
        async with trio.open_nursery() as pool_nursery:
            self._pool_nursery = pool_nursery
            # In the outermost nursery: it outlives every connection, drain included.
            pool_nursery.start_soon(self._timer.run)
            pool_nursery.start_soon(self.access_log.run)
            await self._install(table)
            http_listener = bind_listener(table.listen.http, reuse_port=self._reuse_port)
            self.http_address = _address_of(http_listener)
            admin_listener = None
            if self._serve_admin and table.listen.admin is not None:
                admin_listener = bind_listener(table.listen.admin, reuse_port=False)
                self.admin_address = _address_of(admin_listener)
            rest = RestHandler(self.current, self.metrics, self.access_log, self.tally)
            errors = error_response_for(self.current, self.metrics)
            async with trio.open_nursery() as admin_nursery:
                if admin_listener is not None:
                    admin = AdminHandler(self, bound=_address_of(admin_listener))
                    admin_nursery.start_soon(
                        self._accept, admin_listener, admin, admin_error, False, admin_nursery
                    )
                async with trio.open_nursery() as connections:
                    connections.start_soon(
                        self._accept, http_listener, rest, errors, True, connections
                    )
                    self.ready = True
                    log.info(
                        "gateway listening",
                        extra={
                            "http": str(self.http_address),
                            "admin": str(self.admin_address),
                            "version": table.version,
                        },
                    )
                    task_status.started()
                    await self._drain_requested.wait()
                    self.ready = False
                    await http_listener.aclose()
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
        log.info("gateway stopped")

    def drain(self) -> None:
        """Start the graceful drain; `run()` returns when it is done.

        Connections see the drain at once (a request head parsed after this call
        gets 503); `run()` then closes the listener and sets the deadline.
        """
        self.ready = False
        self.shutdown.set()
        self._drain_signal.set()
        self.websockets.drain()
        self._drain_requested.set()

    async def _accept(
        self,
        listener: trio.SocketListener,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        public: bool,
        nursery: trio.Nursery,
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning (hypercorn does the same).
                log.warning("accept failed", extra={"error": str(exc)})
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_connection, stream, handler, errors, public)

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        public: bool,
    ) -> None:
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        table = self.runtime.table
        if not public:
            # The admin listener keeps answering while draining: /readyz must say
            # 503 to the load balancer until the process exits (SPEC 7).
            await serve_http_connection(
                stream, peer, self._settings(table), handler, errors, timer=self._timer
            )
            return
        upgrade = self._upgrade if table.websocket is not None else None
        await serve_http_connection(
            stream,
            peer,
            self._settings(table),
            handler,
            errors,
            upgrade=upgrade,
            drain_signal=self._drain_signal,
            timer=self._timer,
        )

    def _upgrade(
        self, request: Request, stream: trio.abc.Stream, leftover: bytes
    ) -> Awaitable[None]:
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


def _longest_timeout(table: Table) -> float:
    timeouts = [spec.timeout for spec in table.upstreams.values()]
    timeouts += [c.timeout for c in table.commands if c.timeout is not None]
    return max(timeouts, default=0.0) + 1.0


def _address_of(listener: trio.SocketListener) -> Address:
    host, port = listener.socket.getsockname()[:2]
    return Address(host, port)

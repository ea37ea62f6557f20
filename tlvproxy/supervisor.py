"""The supervisor of N worker processes (docs/operations.md "Workers").

Owns: the worker processes (SO_REUSEPORT on the HTTP port, restarts with
backoff, signal fan-out: SIGHUP reloads, SIGTERM/SIGINT drain, a second one
forces the exit), the supervisor's admin listener, and what supervisor and
workers agree on (the environment variables and exit code below).

With several workers the supervisor serves the admin listener itself: /metrics
sums every worker through prometheus-client's multiprocess mode (the workers
write to a shared PROMETHEUS_MULTIPROC_DIR), /admin/reload validates the table
and then sends SIGHUP to every worker. A worker tells the supervisor it listens
by writing its table version to a pipe (READY_FD_ENV): /readyz waits for every
worker, and a worker that started on an older table is sent SIGHUP at once.

With `serve --etcd` (docs/operations.md "Running a fleet") the supervisor's
process watches etcd (serving.py) and hands each checked revision to
`Supervisor.replace`, so every worker loads the revision checked there
(`RunDirSource`). The workers' `store: local` rate limits, and the sockets on
which they pass each other the requests of their push sessions, live in a
runtime directory the supervisor makes and removes (RUNTIME_DIR_ENV), new for
each start.
Must not: handle REST or WebSocket traffic, or run a gateway itself
(serving.py runs one per process).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from tlvproxy.config.loader import TableError
from tlvproxy.config.model import Address
from tlvproxy.gateway.listeners import bind_listener
from tlvproxy.metrics import Metrics
from tlvproxy.private_dirs import make_private_dir
from tlvproxy.server.admin import AdminHandler, admin_error
from tlvproxy.server.http_conn import HttpSettings, serve_http_connection

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from prometheus_client import Metric

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import UpstreamSpec
    from tlvproxy.etcd.tables import TableTarget
    from tlvproxy.gateway.connections import ParserChoice

log = logging.getLogger("tlvproxy.supervisor")

_RESTART_BACKOFF_MIN = 0.5
_RESTART_BACKOFF_MAX = 30.0
_STABLE_AFTER = 10.0  # a worker that ran this long resets the backoff
_REPORT_GRACE = 1.0  # seconds to read a worker's last report after it exited

# The environment variable naming the pipe a worker reports readiness on.
READY_FD_ENV = "TLVPROXY_READY_FD"
# A pipe whose write end only the supervisor holds: EOF on it tells a worker that
# its supervisor is gone (even SIGKILLed), so it drains instead of living on.
LIFELINE_FD_ENV = "TLVPROXY_LIFELINE_FD"
# The environment variable naming the directory the workers share their
# `store: local` rate-limit buckets in (docs/configuration.md "Where the buckets live").
RUNTIME_DIR_ENV = "TLVPROXY_RUNTIME_DIR"
# A worker's exit code when it cannot bind its listener: restarting it would
# not help, so the supervisor stops instead (and `serve` exits 1). The worker
# writes why on its readiness pipe, after this mark, for the supervisor to say
# once for all its workers.
EXIT_CANNOT_LISTEN = 3
LISTEN_FAILED = "!"


def _listed(
    name: str, spec: UpstreamSpec, health: dict[tuple[str, str], bool]
) -> list[tuple[str, int | None]]:
    """(address, weight) of the nodes of upstream `name` to list."""
    if spec.discovery is None:
        return [(str(node.address), node.weight) for node in spec.nodes]
    return sorted((address, None) for upstream, address in health if upstream == name)


class _WorkerMetrics:
    """The workers' metrics summed from their multiprocess files, without the
    reload counter: the supervisor counts reloads once, not once per worker.

    A worker makes a file the first time it uses a kind of metric (its first
    request makes its histogram file), and the file is empty until the worker
    sizes it. prometheus-client fails on an empty file, which failed /metrics
    and /admin/config with 500 when they came at that moment; such a file
    holds no value yet, so it is left out of the sum.
    """

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def collect(self) -> Iterator[Metric]:
        files = [str(f) for f in self._path.glob("*.db") if f.stat().st_size >= _HEADER]
        for family in multiprocess.MultiProcessCollector.merge(files):  # type: ignore[no-untyped-call]  # prometheus_client.multiprocess is unannotated
            if family.name != _RELOADS:
                yield family


_HEADER = 8  # prometheus-client's multiprocess file: bytes used (4), padding (4)


class _Only:
    """The families of `registry` named in `names`."""

    def __init__(self, registry: CollectorRegistry, names: frozenset[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name in self._names:
                yield family


_RELOADS = "tlvproxy_config_reloads"


class Supervisor:
    """Keeps N worker processes running and serves the admin listener for them."""

    def __init__(
        self,
        load: Callable[[], CompiledTable],
        table: CompiledTable,
        workers: int,
        *,
        worker_args: list[str],
        http_parser: ParserChoice | None,
        log_level: str,
    ) -> None:
        self._load = load  # the workers' table source, loaded here to check it
        self._worker_args = worker_args  # how a worker finds it
        self._table = table
        self._count = workers
        self._http_parser = http_parser
        self._log_level = log_level
        self._processes: dict[int, trio.Process] = {}
        self._ready: set[int] = set()  # indexes of workers that listen
        self._stopping = trio.Event()
        self._forced = False  # a second signal killed the workers: exit 1
        self._failed = False  # a worker could not listen: exit 1
        self._listen_failure = ""  # why, as the worker reported it
        self._reload_lock = trio.Lock()
        self._metrics = Metrics()  # the supervisor's own: the reload counter
        self._metrics_dir = ""
        self._runtime_dir = ""
        self._registry = CollectorRegistry()

    # ------------------------------------------------------------ admin backend

    @property
    def ready(self) -> bool:
        return not self._stopping.is_set() and len(self._ready) == self._count

    @property
    def table(self) -> CompiledTable:
        return self._table

    def metrics_exposition(self) -> bytes:
        return generate_latest(self._registry)

    def upstream_states(self) -> dict[str, Any]:
        health: dict[tuple[str, str], bool] = {}
        for family in self._registry.collect():
            if family.name == "tlvproxy_upstream_node_healthy":
                for sample in family.samples:
                    key = (sample.labels["upstream"], sample.labels["node"])
                    health[key] = sample.value >= 1
        # Each worker discovers nodes on its own: a discovered upstream lists
        # the nodes the workers report on (one that left, unhealthy),
        # without weights (docs/operations.md "Discovery").
        return {
            name: {
                "balance": spec.balance,
                "discovery": spec.discovery,
                "nodes": [
                    {"address": address, "weight": weight, "healthy": health.get((name, address))}
                    for address, weight in _listed(name, spec, health)
                ],
            }
            for name, spec in self._table.upstreams.items()
        }

    async def reload(self) -> str:
        """Validate the table here, then have every worker load it (SIGHUP)."""
        async with self._reload_lock:
            try:
                table = await trio.to_thread.run_sync(self._load)
            except TableError:
                self._metrics.config_reloads.labels("error").inc()
                raise
            self._tell_workers(table)
            log.info("table reloaded; workers told", extra={"version": table.version})
            return table.version

    async def replace(self, table: CompiledTable) -> None:
        """Have every worker run `table`, read from etcd and made `current` in
        the run directory, which is where a worker's reload loads from."""
        async with self._reload_lock:
            self._tell_workers(table)
        log.info(
            "table from etcd loaded; workers told",
            extra={"version": table.version, "revision": table.origin and table.origin.revision},
        )

    def refused(self, error: TableError) -> None:
        """A change read from etcd did not load: the workers keep their table."""
        self._metrics.config_reloads.labels("error").inc()
        log.error(
            "a table from etcd did not load; the workers keep theirs",
            extra={"errors": error.problems},
        )

    def _tell_workers(self, table: CompiledTable) -> None:
        self._table = table
        for index in self._ready:
            self._signal(index, signal.SIGHUP)
        self._metrics.config_reloads.labels("ok").inc()

    # ------------------------------------------------------------ running

    async def run(self, follow: Callable[[TableTarget], Awaitable[None]] | None = None) -> int:
        """Run the workers until drained; `follow(self)` runs meanwhile (the
        watch of the table in etcd). Returns the exit code."""
        # Before any worker starts, a taken port fails the start (CannotListen).
        # The workers bind the HTTP and HTTPS ports with SO_REUSEPORT, which
        # would share them with another process listening the same way (another
        # gateway's workers): binding each here once without it finds any holder.
        for address in (self._table.listen.http, self._table.listen.https):
            if address is not None:
                bind_listener(address, reuse_port=False).socket.close()
        admin = None
        if self._table.listen.admin is not None:
            admin = bind_listener(self._table.listen.admin, reuse_port=False)
        self._metrics_dir = str(make_private_dir("metrics"))
        self._runtime_dir = str(make_private_dir("run"))
        self._registry.register(_WorkerMetrics(self._metrics_dir))
        self._registry.register(_Only(self._metrics.registry, frozenset({_RELOADS})))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._handle_signals)
                if admin is not None:
                    nursery.start_soon(self._serve_admin, admin)
                if follow is not None:
                    nursery.start_soon(follow, self)
                async with trio.open_nursery() as workers:
                    for index in range(self._count):
                        workers.start_soon(self._keep_worker, index)
                nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        log.info("all workers stopped")
        return 1 if self._forced or self._failed else 0

    def _command(self, index: int) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "tlvproxy",
            "serve",
            *self._worker_args,
            "--log-level",
            self._log_level,
            "--worker-index",
            str(index),
        ]
        if self._http_parser:
            command += ["--http-parser", self._http_parser]
        return command

    async def _keep_worker(self, index: int) -> None:
        backoff = _RESTART_BACKOFF_MIN
        while not self._stopping.is_set():
            started = trio.current_time()
            code = await self._run_worker(index)
            if self._stopping.is_set():
                return
            if code == EXIT_CANNOT_LISTEN:
                # A restart would fail the same way. One line says where and why
                # for every worker; the others are stopped (docs/operations.md
                # "Workers").
                self._failed = True
                log.error(self._listen_failure or "a worker cannot listen", extra={"worker": index})
                self._stop()
                return
            log.error("worker died; restarting", extra={"worker": index, "exit_code": code})
            if trio.current_time() - started > _STABLE_AFTER:
                backoff = _RESTART_BACKOFF_MIN
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)

    async def _run_worker(self, index: int) -> int:
        """Run worker `index` once; returns its exit code."""
        read_end, write_end = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
            RUNTIME_DIR_ENV: self._runtime_dir,
            READY_FD_ENV: str(write_end),
            LIFELINE_FD_ENV: str(lifeline_read),
        }
        try:
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only,
            # which forwards it once (a second SIGINT would force the exit).
            process = await trio.lowlevel.open_process(
                self._command(index),
                env=env,
                start_new_session=True,
                pass_fds=(write_end, lifeline_read),
            )
        except BaseException:
            os.close(read_end)
            os.close(lifeline_write)
            raise
        finally:
            os.close(write_end)
            os.close(lifeline_read)
        self._processes[index] = process
        log.info("worker started", extra={"worker": index, "worker_pid": process.pid})
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, index, trio.lowlevel.FdStream(read_end))
                code = await process.wait()
                # The pipe ends with the worker: what it wrote just before
                # exiting (why it cannot listen) is read first, within a bound.
                nursery.cancel_scope.deadline = trio.current_time() + _REPORT_GRACE
        finally:
            os.close(lifeline_write)
            self._ready.discard(index)
            del self._processes[index]
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]  # unannotated, as above
        return code

    async def _await_ready(self, index: int, pipe: trio.lowlevel.FdStream) -> None:
        async with pipe:
            version = b""
            while chunk := await pipe.receive_some():
                version += chunk
        if not version:
            return  # the worker exited before it listened
        if version.startswith(LISTEN_FAILED.encode()):
            self._listen_failure = version[len(LISTEN_FAILED) :].decode(errors="replace")
            return
        self._ready.add(index)
        if self._stopping.is_set():
            self._signal(index, signal.SIGTERM)
        elif version.decode() != self._table.version:
            # It loaded the table before a reload the others were told about.
            self._signal(index, signal.SIGHUP)

    def _signal(self, index: int, signum: int) -> None:
        process = self._processes.get(index)
        if process is not None:
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                return

    def _stop(self) -> None:
        """Drain every worker; none is restarted any more."""
        self._stopping.set()
        # A worker that does not listen yet has no signal handler;
        # it is told when it reports ready (_await_ready).
        for index in self._ready:
            self._signal(index, signal.SIGTERM)

    async def _handle_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        await self.reload()
                    except TableError as exc:
                        log.error(
                            "reload failed; workers keep their table",
                            extra={"errors": exc.problems},
                        )
                elif not self._stopping.is_set():
                    log.info("draining workers", extra={"signal": signal.Signals(signum).name})
                    self._stop()
                else:
                    log.warning("second signal: killing the workers")
                    self._forced = True
                    for index in list(self._processes):
                        self._signal(index, signal.SIGKILL)

    async def _serve_admin(self, listener: trio.SocketListener) -> None:
        host, port = listener.socket.getsockname()[:2]
        handler = AdminHandler(self, bound=Address(host, port))
        limits = self._table.limits
        settings = HttpSettings(
            max_header_bytes=limits.max_header_bytes,
            max_request_body=limits.max_request_body,
            header_timeout=limits.header_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            parser="h11",
        )
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                try:
                    peer = stream.socket.getpeername()[0]
                except OSError:
                    await trio.aclose_forcefully(stream)
                    continue
                nursery.start_soon(
                    serve_http_connection, stream, peer, settings, handler, admin_error
                )

"""Running the gateway: one process, or a supervisor and N workers (SPEC 7).

Owns: signal handling (SIGHUP reloads, SIGTERM/SIGINT drain, a second one forces
the exit), the worker processes (SO_REUSEPORT on the HTTP port, restarts with
backoff, signal fan-out), and the supervisor's admin listener.

With several workers the supervisor serves the admin listener itself: /metrics
sums every worker through prometheus-client's multiprocess mode (the workers
write to a shared PROMETHEUS_MULTIPROC_DIR), /admin/reload validates the table
and then sends SIGHUP to every worker. Must not: handle REST or WebSocket traffic.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import trio

from tlvproxy.app import Gateway, ParserChoice, bind_listener
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.logs import setup_logging
from tlvproxy.metrics import Metrics
from tlvproxy.server.admin import AdminHandler, admin_error
from tlvproxy.server.http_conn import HttpSettings, serve_http_connection

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.model import Table

log = logging.getLogger("tlvproxy.supervisor")

_RESTART_BACKOFF_MIN = 0.5
_RESTART_BACKOFF_MAX = 30.0
_STABLE_AFTER = 10.0  # a worker that ran this long resets the backoff


def run_serve(
    config: Path,
    *,
    workers: int | None,
    http_parser: ParserChoice | None,
    log_level: str,
    worker_index: int | None = None,
) -> int:
    """`tlvproxy serve`: returns the exit code (0 after a drain, 1 if the table is bad)."""
    setup_logging(log_level)
    try:
        table = load_table(config)
    except TableError as exc:
        for problem in exc.problems:
            log.error("table error", extra={"problem": problem})
        return 1
    count = workers or table.workers
    if worker_index is not None:
        return trio.run(_serve_worker, table, http_parser, True)
    if count <= 1:
        return trio.run(_serve_worker, table, http_parser, False)
    supervisor = Supervisor(config, table, count, http_parser=http_parser, log_level=log_level)
    return trio.run(supervisor.run)


async def _serve_worker(table: Table, http_parser: ParserChoice | None, is_worker: bool) -> int:
    gateway = Gateway(
        table, Metrics(), http_parser=http_parser, reuse_port=is_worker, serve_admin=not is_worker
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, gateway, nursery.cancel_scope)
        await gateway.run()
        nursery.cancel_scope.cancel()
    return 0


async def _handle_signals(gateway: Gateway, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    version = await gateway.reload()
                except TableError as exc:
                    log.error(
                        "reload failed; the running table stays",
                        extra={"errors": exc.problems},
                    )
                else:
                    log.info("reload done", extra={"version": version})
            elif not gateway.shutdown.is_set():
                log.info("draining", extra={"signal": signal.Signals(signum).name})
                gateway.drain()
            else:
                log.warning("second signal: closing every connection now")
                scope.cancel()
                os._exit(1)


class Supervisor:
    """Keeps N worker processes running and serves the admin listener for them."""

    def __init__(
        self,
        config: Path,
        table: Table,
        workers: int,
        *,
        http_parser: ParserChoice | None,
        log_level: str,
    ) -> None:
        self._config = config
        self._table = table
        self._count = workers
        self._http_parser = http_parser
        self._log_level = log_level
        self._processes: dict[int, trio.Process] = {}
        self._stopping = trio.Event()
        self._metrics_dir = ""

    # ------------------------------------------------------------ admin backend

    @property
    def ready(self) -> bool:
        return not self._stopping.is_set() and len(self._processes) == self._count

    @property
    def table(self) -> Table:
        return self._table

    def metrics_exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]  # prometheus_client.multiprocess is unannotated
        return generate_latest(registry)

    def upstream_states(self) -> dict[str, Any]:
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]  # prometheus_client.multiprocess is unannotated
        health: dict[tuple[str, str], bool] = {}
        for family in registry.collect():
            if family.name == "tlvproxy_upstream_node_healthy":
                for sample in family.samples:
                    key = (sample.labels["upstream"], sample.labels["node"])
                    health[key] = sample.value >= 1
        return {
            name: {
                "balance": spec.balance,
                "nodes": [
                    {
                        "address": str(node.address),
                        "weight": node.weight,
                        "healthy": health.get((name, str(node.address))),
                    }
                    for node in spec.nodes
                ],
            }
            for name, spec in self._table.upstreams.items()
        }

    async def reload(self) -> str:
        table = await trio.to_thread.run_sync(load_table, self._config)
        self._table = table
        self._send_all(signal.SIGHUP)
        return table.version

    # ------------------------------------------------------------ running

    async def run(self) -> int:
        self._metrics_dir = tempfile.mkdtemp(prefix="tlvproxy-metrics-")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._handle_signals)
                async with trio.open_nursery() as workers:
                    for index in range(self._count):
                        workers.start_soon(self._keep_worker, index)
                    if self._table.listen.admin is not None:
                        nursery.start_soon(self._serve_admin)
                nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("all workers stopped")
        return 0

    async def _keep_worker(self, index: int) -> None:
        backoff = _RESTART_BACKOFF_MIN
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        command = [
            sys.executable,
            "-m",
            "tlvproxy",
            "serve",
            "-c",
            str(self._config),
            "--log-level",
            self._log_level,
            "--worker-index",
            str(index),
        ]
        if self._http_parser:
            command += ["--http-parser", self._http_parser]
        while not self._stopping.is_set():
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only,
            # which forwards it once (a second SIGINT would force the exit).
            process = await trio.lowlevel.open_process(command, env=env, start_new_session=True)
            self._processes[index] = process
            started = trio.current_time()
            log.info("worker started", extra={"worker": index, "worker_pid": process.pid})
            code = await process.wait()
            del self._processes[index]
            _mark_dead(process.pid)
            if self._stopping.is_set():
                return
            log.error("worker died; restarting", extra={"worker": index, "exit_code": code})
            if trio.current_time() - started > _STABLE_AFTER:
                backoff = _RESTART_BACKOFF_MIN
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)

    def _send_all(self, signum: int) -> None:
        for process in list(self._processes.values()):
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                continue

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
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
                    self._stopping.set()
                    self._send_all(signal.SIGTERM)
                else:
                    self._send_all(signal.SIGKILL)

    async def _serve_admin(self) -> None:
        assert self._table.listen.admin is not None
        listener = bind_listener(self._table.listen.admin, reuse_port=False)
        handler = AdminHandler(self)
        limits = self._table.limits
        settings = HttpSettings(
            max_header_bytes=limits.max_header_bytes,
            max_request_body=limits.max_request_body,
            header_timeout=limits.header_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            parser="h11",
        )
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                peer = stream.socket.getpeername()[0]
                nursery.start_soon(
                    serve_http_connection, stream, peer, settings, handler, admin_error
                )


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # unannotated, as above

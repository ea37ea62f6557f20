"""Serving: `tlvproxy serve` as one process, or as a supervisor of N workers,
and what each serving process does (docs/operations.md).

Owns: choosing between one process and a supervisor (`run_serve`), a
worker's life (its gateway; the signals it takes: SIGHUP reloads,
SIGTERM/SIGINT drain, a second one forces the exit; its readiness report on
the supervisor's pipe; draining when the supervisor is gone), the garbage
collector's settings once start-up is done (`tune_gc`), and `serve --etcd`'s
watch of the table, which hands each checked revision to the supervisor.
Must not: manage worker processes (supervisor.py does) or handle traffic
(app.py and the servers do).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from tlvproxy.app import Gateway
from tlvproxy.config.loader import TableError
from tlvproxy.config.source import FileSource, RunDirSource
from tlvproxy.errors import first_of
from tlvproxy.etcd.client import EtcdUnavailable, open_etcd
from tlvproxy.etcd.tables import EtcdTables
from tlvproxy.etcd.watch import TooManyKeys
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer
from tlvproxy.gateway.listeners import CannotListen
from tlvproxy.logs import setup_logging
from tlvproxy.metrics import Metrics
from tlvproxy.private_dirs import make_private_dir, remove_abandoned
from tlvproxy.supervisor import (
    EXIT_CANNOT_LISTEN,
    LIFELINE_FD_ENV,
    LISTEN_FAILED,
    READY_FD_ENV,
    RUNTIME_DIR_ENV,
    Supervisor,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.etcd.tables import TableTarget
    from tlvproxy.gateway.connections import ParserChoice

log = logging.getLogger("tlvproxy.supervisor")

# The cyclic garbage collector's thresholds in a serving process (CPython's
# default: 700, 10, 10). A request allocates and frees a few dozen container
# objects, almost none of them cyclic garbage; with requests in flight by the
# hundred the default ran a collection every few requests.
GC_THRESHOLDS = (20_000, 20, 20)


def run_serve(
    config: Path,
    *,
    workers: int | None,
    http_parser: ParserChoice | None,
    log_level: str,
    worker_index: int | None = None,
    etcd: str | None = None,
    etcd_prefix: str = "",
    etcd_run_dir: Path | None = None,
) -> int:
    """`tlvproxy serve`: returns the exit code (0 after a drain, 1 if the table is bad).

    With `etcd`, the table is the one kept under `etcd_prefix` (docs/operations.md
    "Running a fleet"); the workers of such a gateway load what its supervisor
    wrote into `etcd_run_dir`."""
    setup_logging(log_level)
    if worker_index is None:
        remove_abandoned()
    if etcd is not None:
        run_dir = make_private_dir("etcd")
        try:
            options = _Options(workers, http_parser, log_level)
            return _serving(
                None, partial(trio.run, _serve_etcd, etcd, etcd_prefix, run_dir, options)
            )
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    load = FileSource(config).load if etcd_run_dir is None else RunDirSource(etcd_run_dir).load
    try:
        table = load()
    except TableError as exc:
        _log_problems(exc)
        return 1
    count = workers or table.workers
    tune_gc()

    def start() -> int:
        if worker_index is not None:
            return trio.run(_serve_worker, table, load, http_parser, True, None, worker_index)
        if count <= 1:
            return trio.run(_serve_worker, table, load, http_parser, False)
        supervisor = Supervisor(
            load,
            table,
            count,
            worker_args=["-c", str(config)],
            http_parser=http_parser,
            log_level=log_level,
        )
        return trio.run(supervisor.run)

    return _serving(worker_index, start)


@attrs.frozen
class _Options:
    workers: int | None
    http_parser: ParserChoice | None
    log_level: str


def _serving(worker_index: int | None, start: Callable[[], int]) -> int:
    """`start()`, with a listener that cannot be bound told once (a worker
    tells its supervisor) and exit code 1 (EXIT_CANNOT_LISTEN for a worker)."""
    failure: CannotListen | None = None
    try:
        return start()
    except* CannotListen as group:
        failure = first_of(group)
    assert failure is not None  # every other way out of the try returned or raised
    if worker_index is not None:
        if not _report(LISTEN_FAILED + str(failure)):
            log.error(str(failure), extra={"address": str(failure.address)})
        return EXIT_CANNOT_LISTEN
    # One line naming the address and the reason, no traceback, and nothing
    # reported as ready (docs/operations.md "Starting").
    log.error(str(failure), extra={"address": str(failure.address)})
    return 1


def _reason(error: Exception, endpoint: str) -> str:
    """What `error` says, without naming `endpoint` a second time."""
    return str(error).removeprefix(f"etcd at {endpoint} ")


def _log_problems(error: TableError) -> None:
    for problem in error.problems:
        log.error("table error", extra={"problem": problem})


async def _serve_etcd(endpoint: str, prefix: str, run_dir: Path, options: _Options) -> int:
    """`serve --etcd`: read the table, then serve it (one process or a
    supervisor), following the prefix in this process (docs/operations.md
    "Running a fleet")."""
    async with open_etcd([endpoint]) as client:
        tables = EtcdTables(client, prefix, run_dir)
        try:
            table = await tables.first()
        except (EtcdUnavailable, EtcdRefused, MalformedAnswer, TooManyKeys) as exc:
            # A gateway with no table to serve does not start (docs/operations.md
            # "When etcd is down").
            log.error(
                f"cannot read the table from etcd at {endpoint}: {_reason(exc, endpoint)}",
                extra={"etcd": endpoint, "prefix": prefix},
            )
            return 1
        except TableError as exc:
            _log_problems(exc)
            return 1
        load = RunDirSource(run_dir).load
        count = options.workers or table.workers
        tune_gc()
        if count <= 1:
            return await _serve_worker(table, load, options.http_parser, False, tables.run)
        supervisor = Supervisor(
            load,
            table,
            count,
            worker_args=["--etcd-run-dir", str(run_dir)],
            http_parser=options.http_parser,
            log_level=options.log_level,
        )
        return await supervisor.run(tables.run)


def tune_gc() -> None:
    """Set the garbage collector up for serving, once start-up is done.

    What exists now (modules, descriptor pools, the table) lives as long as the
    process: `gc.freeze()` keeps full collections from scanning it again and
    again. Then `GC_THRESHOLDS`. On the json route (1 worker, wrk -c64) the two
    took CPU per request from 105.5 to 97.0 us.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _serve_worker(
    table: CompiledTable,
    load: Callable[[], CompiledTable],
    http_parser: ParserChoice | None,
    is_worker: bool,
    follow: Callable[[TableTarget], Awaitable[None]] | None = None,
    worker_index: int = 0,
) -> int:
    shared = os.environ.get(RUNTIME_DIR_ENV) if is_worker else None
    gateway = Gateway(
        table,
        Metrics(),
        http_parser=http_parser,
        reuse_port=is_worker,
        serve_admin=not is_worker,
        load=load,
        runtime_dir=None if shared is None else Path(shared),
        worker=worker_index,
    )
    async with trio.open_nursery() as nursery:
        # Signals are caught before the listeners open: a SIGTERM or SIGHUP that
        # arrives as soon as the port answers must drain or reload, not kill.
        await nursery.start(_handle_signals, gateway)
        await nursery.start(_run_gateway, gateway, nursery.cancel_scope)
        if follow is not None:
            nursery.start_soon(follow, gateway)
        if is_worker:
            _report(table.version)
            lifeline = os.environ.get(LIFELINE_FD_ENV)
            if lifeline is not None:
                nursery.start_soon(_drain_when_orphaned, gateway, int(lifeline))
    return 0


async def _drain_when_orphaned(gateway: Gateway, fd: int) -> None:
    async with trio.lowlevel.FdStream(fd) as lifeline:
        while await lifeline.receive_some():
            pass  # nothing is ever written; only EOF matters
    if not gateway.shutdown.is_set():
        log.warning("the supervisor is gone; draining")
        gateway.drain()


async def _run_gateway(
    gateway: Gateway,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await gateway.run(task_status=task_status)
    scope.cancel()


def _report(text: str) -> bool:
    """Tell the supervisor, once, that this worker listens (`text` is its table
    version) or why it cannot; False when there is no supervisor to tell."""
    fd = os.environ.get(READY_FD_ENV)
    if fd is None:
        return False
    try:
        os.write(int(fd), text.encode())
        os.close(int(fd))
    except (OSError, ValueError) as exc:
        # The supervisor is gone or the variable is not ours: serving goes on.
        log.warning("cannot report readiness", extra={"error": str(exc)})
        return False
    return True


async def _handle_signals(
    gateway: Gateway, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
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
                # A second signal forces the exit, whatever is still running
                # (docs/operations.md "Signals").
                log.warning("second signal: exiting now")
                logging.shutdown()
                os._exit(1)

"""The table kept in etcd, followed by one process per gateway
(docs/operations.md "Running a fleet").

Owns: the watch of `{prefix}/`, and for each change: checking the keys
(`config.stored`), writing them into a new directory of the run directory,
loading that table off the serving thread, and then either handing it to the
gateway (`TableTarget.replace`) after making it `current`, or reporting why it
did not load (`TableTarget.refused`), the running table staying. Old
directories are removed once nobody can be loading them.
Must not: swap tables or signal workers itself; the target does.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Final, Protocol

import trio

from tlvproxy.config.loader import TableError
from tlvproxy.config.source import write_current
from tlvproxy.config.stored import MAX_FILES, MAX_TOTAL, MAX_VALUE, load_stored, read_stored
from tlvproxy.etcd.watch import PrefixWatch

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.etcd.client import EtcdClient


# A revision's directory outlives the next table by this long: a worker told
# to load it (SIGHUP) has long read it by then.
_KEEP_OLD: Final = 300.0


class TableTarget(Protocol):
    """Who runs the tables read from etcd: one gateway, or the worker supervisor."""

    async def replace(self, table: CompiledTable) -> None:
        """Run `table` (already loaded, and `current` in the run directory)."""

    def refused(self, error: TableError) -> None:
        """A change under the prefix did not load; the running table stays."""


class EtcdTables:
    """The table under `prefix` (e.g. "/tlvproxy"), each revision written into
    a directory of `run_dir`."""

    def __init__(self, client: EtcdClient, prefix: str, run_dir: Path) -> None:
        self._client = client
        self.prefix = prefix
        self._run_dir = run_dir
        # The table and its files, and one more key to find out there are too many.
        # Values past MAX_VALUE are kept as oversize keys (read_stored names
        # them); values adding up to twice MAX_TOTAL are not kept at all:
        # between the two, read_stored reports the table too large.
        self._watch = PrefixWatch(
            client,
            f"{prefix}/".encode(),
            max_keys=MAX_FILES + 2,
            max_value=MAX_VALUE,
            max_total=2 * MAX_TOTAL,
        )
        self._made = 0
        self._current: str | None = None
        self._kept: list[tuple[str, float]] = []  # directories, and when they were replaced
        self._last_error = TableError(["no table read yet"])

    async def first(self) -> CompiledTable:
        """Read the prefix and load its table (the start of `serve --etcd`).

        Raises EtcdUnavailable, EtcdRefused, MalformedAnswer or TooManyKeys when
        etcd cannot be read, TableError when what it holds does not load."""
        await self._watch.read()
        table = await self._load()
        if table is None:
            raise self._last_error
        return table

    async def run(self, target: TableTarget) -> None:
        """Follow the prefix for ever, handing each new table to `target`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._watch.run)
            generation = self._watch.generation
            while True:
                generation = await self._watch.wait_changed(generation)
                table = await self._load()
                if table is None:
                    target.refused(self._last_error)
                else:
                    await target.replace(table)

    async def _load(self) -> CompiledTable | None:
        """Load the keys read last into a new directory and make it `current`;
        None when they do not load (`_last_error` says why)."""
        revision = self._watch.revision
        self._made += 1
        name = f"{self._made:06d}-r{revision}"
        directory = self._run_dir / name
        try:
            stored = read_stored(self.prefix, self._watch.keys.values())
            table = await trio.to_thread.run_sync(
                load_stored, stored, directory, self._client.endpoints
            )
            assert table.origin is not None  # load_stored sets it
            write_current(self._run_dir, name, table.origin)
        except (TableError, OSError) as exc:
            shutil.rmtree(directory, ignore_errors=True)
            self._last_error = (
                exc
                if isinstance(exc, TableError)
                else TableError([f"{directory}: cannot write the table: {exc}"])
            )
            return None
        self._retire(name)
        return table

    def _retire(self, current: str) -> None:
        now = trio.current_time()
        keep = []
        for name, replaced in self._kept:
            if now - replaced > _KEEP_OLD:
                shutil.rmtree(self._run_dir / name, ignore_errors=True)
            else:
                keep.append((name, replaced))
        if self._current is not None:
            keep.append((self._current, now))
        self._kept = keep
        self._current = current

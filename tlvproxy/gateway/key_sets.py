"""The key sets a table's `jwt` authenticators fetch from URLs
(docs/security.md "Authenticators", docs/configuration.md "auth").

Owns: one fetching task per key set URL (`RemoteKeys`), shared by every
authenticator that reads it the same way, kept across reloads that keep it
and stopped when a table no longer names it.
Must not: verify tokens (tlvproxy/auth does, with the keys fetched here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from tlvproxy.auth.remote_keys import RemoteKeys
from tlvproxy.config.model import JwtAuthSpec

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable

# A key set URL is fetched once for every authenticator that reads it the same way.
KeysWanted = tuple[str, tuple[str, ...], float]


def keys_wanted(spec: JwtAuthSpec) -> KeysWanted:
    """What tells the key sets of two authenticators apart: URL, algorithms, refresh."""
    return (spec.keys, spec.algorithms, spec.refresh)


class RemoteKeySets:
    """The key set URLs of the current table's `jwt` authenticators, fetched
    by a task each, kept across reloads that keep them."""

    def __init__(self) -> None:
        self._running: dict[KeysWanted, tuple[RemoteKeys, trio.CancelScope]] = {}

    async def start(
        self, table: CompiledTable, nursery: trio.Nursery
    ) -> dict[KeysWanted, RemoteKeys]:
        """The key sets `table` fetches from URLs: those already fetched are kept,
        new ones fetched once (in `nursery`) before the table is used, the others
        stopped."""
        wanted = {
            keys_wanted(spec): spec
            for spec in table.auth.values()
            if isinstance(spec, JwtAuthSpec) and spec.remote
        }
        for key, spec in wanted.items():
            if key not in self._running:
                self._running[key] = await nursery.start(self._run, spec)
        for key in [key for key in self._running if key not in wanted]:
            _, scope = self._running.pop(key)
            scope.cancel()
        return {key: keys for key, (keys, _) in self._running.items()}

    @staticmethod
    async def _run(
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

"""REST access records handed to `logging` in batches (docs/operations.md "Access records").

Owns: the access records of one process between the request that made them and
the `tlvproxy.access` logger. A request adds its record and goes on; `run()`
passes everything added during one pass of the scheduler to the logger, back to
back, their lines written together, then publishes the `RequestTally` (so the
REST metrics lag requests by at most one pass, too).
Must not: choose the record's fields (`logs.access_record`) or its format (the
handler `logs.setup_logging` installs; `logs.log_batch` writes its lines).

Why batches: a record formatted in between the rest of a request's work finds
the logging code cold in the CPU caches; formatted back to back it does not
(json route, 1 worker, wrk -c64 on the 2-core development box: about 155 ->
122 us of CPU per request). A record keeps the time it was added; at most one
scheduler pass separates it from its line, and `flush()` hands over what is
pending at once (`run()` does when it ends).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from tlvproxy.logs import ACCESS_LOGGER, log_batch
from tlvproxy.passes import PassSignal

if TYPE_CHECKING:
    from tlvproxy.metrics import RequestTally

# Bounds what waits when `run()` is not running (or is starved): past this many
# records, `add` flushes them itself.
MAX_PENDING = 1024


class AccessLog:
    """The REST access records of one process, waiting for the next batch."""

    def __init__(
        self, logger: logging.Logger | None = None, tally: RequestTally | None = None
    ) -> None:
        self._logger = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        self._tally = tally
        self._pending: list[tuple[float, dict[str, Any]]] = []
        self._wake = PassSignal()
        # `run` has ended (the gateway stops): a record is written when added.
        self._stopped = False

    def add(self, fields: dict[str, Any]) -> None:
        """Queue one record (`fields` become the record's attributes, as `extra`)."""
        pending = self._pending
        pending.append((time.time(), fields))
        if self._stopped or len(pending) >= MAX_PENDING:
            self.flush()
        elif len(pending) == 1:
            self._wake.set()

    def flush(self) -> None:
        """Hand every pending record to the logger now, oldest first, then
        publish the tally (if any)."""
        pending = self._pending
        try:
            if pending:
                self._pending = []
                log_batch(self._logger, "request", pending, pathname=__file__)
        finally:
            if self._tally is not None:
                self._tally.publish()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush after each scheduler pass that added records; forever, then once more."""
        task_status.started()
        try:
            await self._wake.each_pass(self.flush)
        finally:
            # The other tasks' last work (the REST task's last pass, say) may
            # add records after this: those are written as they come.
            self._stopped = True
            self.flush()

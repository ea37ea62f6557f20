"""What the fuzz targets that run the server share (fuzz_http.py, fuzz_websocket.py).

- `instrument_modules`: coverage for the modules worth steering by.
  `atheris.instrument_all()` patches every function already imported: fine
  for the decoder alone, minutes of start-up once trio, attrs and the rest
  are loaded.
- `GatewayLogs`: every record at WARNING or above from the gateway's loggers;
  the catch-alls log there ("HTTP connection from ... failed", "upgraded
  connection ... failed"), so a record is an exception that did not escape
  but should not have happened.
- `MemoryProbe`: the tracemalloc peak of a run. Tracing makes a run about
  four times slower, so by default runs are traced in blocks: 64 runs traced,
  then 192 not. Not one run in four: starting and stopping tracemalloc
  around each `trio.run` leaks some 10 KiB a time (seen with CPython 3.11
  and trio 0.35), gigabytes over a long run. The first block is traced, so a
  reproducer run alone is. FUZZ_MEMORY=all traces every run, FUZZ_MEMORY=off
  none.

Importing this module does not import atheris.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tracemalloc
import types
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterator


def instrument_modules(*prefixes: str) -> int:
    """Instrument every Python function of the loaded modules named `prefixes`
    (or within them: `prefix.` followed by anything); the count."""
    # Imported here: only a fuzzing run needs atheris.
    import atheris

    def wanted(module: object) -> bool:
        return isinstance(module, str) and any(
            module == prefix or module.startswith(prefix + ".") for prefix in prefixes
        )

    functions = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, types.FunctionType)
        and wanted(getattr(obj, "__module__", None))
        and obj.__module__ in sys.modules
    ]
    for function in functions:
        atheris.instrument_func(function)
    sys.stderr.write(f"INFO: instrumented {len(functions)} functions of {', '.join(prefixes)}\n")
    return len(functions)


class GatewayLogs(logging.Handler):
    """Every record at WARNING or above from the `tlvproxy` loggers, which it
    keeps from being printed; `install()` once, `records.clear()` per run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def install(self) -> None:
        logger = logging.getLogger("tlvproxy")
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # checked, not printed

    def problems(self) -> list[tuple[str, str | None]]:
        """(message, traceback) of each record kept."""
        formatter = logging.Formatter()
        return [
            (
                record.getMessage(),
                formatter.formatException(record.exc_info) if record.exc_info else None,
            )
            for record in self.records
        ]


@attrs.define
class Peak:
    """What one measured run allocated at its peak, over what was allocated
    before it; None when the run was not traced."""

    bytes: int | None = None


class MemoryProbe:
    """tracemalloc peaks of runs, traced in blocks (see the module docstring)."""

    BLOCK = 64  # runs traced in a row; then three times as many are not

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode if mode is not None else os.environ.get("FUZZ_MEMORY", "sample")
        if self.mode not in ("sample", "all", "off"):
            raise SystemExit(f"FUZZ_MEMORY={self.mode!r}: expected sample, all or off")
        self._runs = 0

    def restart(self) -> None:
        """Count blocks from here: the next run is the first of a traced block."""
        self._runs = 0

    def _traced(self) -> bool:
        if self.mode == "sample":
            traced = (self._runs // self.BLOCK) % 4 == 0
            self._runs += 1
            return traced
        return self.mode == "all"

    @contextlib.contextmanager
    def measure(self, *, force: bool = False) -> Iterator[Peak]:
        """Trace the block if this run is one to trace (or `force`); the Peak
        is filled once it ends."""
        peak = Peak()
        traced = self._traced() or force
        if not traced:
            if tracemalloc.is_tracing():
                tracemalloc.stop()  # the end of a traced block
            yield peak
            return
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            yield peak
        finally:
            peak.bytes = tracemalloc.get_traced_memory()[1] - before

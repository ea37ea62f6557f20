"""JSON logging set-up and the access record's shape (SPEC 7).

Owns: the stdout JSON-lines handler (python-json-logger) and the field names of
access records. Must not: decide what is logged; callers do.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pythonjsonlogger.core import LogData

ACCESS_LOGGER = "tlvproxy.access"


class _Formatter(OrjsonFormatter):
    """python-json-logger's orjson formatter (6.5 us per access record, against
    10.3 us for its json-module one), falling back to the json module for what
    orjson refuses: text holding a lone surrogate, which a JSON body's "\\ud800"
    can carry into a record. Such a record is written with \\u escapes, not lost.
    """

    _second: tuple[int, str] = (-1, "")  # a second, and its local time as text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """`logging.Formatter.formatTime`, the text of each second made once: the
        records of a batch mostly share it, and strftime is a fifth of a record's
        formatting."""
        msec_format = self.default_msec_format
        if datefmt is not None or msec_format is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (
                second,
                time.strftime(self.default_time_format, self.converter(second)),
            )
        return msec_format % (cached[1], record.msecs)

    def jsonify_log_record(self, log_data: LogData) -> str:
        try:
            return super().jsonify_log_record(log_data)
        except orjson.JSONEncodeError:
            return json.dumps(log_data, default=self.json_default)


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message, pid, then extras."""
    return _Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"pid": os.getpid()},
    )


class LineHandler(logging.Handler):
    """Each record as one line of UTF-8 on a file descriptor (stdout).

    Inside `holding()`, lines wait and go out when it ends, in as few writes as
    possible (`AccessLog` holds them while it hands over a batch of records).
    Every write holds whole lines and at most PIPE_BUF bytes, unless one line is
    longer: a write that size to a pipe is atomic (POSIX), so the lines of
    workers sharing one stdout pipe never interleave.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._lines: list[bytes] = []
        self._held = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "backslashreplace") + b"\n"
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        if not self._held:
            self.flush()

    def flush(self) -> None:
        """Write the lines waiting, if any."""
        with self.lock:  # type: ignore[union-attr]  # Handler.__init__ creates it
            lines = self._lines
            self._lines = []
        if not lines:
            return
        try:
            for chunk in whole_line_chunks(lines, select.PIPE_BUF):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError:
            # stdout is gone or broken: say so on stderr, as logging does.
            self.handleError(logging.makeLogRecord({"msg": "writing log lines failed"}))

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Keep lines until the block ends, then write them together."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self.flush()


def whole_line_chunks(lines: list[bytes], limit: int) -> Iterator[bytes]:
    """`lines` joined into chunks of whole lines of at most `limit` bytes each
    (a longer line is a chunk of its own)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > limit:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


@contextmanager
def holding_lines(logger: logging.Logger) -> Iterator[None]:
    """Hold every `LineHandler` that `logger`'s records reach (see `holding`)."""
    with ExitStack() as stack:
        current: logging.Logger | None = logger
        while current is not None:
            for handler in current.handlers:
                if isinstance(handler, LineHandler):
                    stack.enter_context(handler.holding())
            current = current.parent if current.propagate else None
        yield


def setup_logging(level: str = "info") -> None:
    """Send every tlvproxy log record to stdout as one JSON object per line."""
    # The logging HOWTO's "Optimization" switches: no record needs the caller's
    # source line, thread or process name (the pid is a static field), and
    # collecting them costs ~4 us per access record, a request's hot path.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(sys.stdout.fileno())
    handler.setFormatter(json_formatter())
    root = logging.getLogger("tlvproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def access_record(
    *,
    request_id: str,
    client_ip: str,
    method: str,
    path: str,
    route: str | None,
    command: int | None,
    node: str | None,
    status: int,
    upstream_status: int | None,
    duration_ms: float,
) -> dict[str, Any]:
    """The `extra` of one REST access record, with the SPEC 7 field names."""
    return {
        "request_id": request_id,
        "client_ip": client_ip,
        "method": method,
        "path": path,
        "route": route,
        "command": None if command is None else f"0x{command:04x}",
        "upstream_node": node,
        "status": status,
        "upstream_status": upstream_status,
        "duration_ms": round(duration_ms, 3),
    }

"""JSON logging set-up and the access record's shape (docs/operations.md "Logs").

Owns: the stdout JSON-lines handler (python-json-logger), the field names of
access records, and `log_batch`, which writes a batch of records as the handler
would, without a LogRecord each. Must not: decide what is logged; callers do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Final

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from pythonjsonlogger.core import LogData

    from tlvproxy.auth.identity import Identity

ACCESS_LOGGER = "tlvproxy.access"


# Every attribute a LogRecord has, plus the two `makeRecord` also refuses as `extra`.
_RECORD_ATTRIBUTES: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# Bounds the extra names a formatter remembers as written unchanged (see `_plain`).
_MAX_PLAIN_NAMES = 256

# The options `lines` passes orjson: python-json-logger's OrjsonFormatter's
# (OPT_NON_STR_KEYS) less that one, which changes nothing when every key is a
# str (`lines` writes no other) but costs 0.2 us per line; plus the newline.
_STR_KEYS_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE


class _Formatter(OrjsonFormatter):
    """python-json-logger's orjson formatter (6.5 us per access record, against
    10.3 us for its json-module one), falling back to the json module for what
    orjson refuses: text holding a lone surrogate, which a JSON body's "\\ud800"
    can carry into a record. Such a record is written with \\u escapes, not lost.

    Its fields are fixed here, so that `lines` can make the same line without
    a LogRecord: time, level, logger, message, pid, then the record's extras.
    """

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"pid": os.getpid()},
        )
        # A second, and its local time as text; at first none (NaN equals no second).
        self._second: tuple[float, str] = (math.nan, "")
        self._plain_names: set[str] = set()
        # Each millisecond's part of the time text: `default_msec_format` starts
        # with the second's text ("%s,%03d"), so the whole is text + part.
        msec_format = self.default_msec_format
        assert msec_format is not None
        assert msec_format.startswith("%s")
        self._msec_texts = tuple(msec_format % ("", msecs) for msecs in range(1000))
        # The same, as JSON string content (digits and a comma: nothing to escape).
        self._msec_json = tuple(text.encode() for text in self._msec_texts)
        # The fields `format` writes before the extras.
        self._head_names = frozenset({"time", "level", "logger", "message", *self.static_fields})

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

    def lines(
        self,
        name: str,
        msg: str,
        batch: Sequence[tuple[float, dict[str, Any]]],
        out: list[bytes],
        fallback: Callable[[float, dict[str, Any]], bytes | None],
    ) -> None:
        """Append to `out` the line `LineHandler` writes for each (time, extra)
        of `batch`, made as an INFO record of logger `name` saying `msg` at that
        time with those extras: the same bytes as `format` (the same dict, in
        the same order, through orjson) without making a LogRecord.

        A record this cannot write (an extra `format` would drop, rename or
        refuse; one orjson refuses) is `fallback`'s: its line or None.
        """
        # The fields `format` writes before the extras (`add_fields`): its
        # required fields renamed, then the static ones.
        level = logging.getLevelName(logging.INFO)
        message = str(msg)  # LogRecord.getMessage without args
        static = self.static_fields
        msec_format = self.default_msec_format
        assert msec_format is not None  # logging.Formatter's, which __init__ keeps
        msec_texts = self._msec_texts
        time_format = self.default_time_format
        converter = self.converter
        default = self.json_default
        dumps = orjson.dumps
        plain = self._plain_names
        second, second_text = self._second
        # What a line holds before its extras, as JSON text: the time, less its
        # milliseconds and closing quote, and the other fields with their commas.
        # A record without an extra of their names is written as that text and
        # its extras' object: the same bytes as the one dict, without making it.
        second_json = dumps(second_text)[:-1]
        msec_json = self._msec_json
        try:
            head: bytes | None = dumps(
                {"level": level, "logger": name, "message": message, **static}
            )[1:-1]
        except orjson.JSONEncodeError:
            # A name or message orjson refuses: each line goes through the
            # dict, and to `fallback`.
            head = None
        head_names = self._head_names
        try:
            for created, extra in batch:
                if not plain.issuperset(extra) and not self._plain(extra):
                    line = fallback(created, extra)
                    if line is not None:
                        out.append(line)
                    continue
                # `formatTime` with the msecs LogRecord.__init__ computes.
                whole = int(created)
                if whole != second:
                    second = whole
                    second_text = time.strftime(time_format, converter(whole))
                    second_json = dumps(second_text)[:-1]
                msecs = int((created - whole) * 1000)  # below 0 before 1970
                try:
                    if head is not None and msecs >= 0 and head_names.isdisjoint(extra):
                        text = dumps(extra, default=default, option=_STR_KEYS_OPTIONS)
                        out.append(
                            b'{"time":'
                            + second_json
                            + msec_json[msecs]
                            + b'",'
                            + head
                            + (b"," + text[1:] if extra else b"}\n")
                        )
                        continue
                    if msecs >= 0:
                        stamp = second_text + msec_texts[msecs]
                    else:
                        stamp = msec_format % (second_text, msecs)
                    data = {
                        "time": stamp,
                        "level": level,
                        "logger": name,
                        "message": message,
                        **static,
                        **extra,
                    }
                    out.append(dumps(data, default=default, option=_STR_KEYS_OPTIONS))
                except orjson.JSONEncodeError:
                    line = fallback(created, extra)
                    if line is not None:
                        out.append(line)
        finally:
            self._second = (second, second_text)

    def _plain(self, extra: dict[str, Any]) -> bool:
        """Whether `format` writes every extra of `extra` under its own str name:
        not one it drops (`_private`, reserved, required) or that makeRecord
        refuses (a LogRecord attribute). Remembers the names that are."""
        skip = self._skip_fields
        for name in extra:
            if (
                type(name) is not str
                or name.startswith("_")
                or name in skip
                or name in _RECORD_ATTRIBUTES
            ):
                return False
        if len(self._plain_names) < _MAX_PLAIN_NAMES:
            self._plain_names.update(extra)
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message, pid, then extras."""
    return _Formatter()


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
        line = self.line(record)
        if line is None:
            return
        self._lines.append(line)
        if not self._held:
            self.flush()

    def line(self, record: logging.LogRecord) -> bytes | None:
        """`record` formatted as the line `emit` writes, or None when formatting
        failed (reported through `handleError`, as `emit` does)."""
        try:
            return self.format(record).encode("utf-8", "backslashreplace") + b"\n"
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)
            return None

    def write_lines(self, lines: list[bytes]) -> None:
        """Write `lines`, each ending with a newline, as if emitted one by one."""
        with self.lock:  # type: ignore[union-attr]  # Handler.__init__ creates it
            self._lines.extend(lines)
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


def log_batch(
    logger: logging.Logger,
    msg: str,
    batch: Sequence[tuple[float, dict[str, Any]]],
    *,
    pathname: str,
) -> None:
    """Log `msg` at INFO once per (time, extra) of `batch`, oldest first, as
    `logger.info(msg, extra=extra)` called at that time from `pathname` would;
    the lines are written together (`holding_lines`).

    When the records would reach one handler only, a `LineHandler` formatting
    with `json_formatter()`, nothing is made per record but its line (see
    `_Formatter.lines`). Otherwise each record is a LogRecord handed to
    `logger.handle`, so other handlers (a test's caplog) receive LogRecords.
    Raises KeyError for an extra named as a LogRecord attribute, as
    `makeRecord` does; the records before it are logged.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _only_line_handler(logger)
    if handler is None:
        with holding_lines(logger):
            for created, extra in batch:
                logger.handle(_make_record(logger, msg, created, extra, pathname))
        return
    formatter = handler.formatter
    assert isinstance(formatter, _Formatter)  # checked by _only_line_handler

    def fallback(created: float, extra: dict[str, Any]) -> bytes | None:
        return handler.line(_make_record(logger, msg, created, extra, pathname))

    lines: list[bytes] = []
    try:
        formatter.lines(logger.name, msg, batch, lines, fallback)
    finally:
        handler.write_lines(lines)


def _only_line_handler(logger: logging.Logger) -> LineHandler | None:
    """The one handler `logger.handle` would give an INFO record to, if it is
    a `LineHandler` formatting with `json_formatter()` and nothing on the way
    (a filter, another record factory or Logger class) could change the record
    or its line; else None."""
    if (
        logger.disabled
        or logger.filters
        or logging.getLogRecordFactory() is not logging.LogRecord
        or type(logger).makeRecord is not logging.Logger.makeRecord
    ):
        return None
    # Logger.callHandlers' walk: a handler whose level is above INFO skips the record.
    reached: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        reached.extend(h for h in current.handlers if h.level <= logging.INFO)
        current = current.parent if current.propagate else None
    if len(reached) != 1:
        return None  # none: logging's lastResort decides; several: each gets the record
    [handler] = reached
    if (
        type(handler) is not LineHandler
        or handler.filters
        or type(handler.formatter) is not _Formatter
    ):
        return None
    return handler


def _make_record(
    logger: logging.Logger, msg: str, created: float, extra: dict[str, Any], pathname: str
) -> logging.LogRecord:
    """The INFO record `logger.info(msg, extra=extra)` makes, dated `created`."""
    record = logger.makeRecord(logger.name, logging.INFO, pathname, 0, msg, (), None, extra=extra)
    # The same arithmetic as LogRecord.__init__.
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


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
    identity: Identity | None = None,
) -> dict[str, Any]:
    """The `extra` of one REST access record, with its field names and the
    verified identity's when there is one (docs/operations.md "Access records")."""
    record: dict[str, Any] = {
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
    if identity is not None:
        record.update(identity.log_fields())
    return record

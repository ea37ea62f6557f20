"""The JSON log line: its fields, records orjson alone could not write, how
lines reach stdout, and `log_batch`'s lines made without a LogRecord each."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlvproxy.logs import (
    LineHandler,
    access_record,
    holding_lines,
    json_formatter,
    log_batch,
    whole_line_chunks,
)


def _record(**extra: object) -> logging.LogRecord:
    logger = logging.getLogger("tlvproxy.access")
    return logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, "request", (), None, extra=extra
    )


def test_a_line_holds_time_level_logger_message_pid_and_the_extras():
    fields = access_record(
        request_id="r-1",
        client_ip="127.0.0.1",
        method="POST",
        path="/v1/é",
        route="echo",
        command=0x1001,
        node="127.0.0.1:9000",
        status=200,
        upstream_status=0,
        duration_ms=1.23456,
    )
    line = json_formatter().format(_record(**fields))
    assert "\n" not in line
    value = json.loads(line)
    assert value.pop("time")
    assert value.pop("pid") > 0
    assert value == {
        "level": "INFO",
        "logger": "tlvproxy.access",
        "message": "request",
        **fields,
        "command": "0x1001",
        "duration_ms": 1.235,
    }


def test_a_lone_surrogate_is_written_escaped_not_lost():
    line = json_formatter().format(_record(body_excerpt="a\ud800b"))
    line.encode("utf-8")  # writable to a UTF-8 stdout
    assert json.loads(line)["body_excerpt"] == "a\ud800b"


def test_an_exception_is_written_with_its_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    logger = logging.getLogger("tlvproxy.http")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), info)
    value = json.loads(json_formatter().format(record))
    assert "ValueError: boom" in value["exc_info"]


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_line_handler_writes_each_record_as_a_json_line(pipe):
    read_fd, write_fd = pipe
    handler = LineHandler(write_fd)
    handler.setFormatter(json_formatter())
    handler.handle(_record(request_id="a"))
    handler.handle(_record(request_id="b"))
    lines = _read(read_fd).splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["a", "b"]


def test_held_lines_wait_for_the_end_of_the_block(pipe):
    read_fd, write_fd = pipe
    handler = LineHandler(write_fd)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("tests.logs.held")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with holding_lines(logger):
            for n in range(100):
                handler.handle(_record(n=n))
            assert _read(read_fd) == b""
        lines = _read(read_fd).splitlines()
    finally:
        logger.removeHandler(handler)
    assert [json.loads(line)["n"] for line in lines] == list(range(100))


def test_a_broken_stdout_does_not_raise(pipe, capsys):
    read_fd, write_fd = pipe
    os.close(read_fd)
    handler = LineHandler(write_fd)
    handler.setFormatter(json_formatter())
    handler.handle(_record(request_id="lost"))
    assert "writing log lines failed" in capsys.readouterr().err


@given(
    lines=st.lists(
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=40
    ),
    limit=st.integers(1, 200),
)
def test_chunks_are_whole_lines_within_the_limit(lines, limit):
    chunks = list(whole_line_chunks(lines, limit))
    assert b"".join(chunks) == b"".join(lines)
    boundaries = set(itertools.accumulate(len(line) for line in lines))
    for end in itertools.accumulate(len(chunk) for chunk in chunks):
        assert end in boundaries
    for chunk in chunks:
        assert len(chunk) <= limit or chunk.count(b"\n") == 1


@given(
    created=st.floats(min_value=0, max_value=4e9),
    earlier=st.floats(min_value=0, max_value=4e9),
)
def test_the_time_field_is_what_logging_would_write(created, earlier):
    formatter = json_formatter()
    reference = logging.Formatter()
    for when in (earlier, created, created):  # a cached second, then another
        record = logging.makeLogRecord({"created": when, "msecs": (when - int(when)) * 1000})
        assert formatter.formatTime(record) == reference.formatTime(record)


# ---------------------------------------------------------------- log_batch


def _reference_line(
    logger: logging.Logger, created: float, extra: dict, msg: str = "request"
) -> bytes:
    """The line a record made and formatted one at a time gets (what AccessLog
    did before `log_batch`): makeRecord, the record dated, LineHandler's format."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, (), None, extra=extra)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return json_formatter().format(record).encode("utf-8", "backslashreplace") + b"\n"


@contextlib.contextmanager
def _line_logger(name: str, level: int = logging.INFO):
    """A logger whose records reach one LineHandler, on a pipe; yields the
    logger and a function reading what was written."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    handler = LineHandler(write_fd)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield logger, lambda: _read(read_fd)
    finally:
        logger.removeHandler(handler)
        os.close(read_fd)
        os.close(write_fd)


_NOW = time.time()

_BATCH_EXTRAS = [
    access_record(
        request_id="r-1",
        client_ip="127.0.0.1",
        method="POST",
        path="/v1/é/☃/𝄞",  # two- to four-byte UTF-8
        route="echo",
        command=0x1001,
        node="127.0.0.1:9000",
        status=200,
        upstream_status=0,
        duration_ms=1.23456,
    ),
    access_record(  # None values
        request_id="r-2",
        client_ip="::1",
        method="GET",
        path="/nowhere",
        route=None,
        command=None,
        node=None,
        status=404,
        upstream_status=None,
        duration_ms=0.0,
    ),
    {"duration_ms": 1e16, "ratio": 0.1, "tiny": 5e-324, "negative": -0.0, "nan": float("nan")},
    {"flag": True, "list": [1, "two", None], "nested": {"k": "v", "n": 1.5}},
    {"time": "overridden", "pid": 0, "level": "x", "logger": "y"},  # same keys, same places
    {},
]


def test_batch_lines_are_the_formatters_lines_without_a_record_each():
    formatter = json_formatter()
    batch = [(_NOW + n * 0.0004, extra) for n, extra in enumerate(_BATCH_EXTRAS)]
    batch.append((1.0, {"at": "a second after the epoch, in another second"}))

    def no_record(created: float, extra: dict) -> bytes | None:
        raise AssertionError(f"{extra} should not need a LogRecord")

    lines: list[bytes] = []
    formatter.lines("tlvproxy.access", "request", batch, lines, no_record)
    logger = logging.getLogger("tlvproxy.access")
    assert lines == [_reference_line(logger, created, extra) for created, extra in batch]


def test_a_batch_reaches_a_line_handler_as_the_formatters_lines():
    batch = [(_NOW + n * 0.0004, extra) for n, extra in enumerate(_BATCH_EXTRAS)]
    with _line_logger("tests.logs.batch") as (logger, read):
        log_batch(logger, "request", batch, pathname=__file__)
        written = read()
    assert written == b"".join(_reference_line(logger, c, e) for c, e in batch)


def test_a_lone_surrogate_in_a_batch_is_written_as_the_formatter_writes_it():
    batch = [
        (_NOW, {"request_id": "before"}),
        (_NOW, {"body_excerpt": "a\ud800b", "path": "/é"}),
        (_NOW, {"request_id": "after"}),
    ]
    with _line_logger("tests.logs.surrogate") as (logger, read):
        log_batch(logger, "request", batch, pathname=__file__)
        written = read()
    assert written == b"".join(_reference_line(logger, c, e) for c, e in batch)
    values = [json.loads(line) for line in written.splitlines()]
    assert values[1]["body_excerpt"] == "a\ud800b"
    assert [v.get("request_id") for v in values] == ["before", None, "after"]


def test_a_message_orjson_refuses_is_written_as_the_formatter_writes_it():
    # A lone surrogate in the batch's message: every line through the formatter.
    batch = [(_NOW, {"request_id": "r"}), (_NOW, {})]
    with _line_logger("tests.logs.message") as (logger, read):
        log_batch(logger, "req\ud800", batch, pathname=__file__)
        written = read()
    assert written == b"".join(_reference_line(logger, c, e, "req\ud800") for c, e in batch)


def test_the_last_second_before_1970_has_its_time_text():
    # -1 is a second like any other, not the mark of no second yet.
    record = logging.makeLogRecord({"created": -1.0, "msecs": 0.0})
    assert json_formatter().formatTime(record) == logging.Formatter().formatTime(record)


_EXTRA_NAMES = st.one_of(
    st.text(max_size=6),
    # Names the formatter renames or drops, and LogRecord attributes makeRecord refuses.
    st.sampled_from(["_private", "time", "pid", "level", "message", "asctime", "msg", "name"]),
)
_EXTRA_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # past 64 bits orjson refuses them: the json module writes them
    st.floats(),
    st.text(),  # lone surrogates included
    st.lists(st.text(max_size=3), max_size=2),
)


@given(
    extras=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=4e9),
            st.dictionaries(_EXTRA_NAMES, _EXTRA_VALUES, max_size=4),
        ),
        max_size=4,
    )
)
def test_any_batch_is_written_as_record_by_record_formatting_would(extras):
    expected: list[bytes] = []
    refused: type[Exception] | None = None
    logger = logging.getLogger("tests.logs.any")
    for created, extra in extras:
        try:
            expected.append(_reference_line(logger, created, extra))
        except KeyError:  # makeRecord refuses the name; the records before it are written
            refused = KeyError
            break
    with _line_logger("tests.logs.any") as (logger, read):
        if refused is None:
            log_batch(logger, "request", extras, pathname=__file__)
        else:
            with pytest.raises(refused):
                log_batch(logger, "request", extras, pathname=__file__)
        assert read() == b"".join(expected)


def test_a_batch_below_the_level_writes_nothing():
    with _line_logger("tests.logs.quiet", logging.WARNING) as (logger, read):
        log_batch(logger, "request", [(_NOW, {"request_id": "quiet"})], pathname=__file__)
        assert read() == b""


def test_other_handlers_still_receive_log_records(caplog):
    batch = [(_NOW, {"request_id": "seen"}), (_NOW + 0.5, {"request_id": "twice"})]
    with _line_logger("tests.logs.shared") as (logger, read):
        logger.propagate = True  # to caplog's handler too: a LogRecord per line
        with caplog.at_level(logging.INFO, logger="tests.logs.shared"):
            log_batch(logger, "request", batch, pathname=__file__)
        written = read()
    assert written == b"".join(_reference_line(logger, c, e) for c, e in batch)
    records = [r for r in caplog.records if r.name == "tests.logs.shared"]
    assert [(r.getMessage(), r.request_id, r.created) for r in records] == [
        ("request", "seen", _NOW),
        ("request", "twice", _NOW + 0.5),
    ]
    assert records[0].pathname == __file__


def test_a_batch_is_written_in_whole_lines_of_at_most_pipe_buf(monkeypatch):
    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    batch = [(_NOW, {"request_id": f"r{n}", "pad": "x" * 100}) for n in range(200)]
    with _line_logger("tests.logs.chunks") as (logger, read):
        monkeypatch.setattr(os, "write", write)
        log_batch(logger, "request", batch, pathname=__file__)
        monkeypatch.undo()
        written = read()
    assert b"".join(writes) == written
    assert len(written.splitlines()) == 200
    assert all(len(chunk) <= select.PIPE_BUF and chunk.endswith(b"\n") for chunk in writes)
    assert len(writes) < 200 // 2  # several lines per write

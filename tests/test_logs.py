"""The JSON log line: its fields, records orjson alone could not write, and how
lines reach stdout."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlvproxy.logs import (
    LineHandler,
    access_record,
    holding_lines,
    json_formatter,
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

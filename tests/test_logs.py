"""The JSON log line: its fields, and records orjson alone could not write."""

from __future__ import annotations

import json
import logging
import sys

from tlvproxy.logs import access_record, json_formatter


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

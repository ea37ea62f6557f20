"""JSON logging set-up and the access record's shape (SPEC 7).

Owns: the stdout JSON-lines handler (python-json-logger) and the field names of
access records. Must not: decide what is logged; callers do.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

if TYPE_CHECKING:
    from pythonjsonlogger.core import LogData

ACCESS_LOGGER = "tlvproxy.access"


class _Formatter(OrjsonFormatter):
    """python-json-logger's orjson formatter (6.5 us per access record, against
    10.3 us for its json-module one), falling back to the json module for what
    orjson refuses: text holding a lone surrogate, which a JSON body's "\\ud800"
    can carry into a record. Such a record is written with \\u escapes, not lost.
    """

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


def setup_logging(level: str = "info") -> None:
    """Send every tlvproxy log record to stdout as one JSON object per line."""
    # The logging HOWTO's "Optimization" switches: no record needs the caller's
    # source line, thread or process name (the pid is a static field), and
    # collecting them costs ~4 us per access record, a request's hot path.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
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

"""Access lines on a stdout pipe shared by two workers (SPEC 7): one whole JSON
line per request, all of them written by the time the workers have drained.

The workers hand their access records to the logger in batches and write a
batch in whole-line chunks of at most PIPE_BUF bytes: on a pipe (what a
container runtime or systemd gives a process as stdout) such a write is never
interleaved with the other worker's.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import DEADLINE, ROOT, children, try_call, wait_for

if TYPE_CHECKING:
    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow

CONNECTIONS = 8
REQUESTS = 800


def _send(port: int, request_ids: list[str]) -> None:
    """POST /v1/echo once per id, on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        for request_id in request_ids:
            connection.request(
                "POST", "/v1/echo", body=b'{"n": 1}', headers={"X-Request-Id": request_id}
            )
            answer = connection.getresponse()
            assert answer.status == 200, answer.read()
            assert json.loads(answer.read()) == {"n": 1}
    finally:
        connection.close()


def test_two_workers_write_one_whole_line_per_request_to_a_shared_pipe(
    procs: Processes, upstream: str
) -> None:
    table, http_port, admin_port = procs.table(upstream)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "tlvproxy", "serve", "-c", str(table), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    assert gateway.stdout is not None
    lines: list[bytes] = []
    # Read as the lines come, so that the pipe never fills and blocks a worker.
    reader = threading.Thread(target=lambda: lines.extend(gateway.stdout or ()), daemon=True)
    reader.start()
    try:

        def ready() -> bool:
            assert gateway.poll() is None, b"".join(lines)
            answer = try_call(admin_port, "GET", "/readyz", timeout=2.0)
            return answer is not None and answer.status == 200

        wait_for(ready, "the gateway's /readyz")
        ids = [f"pipe-{n}" for n in range(REQUESTS)]
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            shares = [ids[n::CONNECTIONS] for n in range(CONNECTIONS)]
            list(pool.map(lambda share: _send(http_port, share), shares))
        # Written within a scheduler pass of each answer, not held back until
        # something else is logged (the drain's own lines would flush them).
        wait_for(
            lambda: sum(b'"message":"request"' in line for line in list(lines)) >= REQUESTS,
            "every access line while the gateway still serves",
        )
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(DEADLINE) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            for child in children(gateway.pid):
                os.kill(child, signal.SIGKILL)
        gateway.kill()
        gateway.wait()
    reader.join(DEADLINE)

    records = [json.loads(line) for line in lines]  # every line whole: none cut or mixed
    logged = [r["request_id"] for r in records if r["message"] == "request"]
    assert sorted(logged) == sorted(ids)  # each request once, the last ones too

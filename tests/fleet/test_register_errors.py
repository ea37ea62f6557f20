"""`mock-upstream --register` that cannot start says why in one line, with no
traceback: etcd out of reach, or its port taken (docs/operations.md
"Discovery")."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from tests.cli import REPO, run_cli
from tests.fixtures import FIXTURE_TABLE
from tests.ops.procs import free_port

if TYPE_CHECKING:
    from tests.fleet.etcd import Etcd

pytestmark = pytest.mark.slow


def register(listen: str, endpoint: str) -> tuple[int, str]:
    result = run_cli(
        "mock-upstream",
        "--listen",
        listen,
        "-c",
        str(FIXTURE_TABLE),
        "--register",
        endpoint,
        "--prefix",
        "/services/im",
        cwd=REPO,
    )
    return result.returncode, result.stderr


def test_etcd_out_of_reach_is_one_line() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    status, stderr = register(f"127.0.0.1:{free_port()}", endpoint)
    assert status == 1
    assert "Traceback" not in stderr
    assert f"tlvproxy mock-upstream: cannot register in etcd: etcd at {endpoint}" in stderr


def test_a_taken_port_is_one_line(etcd: Etcd) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        status, stderr = register(listen, etcd.url)
    assert status == 1
    assert "Traceback" not in stderr
    assert f"tlvproxy mock-upstream: cannot listen on {listen}" in stderr
    assert etcd.get_prefix("/services/im") == {}

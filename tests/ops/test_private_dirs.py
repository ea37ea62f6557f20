"""The private directories of a gateway (docs/operations.md "Private
directories"): made per process, removed when it stops, and those of a killed
gateway removed by the next one that starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import wait_for
from tlvproxy.private_dirs import make_private_dir, remove_abandoned

if TYPE_CHECKING:
    from pathlib import Path

    from tests.ops.procs import Processes

pytestmark = pytest.mark.slow


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    gone = dead_pid()
    abandoned = tmp_path / f"tlvproxy-run-{gone}-abc123"
    (abandoned / "ratelimits").mkdir(parents=True)
    (abandoned / "ratelimits" / "data.mdb").write_bytes(b"x")
    running = tmp_path / f"tlvproxy-etcd-{os.getpid()}-abc123"
    running.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    link = tmp_path / f"tlvproxy-metrics-{gone}-link"
    link.symlink_to(elsewhere)
    unrelated = tmp_path / f"tlvproxy-cache-{gone}-abc"
    unrelated.mkdir()
    remove_abandoned(tmp_path)
    assert not abandoned.exists()
    assert running.is_dir()
    assert link.is_symlink()
    assert (elsewhere / "keep").read_text() == "keep"
    assert unrelated.is_dir()


def test_a_private_directory_names_its_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    made = make_private_dir("run")
    assert made.parent == tmp_path
    assert made.name.startswith(f"tlvproxy-run-{os.getpid()}-")
    assert made.stat().st_mode & 0o777 == 0o700


def test_a_gateway_removes_what_a_killed_one_left(
    procs: Processes, upstream: str, tmp_path: Path, monkeypatch
) -> None:
    # The process tests' gateways inherit this environment.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    first = procs.gateway(upstream, "--workers", "2")
    mine = {entry.name for entry in temporary.iterdir()}
    assert {name.split("-")[1] for name in mine} == {"metrics", "run"}
    assert all(name.split("-")[2] == str(first.process.pid) for name in mine)
    first.process.send(signal.SIGKILL)  # its workers, orphaned, drain and exit
    first.process.wait()
    assert {entry.name for entry in temporary.iterdir()} == mine  # left behind
    second = procs.gateway(upstream, "--workers", "2")
    wait_for(lambda: not any(name in mine for name in os.listdir(temporary)), "the removal")
    second.process.send(signal.SIGTERM)
    assert second.process.wait() == 0
    assert list(temporary.iterdir()) == []

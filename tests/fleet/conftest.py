"""Fixtures of the fleet tests: a real etcd per test, stopped after it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.fleet.etcd import Etcd
from tests.ops.conftest import procs, upstream

__all__ = ["etcd", "procs", "upstream"]  # real processes, as in tests/ops

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """etcd on free 127.0.0.1 ports with its data under the test's directory."""
    server = Etcd(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()

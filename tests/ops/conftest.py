"""Fixtures for the operations tests: real processes, killed at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.ops.procs import Processes

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Starts processes for one test; whatever is still alive is killed after it."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo IM service (`tlvproxy mock-upstream`), shared by a module's tests."""
    started = Processes(tmp_path_factory.mktemp("upstream"))
    try:
        yield started.upstream()
    finally:
        started.close()

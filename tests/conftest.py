"""Fixtures for every test directory: a real redis-server (`store: redis`
rate limits), started on a free loopback port and stopped after."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.stores.redis_server import RedisServer

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by a module's tests, emptied before each use."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The module's redis-server, running, empty, without scripts and with its
    command statistics at zero."""
    redis_server.ensure_running()
    redis_server.cli("FLUSHALL")
    redis_server.cli("SCRIPT", "FLUSH")
    redis_server.cli("CONFIG", "RESETSTAT")
    return redis_server

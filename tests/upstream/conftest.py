"""Fixtures of the upstream tests: raw TLV servers (see rawtlv.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
from rawtlv import RawUpstream, Respond, echo

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


@pytest.fixture
async def start_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    """A factory: `await start_upstream(respond)` runs a RawUpstream for the test."""
    async with trio.open_nursery() as nursery:

        async def start(respond: Respond = echo, port: int = 0) -> RawUpstream:
            upstream = RawUpstream(respond)
            upstream.port = port
            await nursery.start(upstream.serve)
            return upstream

        yield start
        nursery.cancel_scope.cancel()

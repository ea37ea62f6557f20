"""WebSocket messages under `store: redis` rate limits (docs/configuration.md
"rate_limits"): the verdict is awaited in the session's task, messages keep
their order, and `on_store_error` decides when Redis cannot answer."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest

from tests.server.test_websocket import (
    Client,
    Gateway,
    make_table,
    open_gateway,
    open_mock_upstream,
    open_scripted_upstream,
    sample,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.stores.redis_server import RedisServer


def limits(on_store_error: str = "allow", rate: str = "1/m", burst: int = 1) -> str:
    return f"""
redis: {{url: "{{url}}"}}
rate_limits:
  - name: echo_shared
    commands: [echo]
    key: query.uid
    rate: {rate}
    burst: {burst}
    store: redis
    on_store_error: {on_store_error}
"""


@asynccontextmanager
async def open_client(
    tmp_path: Path, redis: RedisServer, extra: str
) -> AsyncIterator[tuple[Client, Gateway]]:
    """A gateway on a table with `extra` (its `{url}`: the Redis URL) and a client."""
    table_extra = extra.replace("{url}", redis.url)
    async with open_mock_upstream() as (upstream, _):
        table = make_table(tmp_path, [upstream], extra=table_extra)
        async with open_gateway(table, redis=redis.url) as gateway:
            client = await Client.connect(gateway.port)
            yield client, gateway
            await client.stream.aclose()


async def test_redis_limits_messages_per_message(tmp_path: Path, redis: RedisServer) -> None:
    async with open_client(tmp_path, redis, limits()) as (client, gateway):
        await redis_limits_messages_per_message(client, gateway)


async def redis_limits_messages_per_message(client: Client, gateway: Gateway) -> None:
    assert (await client.call("echo", 1, 1))["status"] == 0
    assert (await client.call("echo", 2, 2))["status"] == 0
    refused = await client.call("echo", 3, 3)
    assert refused["seq"] == 3
    assert refused["error"]["code"] == "rate_limited"
    assert "echo_shared" in refused["error"]["message"]
    assert (await client.call("get_profile", 4, {"user_id": 1}))["status"] == 0
    assert sample(gateway.metrics, "tlvproxy_rate_limited_total", {"rule": "echo_shared"}) == 1


async def test_messages_keep_their_order_while_a_verdict_is_awaited(
    tmp_path: Path, redis: RedisServer
) -> None:
    # echo waits for Redis, get_profile does not: sent back to back, each echo
    # still reaches the upstream before the get_profile sent after it.
    extra = limits(rate="1000/s", burst=100).replace("{url}", redis.url)
    async with open_scripted_upstream() as upstream:
        table = make_table(tmp_path, [upstream.node], extra=extra)
        async with open_gateway(table, redis=redis.url) as gateway:
            client = await Client.connect(gateway.port)
            for n in range(10):
                await client.send({"cmd": "echo", "seq": 2 * n, "body": n})
                await client.send({"cmd": "get_profile", "seq": 2 * n + 1, "body": {"user_id": n}})
            while len(upstream.requests) < 20:
                await upstream.changed.wait()
            commands = [command for command, _, _, _ in upstream.requests]
            assert commands == [0x1003, 0x1002] * 10
            await client.stream.aclose()


@pytest.mark.parametrize(("on_error", "code"), [("allow", None), ("deny", "rate_limited")])
async def test_a_frozen_redis_leaves_it_to_on_store_error(
    tmp_path: Path, redis: RedisServer, on_error: str, code: str | None
) -> None:
    async with open_client(tmp_path, redis, limits(on_store_error=on_error)) as (client, gateway):
        await a_frozen_redis(client, gateway, redis, code)


async def a_frozen_redis(
    client: Client, gateway: Gateway, redis: RedisServer, code: str | None
) -> None:
    assert (await client.call("echo", 1, 1))["status"] == 0
    redis.pause()
    try:
        answer = await client.call("echo", 2, 2)
    finally:
        redis.resume()
    assert answer.get("error", {}).get("code") == code
    if code is not None:
        assert "cannot be checked now" in answer["error"]["message"]
    assert (
        sample(gateway.metrics, "tlvproxy_rate_limit_store_errors_total", {"rule": "echo_shared"})
        == 1
    )
    # Redis answers again: the bucket (one request, or two with `allow`)
    # refuses the next beyond the burst.
    answers = [await client.call("echo", seq, seq) for seq in (3, 4)]
    assert answers[-1]["error"]["code"] == "rate_limited"

"""REST through the gateway with rate limits in their stores (docs/configuration.md
"Where the buckets live", "When the store cannot answer"): `store: local` in the
gateway's LMDB, `store: redis` in a real redis-server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import pytest
import trio

from tests.e2e.client import Answer, HttpClient, fetch
from tests.e2e.test_rest import SEND, USER, error_of

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.conftest import GatewayFactory
    from tests.stores.redis_server import RedisServer

ECHO = {"X-User-Id": "7"}


def rules(*, store: str = "redis", rate: str = "1/m", **extra: str) -> list[dict[str, object]]:
    return [
        {
            "name": "echo_limit",
            "commands": ["echo"],
            "key": "header.X-User-Id",
            "rate": rate,
            "burst": 1,
            "store": store,
            **extra,
        }
    ]


def counted(gateway, name: str, rule: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, {"rule": rule})
    return value or 0.0


async def test_a_redis_limit_answers_429_with_retry_after(
    gateways: GatewayFactory, redis: RedisServer
) -> None:
    gateway = await gateways.start(redis={"url": redis.url}, rate_limits=rules())
    statuses = []
    for _ in range(3):
        answer = await fetch(gateway.http_address, "POST", "/v1/echo", {"n": 1}, ECHO)
        statuses.append(answer.status)
    assert statuses == [200, 200, 429]
    assert error_of(answer)["code"] == "rate_limited"
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    other = await fetch(gateway.http_address, "POST", "/v1/echo", {"n": 1}, {"X-User-Id": "8"})
    assert other.status == 200
    assert counted(gateway, "tlvproxy_rate_limited_total", "echo_limit") == 1


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_pipelined_requests_are_answered_in_order(
    gateways: GatewayFactory, redis: RedisServer, tmp_path: Path, store: str
) -> None:
    # Three limited requests (the third refused) and an unlimited one between
    # them, in one write: the unlimited one waits for nothing, yet every
    # answer leaves in request order. `local`: in the LMDB store of a worker
    # of several, where the checks of one sweep are made together.
    gateway = await gateways.start(
        redis={"url": redis.url}, rate_limits=rules(store=store), runtime_dir=tmp_path / "run"
    )
    client = await HttpClient.connect(gateway.http_address)
    requests = [
        ("POST", "/v1/echo", ECHO),
        ("GET", "/v1/users/1/profile", {}),
        ("POST", "/v1/echo", ECHO),
        ("POST", "/v1/echo", ECHO),
    ]
    wire = b"".join(
        f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n".encode()
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        + b"\r\n{}"
        for method, target, headers in requests
    )
    await client.stream.send_all(wire)
    answers: list[Answer] = []
    for method, target, headers in requests:
        if client.conn.our_state is h11.DONE:
            client.conn.start_next_cycle()
        # Move the client's state as if this request went through it.
        client.conn.send(
            h11.Request(
                method=method,
                target=target,
                headers=[("Host", "t"), *headers.items(), ("Content-Length", "2")],
            )
        )
        client.conn.send(h11.Data(data=b"{}"))
        client.conn.send(h11.EndOfMessage())
        answers.append(await client._read_answer())
    await client.aclose()
    assert [a.status for a in answers] == [200, 200, 200, 429]
    assert answers[1].json()["nickname"] == "user1"  # the profile, in its place


async def test_concurrent_requests_share_the_workers_local_store(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    # Requests of several connections at once, as a worker of several
    # gateways' workers checks them: together in one LMDB transaction, two
    # admitted (burst 1), the others refused, each answered.
    gateway = await gateways.start(rate_limits=rules(store="local"), runtime_dir=tmp_path / "run")
    statuses: list[int] = []

    async def one() -> None:
        answer = await fetch(gateway.http_address, "POST", "/v1/echo", {"n": 1}, ECHO)
        statuses.append(answer.status)

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
    assert counted(gateway, "tlvproxy_rate_limited_total", "echo_limit") == 4


async def test_a_request_admitted_locally_then_waits_for_redis(
    gateways: GatewayFactory, redis: RedisServer, tmp_path: Path
) -> None:
    # A local rule that admits, then a Redis rule that refuses the third: the
    # request goes on to Redis once the worker's shared store admits it.
    limits = [
        *rules(store="local", rate="1/m"),
        {**rules()[0], "name": "echo_redis", "burst": 1},
    ]
    limits[0]["burst"] = 5
    gateway = await gateways.start(
        redis={"url": redis.url}, rate_limits=limits, runtime_dir=tmp_path / "run"
    )
    statuses = [
        (await fetch(gateway.http_address, "POST", "/v1/echo", {"n": 1}, ECHO)).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    assert counted(gateway, "tlvproxy_rate_limited_total", "echo_redis") == 1
    assert counted(gateway, "tlvproxy_rate_limited_total", "echo_limit") == 0


async def test_a_frozen_redis_allows_or_denies_per_rule(
    gateways: GatewayFactory, redis: RedisServer
) -> None:
    limits = [
        *rules(on_store_error="allow"),
        {
            "name": "send_limit",
            "commands": ["send_message"],
            "key": "header.X-User-Id",
            "rate": "1/m",
            "burst": 1,
            "store": "redis",
            "on_store_error": "deny",
        },
    ]
    gateway = await gateways.start(redis={"url": redis.url}, rate_limits=limits)
    address = gateway.http_address
    redis.pause()
    try:
        echo = await fetch(address, "POST", "/v1/echo", {"n": 1}, ECHO)
        send = await fetch(address, "POST", "/v1/messages", SEND, USER)
    finally:
        redis.resume()
    assert echo.status == 200
    assert send.status == 429
    assert "cannot be checked now" in error_of(send)["message"]
    assert send.headers["retry-after"] == "1"
    assert counted(gateway, "tlvproxy_rate_limit_store_errors_total", "echo_limit") == 1
    assert counted(gateway, "tlvproxy_rate_limit_store_errors_total", "send_limit") == 1
    # Redis answers again: both limits count and refuse as before. The check
    # that timed out reached Redis before it froze: Redis runs it once it
    # thaws (its answer is dropped), so it may have counted already.
    statuses = [(await fetch(address, "POST", "/v1/messages", SEND, USER)).status for _ in range(3)]
    assert statuses in ([200, 200, 429], [200, 429, 429])


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_buckets_outlive_a_reload(
    gateways: GatewayFactory, redis: RedisServer, store: str
) -> None:
    gateway = await gateways.start(redis={"url": redis.url}, rate_limits=rules(store=store))
    address = gateway.http_address
    for _ in range(2):
        assert (await fetch(address, "POST", "/v1/echo", {"n": 1}, ECHO)).status == 200
    # A reload that changes the rules keeps a rule's buckets by its name: the
    # store is the gateway's, not the table's.
    gateways.table(redis={"url": redis.url}, rate_limits=rules(store=store, rate="2/m"))
    await gateway.reload()
    assert (await fetch(address, "POST", "/v1/echo", {"n": 1}, ECHO)).status == 429

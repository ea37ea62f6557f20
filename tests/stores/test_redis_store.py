"""`store: redis`: buckets in a real redis-server, through coredis on trio
(docs/configuration.md "Where the buckets live", "When the store cannot answer")."""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import sniffio
import trio
from coredis.exceptions import ResponseError
from hypothesis import given, settings

from tests.policy.test_ratelimit import rule
from tests.stores.local import running_local_checks
from tests.stores.redis_server import RedisServer
from tests.stores.test_local_store import _EVENTS, _RULES, Clock, make_rules, request_of, sample
from tlvproxy.metrics import Metrics
from tlvproxy.policy.ratelimit import ProcessBuckets, RateLimiter, Refusal
from tlvproxy.stores.limits import Pending, RateLimits
from tlvproxy.stores.names import MAX_VALUE_BYTES, redis_prefix
from tlvproxy.stores.redis_store import (
    _MAX_QUEUED,
    ANSWER_BUDGET,
    RedisBuckets,
    _answer,
)
from tlvproxy.stores.waiters import Failed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tlvproxy.config.model import RateLimitRule
    from tlvproxy.stores.local_batches import LocalChecks


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[RedisBuckets]:
    """A running store, connected: a cold start's connection may take longer
    than the 50 ms budget on a busy machine, which is not what tests test."""
    store = RedisBuckets(url)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for _ in range(1000):
            if await answers(store):
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("the store never answered")
        yield store
        nursery.cancel_scope.cancel()


async def answers(store: RedisBuckets) -> bool:
    """Whether a check on a bucket of its own gets Redis's answer."""
    metrics = Metrics()
    pending = RateLimits([redis_rule("warm_up")], metrics, redis=store).check(
        "send", request_of("warm-up", "d")
    )
    assert isinstance(pending, Pending)
    await pending.wait()
    return sample(metrics, "warm_up") == 0


def redis_rule(
    name: str = "per_user", *, on_store_error: str = "allow", **options: Any
) -> RateLimitRule:
    return attrs.evolve(rule(name, **options), store="redis", on_store_error=on_store_error)


async def verdict_of(limits: RateLimits, command: str, request: Any) -> Refusal | None:
    verdict = limits.check(command, request)
    if isinstance(verdict, Pending):
        return await verdict.wait()
    return verdict


# ---------------------------------------------------------------- the reference's verdicts


@settings(max_examples=40, deadline=None)
@given(drawn=_RULES, events=_EVENTS)
def test_the_redis_store_gives_the_references_verdicts(redis_server: RedisServer, drawn, events):
    # The script's arithmetic against policy/ratelimit.py's, on a made-up time
    # passed in (the gateway uses Redis's TIME): the same verdict every time.
    redis_server.ensure_running()
    redis_server.cli("FLUSHALL")
    rules = [attrs.evolve(r, store="redis") for r in make_rules(drawn)]
    reference = RateLimiter(rules)

    async def run() -> None:
        clock = Clock()
        async with open_store(redis_server.url) as store:
            limits = RateLimits(rules, Metrics(), redis=store, redis_clock=clock)
            for command, user, device, delay in events:
                clock.now += delay
                request = request_of(user, device)
                expected = reference.check(command, request, clock.now)
                assert await verdict_of(limits, command, request) == expected

    trio.run(run)


# ---------------------------------------------------------------- on Redis's clock


async def test_a_burst_then_refusals_on_redis_time(redis: RedisServer) -> None:
    assert sniffio.current_async_library() == "trio"  # coredis runs on trio itself
    metrics = Metrics()
    async with open_store(redis.url) as store:
        limits = RateLimits([redis_rule(rate=1 / 60, burst=2)], metrics, redis=store)
        alice = request_of("alice", "d")
        assert [await verdict_of(limits, "send", alice) for _ in range(3)] == [None] * 3
        refusal = await verdict_of(limits, "send", alice)
        assert isinstance(refusal, Refusal)
        assert refusal.rule == "per_user"
        assert 1 <= refusal.retry_after <= 60
        assert await verdict_of(limits, "send", request_of("bob", "d")) is None
    # One bucket per key, named by the rule and the value, expiring once drained.
    key = redis_prefix("per_user") + b"alice"
    assert redis.cli("EXISTS", key.decode()).strip() == "1"
    ttl = int(redis.cli("TTL", key.decode()))
    assert 1 <= ttl <= 180  # ceil(level / rate) seconds: 3 requests at 1/m
    assert sample(metrics, "per_user") == 0


async def test_checks_of_one_pass_go_in_one_pipeline_one_script_call_each(
    redis: RedisServer,
) -> None:
    async with open_store(redis.url) as store:
        limits = RateLimits([redis_rule(rate=1.0, burst=0)], Metrics(), redis=store)
        # The store loaded the script when it started (and perhaps once more,
        # for a check that raced with that).
        assert redis.calls("script|load") >= 1
        redis.cli("CONFIG", "RESETSTAT")
        # 100 users, all checked before the store's task runs once.
        pending = [limits.check("send", request_of(f"u{i}", "d")) for i in range(100)]
        assert all(isinstance(p, Pending) for p in pending)
        verdicts = [await p.wait() for p in pending if isinstance(p, Pending)]
        assert verdicts == [None] * 100
        again = await verdict_of(limits, "send", request_of("u7", "d"))
        assert again == Refusal("per_user", 1)
    # One EVALSHA per request, and no other command.
    assert redis.calls("evalsha") == 101
    assert redis.calls("script|load") == 0


async def test_attacker_sized_key_values_make_bounded_keys(redis: RedisServer) -> None:
    async with open_store(redis.url) as store:
        limits = RateLimits([redis_rule(rate=1.0, burst=0)], Metrics(), redis=store)
        huge = "x" * 100_000
        assert await verdict_of(limits, "send", request_of(huge, "d")) is None
        assert await verdict_of(limits, "send", request_of(huge, "d")) == Refusal("per_user", 1)
        assert await verdict_of(limits, "send", request_of(huge + "y", "d")) is None
    found = redis.cli("KEYS", "tlvproxy:rl:per_user:*").split()
    keys = [k.encode("utf-8", "surrogateescape") for k in found]
    assert len(keys) == 2
    assert all(len(k) <= len(redis_prefix("per_user")) + MAX_VALUE_BYTES for k in keys)


async def test_rule_names_cannot_reach_each_others_keys() -> None:
    # "a" with the value "b:x" and "a:b" with the value "x" are two buckets.
    assert redis_prefix("a") + b"b:x" != redis_prefix("a:b") + b"x"
    assert redis_prefix("a:b") == b"tlvproxy:rl:a%3Ab:"
    assert redis_prefix("50%") == b"tlvproxy:rl:50%25:"


# ---------------------------------------------------------------- when Redis cannot answer


@pytest.mark.parametrize(("on_error", "refused"), [("allow", False), ("deny", True)])
async def test_a_frozen_redis_is_a_store_error_within_the_budget(
    redis: RedisServer, on_error: str, refused: bool
) -> None:
    metrics = Metrics()
    rules = [redis_rule(rate=1.0, burst=0, on_store_error=on_error)]
    async with open_store(redis.url) as store:
        limits = RateLimits(rules, metrics, redis=store)
        alice = request_of("alice", "d")
        assert await verdict_of(limits, "send", alice) is None
        redis.pause()
        try:
            started = trio.current_time()
            verdict = await verdict_of(limits, "send", alice)
            waited = trio.current_time() - started
        finally:
            redis.resume()
        assert ANSWER_BUDGET <= waited < ANSWER_BUDGET + 0.1
        assert sample(metrics, "per_user") == 1
        assert verdict == (Refusal("per_user", 1, store_failed=True) if refused else None)
        # Redis answers again: limits apply again, with the same connection.
        assert await verdict_of(limits, "send", alice) == Refusal("per_user", 1)
        assert sample(metrics, "per_user") == 1


async def test_a_redis_frozen_again_and_again_still_answers(redis: RedisServer) -> None:
    # Each frozen check fails within its budget, and the store answers again
    # as soon as Redis does, however often it froze: the pipelines left
    # waiting are never cancelled from outside, and their late answers are
    # dropped.
    metrics = Metrics()
    rules = [redis_rule(rate=1000.0, burst=1000)]
    async with open_store(redis.url) as store:
        limits = RateLimits(rules, metrics, redis=store)
        alice = request_of("alice", "d")
        for round_ in range(12):
            redis.pause()
            try:
                started = trio.current_time()
                assert await verdict_of(limits, "send", alice) is None  # allow: passes
                assert trio.current_time() - started < ANSWER_BUDGET + 0.1
            finally:
                redis.resume()
            assert sample(metrics, "per_user") == round_ + 1
        for _ in range(500):
            if await answers(store):
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("the store never answered again")
        before = sample(metrics, "per_user")
        assert await verdict_of(limits, "send", alice) is None
        assert sample(metrics, "per_user") == before  # Redis answered it


async def test_checks_beyond_the_queue_bound_fail_at_once(redis: RedisServer) -> None:
    async with open_store(redis.url) as store:
        waiters = [_Waiter() for _ in range(_MAX_QUEUED + 10)]
        redis.pause()
        try:
            for waiter in waiters:
                store.submit([b"k"], (b"", b"1", b"1"), waiter)
            # Submitted in one pass: none went out, so the last ones never queued.
            assert all(isinstance(w.answer, Failed) for w in waiters[_MAX_QUEUED:])
            assert not any(w.resolved for w in waiters[: _MAX_QUEUED - 1])
        finally:
            redis.resume()
        with trio.fail_after(5):
            for waiter in waiters:
                await waiter.event.wait()


async def test_a_stopped_store_fails_checks_at_once(redis: RedisServer) -> None:
    async with open_store(redis.url) as store:
        pass
    waiter = _Waiter()
    store.submit([b"k"], (b"", b"1", b"1"), waiter)
    assert waiter.answer == Failed("the store stopped")


async def test_a_password_written_escaped_in_the_url(tmp_path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        server.cli("CONFIG", "SET", "requirepass", "p@ss/w#rd")
        url = f"redis://:p%40ss%2Fw%23rd@127.0.0.1:{server.port}/0"
        metrics = Metrics()
        async with open_store(url) as store:
            limits = RateLimits([redis_rule(rate=1 / 60, burst=0)], metrics, redis=store)
            alice = request_of("alice", "d")
            assert await verdict_of(limits, "send", alice) is None
            assert await verdict_of(limits, "send", alice) == Refusal("per_user", 60)
        assert sample(metrics, "per_user") == 0
    finally:
        server.cli("-a", "p@ss/w#rd", "CONFIG", "SET", "requirepass", "")
        server.stop()


class _Waiter:
    def __init__(self) -> None:
        self.answer: object = None
        self.resolved = False
        self.event = trio.Event()

    def resolve(self, answer: object) -> None:
        self.answer, self.resolved = answer, True
        self.event.set()


async def test_a_restarted_redis_is_used_again_without_a_new_store(redis: RedisServer) -> None:
    metrics = Metrics()
    rules = [redis_rule(rate=1 / 60, burst=0, on_store_error="deny")]
    async with open_store(redis.url) as store:
        limits = RateLimits(rules, metrics, redis=store)
        alice = request_of("alice", "d")
        assert await verdict_of(limits, "send", alice) is None
        redis.stop()
        for _ in range(3):
            started = trio.current_time()
            verdict = await verdict_of(limits, "send", alice)
            assert verdict == Refusal("per_user", 1, store_failed=True)
            assert trio.current_time() - started <= ANSWER_BUDGET + 0.05
        assert sample(metrics, "per_user") == 3
        redis.start()  # empty, and without the script
        assert await verdict_of(limits, "send", alice) is None
        assert await verdict_of(limits, "send", alice) == Refusal("per_user", 60)
        assert sample(metrics, "per_user") == 3


async def test_a_bucket_of_the_wrong_type_is_a_store_error(redis: RedisServer) -> None:
    # Whatever else wrote our keys: a script error is this check's failure,
    # never a crash, and the other checks of the batch get their verdicts.
    redis.cli("HSET", (redis_prefix("per_user") + b"mallory").decode(), "f", "v")
    redis.cli("SET", (redis_prefix("per_user") + b"garbage").decode(), "not a bucket")
    metrics = Metrics()
    async with open_store(redis.url) as store:
        limits = RateLimits([redis_rule(rate=1.0, burst=0)], metrics, redis=store)
        mallory = limits.check("send", request_of("mallory", "d"))
        alice = limits.check("send", request_of("alice", "d"))
        assert isinstance(mallory, Pending)
        assert isinstance(alice, Pending)
        assert await mallory.wait() is None  # on_store_error: allow
        assert await alice.wait() is None
        assert sample(metrics, "per_user") == 1
        # A value that is not a bucket counts as an empty bucket.
        assert await verdict_of(limits, "send", request_of("garbage", "d")) is None
        assert await verdict_of(limits, "send", request_of("garbage", "d")) is not None


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ([0], None),
        ([1, 5], (0, 5)),
        ([2, 1], (1, 1)),
        ([3, 1], Failed),  # no third bucket
        ([0, 1], Failed),
        ([1, 0], Failed),  # a retry-after below 1 s
        ([1, -4], Failed),
        (["1", 2], Failed),
        ([1.5, 2], Failed),
        ([True, 2], Failed),
        ([], Failed),
        ([1, 2, 3], Failed),
        (b"OK", Failed),
        (None, Failed),
        (ResponseError("ERR boom"), Failed),
    ],
)
def test_replies_are_checked(reply: object, answer: object) -> None:
    found = _answer(reply, 2)
    if answer is Failed:
        assert isinstance(found, Failed)
    else:
        assert found == answer


async def test_a_retry_after_beyond_the_rules_longest_is_cut(redis: RedisServer) -> None:
    # Another gateway with another burst filled the bucket higher than this
    # rule can: the retry-after is cut to what this rule could ask.
    async with open_store(redis.url) as store:
        big = RateLimits([redis_rule(rate=1.0, burst=50)], Metrics(), redis=store)
        small = RateLimits([redis_rule(rate=1.0, burst=0)], Metrics(), redis=store)
        for _ in range(51):
            assert await verdict_of(big, "send", request_of("alice", "d")) is None
        assert await verdict_of(small, "send", request_of("alice", "d")) == Refusal("per_user", 1)


def redis_calls(redis: RedisServer) -> str:
    """The calls Redis has answered so far, by command."""
    stats = redis.cli("INFO", "commandstats").splitlines()
    return "\n".join(line.partition(",")[0] for line in stats if line.startswith("cmdstat_eval"))


async def test_rules_of_both_stores_local_first(redis: RedisServer) -> None:
    rules = [
        redis_rule("shared", rate=1.0, burst=0),
        rule("mine", rate=1.0, burst=0),
    ]
    async with open_store(redis.url) as store:
        for workers in (1, 2):
            async with AsyncExitStack() as stack:
                local: LocalChecks | ProcessBuckets = ProcessBuckets()
                if workers > 1:  # the LMDB store that workers share
                    local = await stack.enter_async_context(running_local_checks())
                limits = RateLimits(rules, Metrics(), local=local, redis=store, clock=Clock())
                alice = request_of("alice", "d")
                assert await verdict_of(limits, "send", alice) is None
                # The local rule refuses without asking Redis.
                before = redis_calls(redis)
                assert await verdict_of(limits, "send", alice) == Refusal("mine", 1)
                assert redis_calls(redis) == before
                bob = request_of("bob", "d")
                redis.cli("SET", (redis_prefix("shared") + b"bob").decode(), "1 1e300", "EX", "60")
                # Redis refuses bob; his local bucket has counted him
                # (docs/configuration.md "Where the buckets live").
                assert await verdict_of(limits, "send", bob) == Refusal("shared", 1)
                assert await verdict_of(limits, "send", bob) == Refusal("mine", 1)
                redis.cli("DEL", (redis_prefix("shared") + b"alice").decode())

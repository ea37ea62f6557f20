"""The rate limits of one table, as the REST and WebSocket servers call them
(docs/configuration.md "rate_limits").

Owns: which rules apply to a command and in which store their buckets live,
the bucket names of a request, the clock of the local store, what a store that
cannot answer means (`on_store_error`, counted in
`tlvproxy_rate_limit_store_errors_total`), and `Pending`, the verdict of a
check that waits for a store's task (the LMDB store of several workers, or
Redis).
Must not: wait: such a check returns a `Pending` at once, and the caller goes
on with the request when it is resolved.

One check, for every path: `check(command, request)` returns None (admitted),
a `Refusal`, or a `Pending`. The rules of each store are checked together, so
each store counts a request in all of its buckets or in none; a request that
rules of both stores limit is checked on the local store first, then on Redis,
and one that Redis refuses stays counted in its local buckets
(docs/configuration.md "Where the buckets live").
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from tlvproxy.policy.ratelimit import ABSENT_KEY, Plan, ProcessBuckets, Refusal
from tlvproxy.stores.names import MAX_VALUE_BYTES, bounded, local_prefix, redis_prefix
from tlvproxy.stores.waiters import Failed

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Sequence

    from tlvproxy.config.keys import KeyExpr, RequestView
    from tlvproxy.config.model import RateLimitRule
    from tlvproxy.metrics import Metrics
    from tlvproxy.stores.local_batches import LocalChecks
    from tlvproxy.stores.redis_store import RedisBuckets
    from tlvproxy.stores.waiters import Answer

# A refusal for want of a store's answer (`on_store_error: deny`) asks the
# caller to come back after this many seconds.
_STORE_RETRY_AFTER = 1

Verdict = Refusal | None


@attrs.frozen(slots=True)
class _Rule:
    """What a store's answer about one bucket needs of its rule."""

    name: str
    deny_on_error: bool
    # The longest retry-after this rule can ask (a full bucket of burst + 1 at
    # `rate`): a larger one from Redis is cut to it.
    max_retry_after: int


@attrs.frozen(slots=True)
class _CommandPlan:
    """The rules of one command, split by store, in table order within each."""

    keys: tuple[KeyExpr, ...]
    readers: tuple[Callable[[RequestView], str | None], ...]  # each key's `read`
    # The local store's steps: (the rule's buckets or name prefix, rate, burst, key position).
    local: tuple[tuple[Any, float, float, int], ...]
    local_rules: tuple[_Rule, ...]
    redis: tuple[tuple[bytes, int], ...]  # (key prefix, key position)
    redis_args: tuple[bytes, ...]  # the script's ARGV after the time: rate, burst per key
    redis_rules: tuple[_Rule, ...]
    applies: bool  # whether any rule limits the command

    @classmethod
    def of(
        cls, rules: tuple[RateLimitRule, ...], command_name: str, local_store: object
    ) -> _CommandPlan:
        plan = Plan.of(rules, command_name)
        local: list[tuple[Any, float, float, int]] = []
        local_rules: list[_Rule] = []
        redis: list[tuple[bytes, int]] = []
        redis_args: list[bytes] = []
        redis_rules: list[_Rule] = []
        for index, rate, burst, position in plan.steps:
            rule = rules[index]
            meta = _Rule(
                rule.name, rule.on_store_error == "deny", max(1, math.ceil((burst + 1) / rate))
            )
            if rule.store == "redis":
                redis.append((redis_prefix(rule.name), position))
                # repr: the shortest text that reads back as the same double.
                redis_args += [repr(rate).encode(), repr(burst).encode()]
                redis_rules.append(meta)
            else:
                # ProcessBuckets finds a rule's buckets by name, LMDB by a prefix of each bucket's.
                found = (
                    local_store.rule(rule.name, rate)
                    if isinstance(local_store, ProcessBuckets)
                    else local_prefix(rule.name)
                )
                local.append((found, rate, burst, position))
                local_rules.append(meta)
        return cls(
            plan.keys,
            tuple(key.read for key in plan.keys),
            tuple(local),
            tuple(local_rules),
            tuple(redis),
            tuple(redis_args),
            tuple(redis_rules),
            bool(plan.steps),
        )


class RateLimits:
    """A table's `rate_limits` on their stores; rebuilt on reload, the stores kept.

    `local` holds the buckets of `store: local` rules and `redis` those of
    `store: redis` rules; either may be None when no rule uses it. `clock` is
    the local store's: one that every process of the box shares. Redis keeps
    its buckets on its own clock (TIME), the one every gateway using it shares;
    `redis_clock` replaces it (tests give a made-up time).
    """

    def __init__(
        self,
        rules: Sequence[RateLimitRule],
        metrics: Metrics,
        *,
        local: LocalChecks | ProcessBuckets | None = None,
        redis: RedisBuckets | None = None,
        clock: Callable[[], float] = time.monotonic,
        redis_clock: Callable[[], float] | None = None,
    ) -> None:
        """Raises ValueError for a rule whose rate is not positive or burst
        negative, or whose store is not given."""
        for rule in rules:
            if not rule.rate > 0:
                raise ValueError(f"rate limit {rule.name!r}: rate must be > 0, got {rule.rate}")
            if rule.burst < 0:
                raise ValueError(f"rate limit {rule.name!r}: burst must be >= 0, got {rule.burst}")
            if (local if rule.store == "local" else redis) is None:
                raise ValueError(f"rate limit {rule.name!r}: no {rule.store} store to keep it in")
        self._rules = tuple(rules)
        self._metrics = metrics
        self._local = local
        self._redis = redis
        self._clock = clock
        self._redis_clock = redis_clock
        named = {name for rule in self._rules for name in rule.commands or ()}
        if isinstance(local, ProcessBuckets):
            local.retain({rule.name for rule in self._rules if rule.store == "local"})
        self._unlisted = _CommandPlan.of(self._rules, "", local)
        self._plans = {name: _CommandPlan.of(self._rules, name, local) for name in named}

    def applies(self, command_name: str) -> bool:
        """Whether any rule limits `command_name` (when not, `check` always admits)."""
        return self._plans.get(command_name, self._unlisted).applies

    def check(
        self,
        command_name: str,
        request: RequestView,
        *,
        at_once: bool = False,
        held: bool = False,
    ) -> Verdict | Pending:
        """Admit one request for `command_name`, now.

        Returns None when every rule admits it (each bucket counting it), the
        `Refusal` of the first refusing rule, or a `Pending` whose verdict is
        one of those once the store's task answers: the LMDB store after this
        scheduler pass, Redis within its 50 ms budget. `at_once`: the LMDB
        store checks it now, in a transaction of its own, for a caller that
        handles one message at a time, so only Redis is waited for. `held`:
        the LMDB store checks it when the caller calls `make_held`, which it
        must before its scheduler pass ends, with the others it held.
        """
        plan = self._plans.get(command_name, self._unlisted)
        # Each key's value, "-" when absent.
        if request.numbers is None:
            texts = [
                ABSENT_KEY if (text := read(request)) is None else text for read in plan.readers
            ]
        else:
            texts = [
                ABSENT_KEY if (text := key.evaluate(request)) is None else text for key in plan.keys
            ]
        local = self._local
        if plan.local:
            if not isinstance(local, ProcessBuckets):
                # Shared by workers: checked with the others of this pass.
                assert local is not None  # __init__ checked that every rule has its store
                pending = Pending(plan.local_rules, self._metrics)
                if plan.redis:
                    pending.then_redis(plan.redis_rules, partial(self._submit_redis, plan, texts))
                values = [bounded(text) for text in texts]
                if held:
                    local.hold(plan.local, values, self._clock(), pending)
                    return pending
                if not at_once:
                    local.submit(plan.local, values, self._clock(), pending)
                    return pending
                local.check_now(plan.local, values, self._clock(), pending)
                return pending.verdict if pending.done else pending
            refusal = self._check_process(local, plan, texts)
            if refusal is not None:
                return refusal
        if not plan.redis:
            return None
        pending = Pending(plan.redis_rules, self._metrics)
        self._submit_redis(plan, texts, pending)
        return pending

    def make_held(self) -> None:
        """Make the checks `check(held=True)` held, and resolve their `Pending`s."""
        if self._local is not None and not isinstance(self._local, ProcessBuckets):
            self._local.make_held()

    def _submit_redis(self, plan: _CommandPlan, texts: list[str], pending: Pending) -> None:
        assert self._redis is not None  # __init__ checked that every rule has its store
        keys = [prefix + bounded(texts[position]) for prefix, position in plan.redis]
        # The script's ARGV: the time ("" for Redis's TIME), then rate, burst per key.
        now = b"" if self._redis_clock is None else repr(self._redis_clock()).encode()
        self._redis.submit(keys, (now, *plan.redis_args), pending)

    def _check_process(
        self, local: ProcessBuckets, plan: _CommandPlan, texts: list[str]
    ) -> Refusal | None:
        # A bucket is named by the key value's text; one longer than
        # MAX_VALUE_BYTES characters by its digest, so that a caller cannot
        # make a bucket's name large.
        names: Sequence[Hashable] = texts
        if max(map(len, texts)) > MAX_VALUE_BYTES:
            names = [text if len(text) <= MAX_VALUE_BYTES else bounded(text) for text in texts]
        answer = local.check(plan.local, names, self._clock())
        if answer is None:
            return None
        position, retry_after = answer
        return Refusal(plan.local_rules[position].name, retry_after)


class Pending:
    """The verdict of a check that waits for a store: None or a `Refusal`.

    The store resolves it once: the LMDB store after the scheduler pass of
    the check, from its task (or a held check from the caller's `make_held`),
    Redis within the answer budget, from its task. A push-session request
    goes on in the callback given to `then`, as does a REST request that
    waits for Redis; a WebSocket session awaits `wait()`, so that its
    messages keep their order.
    """

    __slots__ = ("_callback", "_event", "_metrics", "_redis", "_rules", "done", "verdict")

    def __init__(self, rules: tuple[_Rule, ...], metrics: Metrics) -> None:
        self._rules = rules
        self._metrics = metrics
        self._callback: Callable[[Verdict], None] | None = None
        self._event: trio.Event | None = None
        self.done = False
        # The request's Redis rules and how to submit it to them, once the
        # local store admits it.
        self._redis: tuple[tuple[_Rule, ...], Callable[[Pending], None]] | None = None
        self.verdict: Verdict = None

    def then_redis(self, rules: tuple[_Rule, ...], submit: Callable[[Pending], None]) -> None:
        """Once the local store admits the request, check it on Redis's rules
        `rules` (`submit` sends it there): the verdict is Redis's."""
        self._redis = rules, submit

    def then(self, callback: Callable[[Verdict], None]) -> None:
        """Call `callback(verdict)` once it is known: now, if it is already."""
        if self.done:
            callback(self.verdict)
        else:
            self._callback = callback

    async def wait(self) -> Verdict:
        """The verdict, once known."""
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        return self.verdict

    def resolve(self, answer: Answer) -> None:
        """The store's answer (waiters.Waiter): its verdict, told to whoever waits."""
        if isinstance(answer, Failed):
            verdict = _store_failed(self._rules, self._metrics)
        elif answer is None:
            verdict = None
        else:
            rule = self._rules[answer[0]]
            verdict = Refusal(rule.name, min(answer[1], rule.max_retry_after))
        if verdict is None and self._redis is not None:
            (self._rules, submit), self._redis = self._redis, None
            submit(self)
            return
        self.verdict = verdict
        self.done = True
        if self._event is not None:
            self._event.set()
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(verdict)


def _store_failed(rules: tuple[_Rule, ...], metrics: Metrics) -> Refusal | None:
    """A store could not answer for `rules`: each is counted, and the first
    whose `on_store_error` is `deny` refuses; with none, the request passes."""
    refusal = None
    for rule in rules:
        metrics.rate_limit_store_errors.labels(rule.name).inc()
        if refusal is None and rule.deny_on_error:
            refusal = Refusal(rule.name, _STORE_RETRY_AFTER, store_failed=True)
    return refusal

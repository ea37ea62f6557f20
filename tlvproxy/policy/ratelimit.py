"""Rate limits: leaky buckets per (rule, key value) -> admit or refuse
(docs/configuration.md "rate_limits").

Owns: the arithmetic of a bucket, with the semantics of OpenResty's
resty.limit.req without delay: requests flow out at `rate` per second, up to
`burst` more are admitted at once, the next is refused. `RateLimiter` keeps the
buckets in one process and is the reference the shared stores (tlvproxy/stores/:
LMDB for `store: local` with workers, a Redis script for `store: redis`) are
tested against, on `ProcessBuckets`, which also keeps the `store: local`
buckets of a gateway that runs as one process;
`Plan` says which rules apply to a command, for all of them.
Must not: read a clock (the caller passes `now`, e.g. `trio.current_time()`),
import trio, answer, log or count; the caller turns a `Refusal` into 429 (REST)
or a per-message `rate_limited` error (WebSocket).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import attrs

from tlvproxy.errors import RateLimited

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

    from tlvproxy.config.keys import KeyExpr, RequestView
    from tlvproxy.config.model import RateLimitRule

# A request whose key is absent is limited under this key (docs/configuration.md
# "rate_limits").
ABSENT_KEY = "-"
# Float slack, in requests and seconds: a bucket that should have drained exactly
# in time (4.00001 - 2.00001 is not exactly 2.0) admits, and 2.0000000000000004 s
# of waiting is 2 s.
EPSILON = 1e-9
# Drained buckets expired per bucket added: more than one, so the map shrinks back
# once a crowd of keys goes quiet.
_EXPIRE_BATCH = 4

# A check's answer: None (every bucket counted the request), or the position of
# the first bucket that refused it and the seconds after which it would admit.
Verdict = tuple[int, int] | None


@attrs.frozen(slots=True)
class Refusal:
    """A rate limit refused the request: the rule's name and when to retry.

    `retry_after` is the whole number of seconds (at least 1) after which one
    request would be admitted, for the `Retry-After` header.
    """

    rule: str
    retry_after: int
    # True when the rule's store could not answer and its `on_store_error` is
    # `deny` (docs/configuration.md "When the store cannot answer").
    store_failed: bool = False

    def error(self) -> RateLimited:
        """The `rate_limited` error to answer with: 429 with Retry-After
        (docs/reference.md "Errors")."""
        if self.store_failed:
            return RateLimited(
                f"rate limit {self.rule!r} cannot be checked now; retry in {self.retry_after} s",
                self.retry_after,
            )
        return RateLimited(
            f"rate limit {self.rule!r} exceeded; retry in {self.retry_after} s",
            self.retry_after,
        )


class ProcessBuckets:
    """Leaky buckets by name in this process's memory: the arithmetic every
    store keeps, and the `store: local` buckets of a gateway that runs as one
    process (docs/configuration.md "Where the buckets live"), which needs no
    store shared with other processes.

    Each bucket holds a level: the requests it has admitted that have not yet
    flowed out at its rule's `rate`. A request raises it by one; it is refused
    when that would exceed `burst + 1`, so `burst + 1` requests pass at the
    same instant and one more every `1/rate` seconds after that.

    Memory: at most `max_keys` buckets. A bucket that has fully drained is
    worth nothing: each new bucket expires up to four drained ones from the
    least recently used end. Past `max_keys`, the least recently used bucket is
    evicted (that key then starts afresh, so the limit errs on the side of
    admitting); size `max_keys` above the number of keys active within
    `(burst + 1) / rate` seconds.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        # name -> [level, time of the last admission, rate], least recently used first.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many buckets are held now."""
        return len(self._buckets)

    def check(self, buckets: Sequence[tuple[Hashable, float, float]], now: float) -> Verdict:
        """Admit one request on every bucket of `buckets` (name, rate per
        second, burst) at time `now` (seconds, monotonic).

        Returns None when every bucket admits it (each then counting it), or
        the position in `buckets` of the first that refuses and the whole
        seconds (at least 1) after which it would admit; a refused request
        counts in no bucket.
        """
        held = self._buckets
        # Every bucket is checked before any counts the request.
        admitted: list[tuple[Hashable, list[float] | None, float, float]] = []
        for position, (name, rate, burst) in enumerate(buckets):
            bucket = held.get(name)
            if bucket is None:
                admitted.append((name, None, 1.0, rate))
                continue
            elapsed = now - bucket[1]
            level = bucket[0] - rate * elapsed if elapsed > 0.0 else bucket[0]
            if level - burst > EPSILON:
                # A refused key is in use: keep its buckets from eviction,
                # expiring at the rate it is refused at (a reload may change it).
                bucket[2] = rate
                for checked, existing, _, _ in admitted:
                    if existing is not None:
                        held.move_to_end(checked)
                held.move_to_end(name)
                wait = (level - burst) / rate
                return position, max(1, math.ceil(wait - EPSILON))
            admitted.append((name, bucket, level + 1.0 if level > 0.0 else 1.0, rate))
        added = 0
        for name, bucket, level, rate in admitted:
            if bucket is None:
                held[name] = [level, now, rate]
                added += 1
            else:
                bucket[0] = level
                bucket[1] = now
                bucket[2] = rate  # a reload may have changed it: expiry drains at this one
                held.move_to_end(name)
        if added:
            # After the updates: the buckets just counted hold at least one request
            # and sit at the recent end, so expiring never drops them.
            self._expire(now, _EXPIRE_BATCH * added)
        while len(held) > self.max_keys:
            held.popitem(last=False)
        return None

    def _expire(self, now: float, limit: int) -> None:
        # Called as buckets are added, so the map grows only by keys still in use:
        # drop drained buckets from the least recently used end, stopping at the
        # first that still holds something (the LRU cap bounds whatever lies
        # behind it). At most `limit`, so that after a long quiet spell no single
        # request pays for expiring the whole map.
        held = self._buckets
        for _ in range(limit):
            name = next(iter(held), None)
            if name is None:
                return
            level, last, rate = held[name]
            if level - rate * (now - last) > 0.0:
                return
            del held[name]


class RateLimiter:
    """The buckets of a table's `rate_limits` in one process, keyed by (rule,
    key value): the reference the shared stores (tlvproxy/stores/) are tested
    against, with `ProcessBuckets`' arithmetic and memory bound."""

    def __init__(self, rules: Sequence[RateLimitRule], *, max_keys: int = 100_000) -> None:
        """Raises ValueError for a rule whose rate is not positive or burst negative."""
        for rule in rules:
            if not rule.rate > 0:
                raise ValueError(f"rate limit {rule.name!r}: rate must be > 0, got {rule.rate}")
            if rule.burst < 0:
                raise ValueError(f"rate limit {rule.name!r}: burst must be >= 0, got {rule.burst}")
        self._rules = tuple(rules)
        self._store = ProcessBuckets(max_keys=max_keys)
        self.max_keys = max_keys
        # Which rules apply to a command, computed once: a command that no rule
        # names gets the rules without a `commands` list.
        named = {name for rule in self._rules for name in rule.commands or ()}
        self._unlisted = Plan.of(self._rules, "")
        self._plans = {name: Plan.of(self._rules, name) for name in named}

    def __len__(self) -> int:
        """How many buckets are held now."""
        return len(self._store)

    def applies(self, command_name: str) -> bool:
        """Whether any rule limits `command_name` (when not, `check` always admits)."""
        return bool(self._plans.get(command_name, self._unlisted).steps)

    def check(self, command_name: str, request: RequestView, now: float) -> Refusal | None:
        """Admit one request for `command_name` at time `now` (seconds, monotonic).

        Applies every rule whose `commands` is unset or lists `command_name`, each
        on the bucket of the value of its key in `request` ("-" when absent).
        Returns None when every rule admits it (and each bucket then counts it), or
        the `Refusal` of the first refusing rule in table order; a refused request
        counts in no bucket.
        """
        plan = self._plans.get(command_name, self._unlisted)
        if not plan.steps:
            return None
        values = [key.evaluate(request) for key in plan.keys]
        buckets = [
            ((index, ABSENT_KEY if values[position] is None else values[position]), rate, burst)
            for index, rate, burst, position in plan.steps
        ]
        verdict = self._store.check(buckets, now)
        if verdict is None:
            return None
        position, retry_after = verdict
        return Refusal(self._rules[plan.steps[position][0]].name, retry_after)


@attrs.frozen(slots=True)
class Plan:
    """The rules that apply to one command, in table order, and the distinct keys
    they read (each evaluated once per check)."""

    keys: tuple[KeyExpr, ...]
    steps: tuple[tuple[int, float, float, int], ...]  # (rule index, rate, burst, key position)

    @classmethod
    def of(cls, rules: tuple[RateLimitRule, ...], command_name: str) -> Plan:
        """The plan for `command_name` ("" for any command that no rule names)."""
        keys: dict[KeyExpr, int] = {}
        steps = []
        for index, rule in enumerate(rules):
            listed = rule.commands is None or command_name in rule.commands
            if listed:
                position = keys.setdefault(rule.key, len(keys))
                steps.append((index, rule.rate, float(rule.burst), position))
        return cls(tuple(keys), tuple(steps))

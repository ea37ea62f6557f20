"""Rate limits: leaky buckets per (rule, key value) -> admit or refuse
(docs/configuration.md "rate_limits").

Owns: the arithmetic of a bucket, with the semantics of OpenResty's
resty.limit.req without delay: requests flow out at `rate` per second, up to
`burst` more are admitted at once, the next is refused. `RateLimiter` keeps the
buckets in one process and is the reference the shared stores (tlvproxy/stores/:
LMDB for `store: local`, a Redis script for `store: redis`) are tested against;
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
    from collections.abc import Sequence

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


class RateLimiter:
    """The buckets of a table's `rate_limits` in one process: the reference
    arithmetic that the shared stores (tlvproxy/stores/) must agree with.

    Each bucket holds a level: the requests it has admitted that have not yet
    flowed out at `rate`. A request raises it by one; it is refused when that
    would exceed `burst + 1`, so `burst + 1` requests pass at the same instant and
    one more every `1/rate` seconds after that.

    Memory: at most `max_keys` buckets over all rules. A bucket that has fully
    drained is worth nothing: each new bucket expires up to four drained ones from
    the least recently used end. Past `max_keys`, the least recently used bucket
    is evicted (that key then starts afresh, so the limit errs on the side of
    admitting); size `max_keys` above the number of keys active within
    `(burst + 1) / rate` seconds.
    """

    def __init__(self, rules: Sequence[RateLimitRule], *, max_keys: int = 100_000) -> None:
        """Raises ValueError for a rule whose rate is not positive or burst negative."""
        for rule in rules:
            if not rule.rate > 0:
                raise ValueError(f"rate limit {rule.name!r}: rate must be > 0, got {rule.rate}")
            if rule.burst < 0:
                raise ValueError(f"rate limit {rule.name!r}: burst must be >= 0, got {rule.burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._rules = tuple(rules)
        # Which rules apply to a command, computed once: a command that no rule
        # names gets the rules without a `commands` list.
        named = {name for rule in self._rules for name in rule.commands or ()}
        self._unlisted = Plan.of(self._rules, "")
        self._plans = {name: Plan.of(self._rules, name) for name in named}
        # (rule index, key value) -> [level, time of the last admission], least
        # recently used first.
        self._buckets: OrderedDict[tuple[int, str], list[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many buckets are held now."""
        return len(self._buckets)

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
        buckets = self._buckets
        values = [key.evaluate(request) for key in plan.keys]
        # Every rule is checked before any bucket counts the request.
        admitted: list[tuple[tuple[int, str], list[float] | None, float]] = []
        for index, rate, burst, key_position in plan.steps:
            value = values[key_position]
            slot = (index, ABSENT_KEY if value is None else value)
            bucket = buckets.get(slot)
            if bucket is None:
                admitted.append((slot, None, 1.0))
                continue
            elapsed = now - bucket[1]
            level = bucket[0] - rate * elapsed if elapsed > 0.0 else bucket[0]
            if level - burst > EPSILON:
                # A refused key is in use: keep its buckets from eviction.
                for checked, existing, _ in admitted:
                    if existing is not None:
                        buckets.move_to_end(checked)
                buckets.move_to_end(slot)
                wait = (level - burst) / rate
                return Refusal(self._rules[index].name, max(1, math.ceil(wait - EPSILON)))
            admitted.append((slot, bucket, level + 1.0 if level > 0.0 else 1.0))
        added = 0
        for slot, bucket, level in admitted:
            if bucket is None:
                buckets[slot] = [level, now]
                added += 1
            else:
                bucket[0] = level
                bucket[1] = now
                buckets.move_to_end(slot)
        if added:
            # After the updates: the buckets just counted hold at least one request
            # and sit at the recent end, so expiring never drops them.
            self._expire(now, _EXPIRE_BATCH * added)
        while len(buckets) > self.max_keys:
            buckets.popitem(last=False)
        return None

    def _expire(self, now: float, limit: int) -> None:
        # Called as buckets are added, so the map grows only by keys still in use:
        # drop drained buckets from the least recently used end, stopping at the
        # first that still holds something (the LRU cap bounds whatever lies
        # behind it). At most `limit`, so that after a long quiet spell no single
        # request pays for expiring the whole map.
        buckets = self._buckets
        rules = self._rules
        for _ in range(limit):
            slot = next(iter(buckets), None)
            if slot is None:
                return
            level, last = buckets[slot]
            if level - rules[slot[0]].rate * (now - last) > 0.0:
                return
            del buckets[slot]


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

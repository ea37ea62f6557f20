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
from collections.abc import Collection, Hashable, Sequence
from typing import TYPE_CHECKING

import attrs

from tlvproxy.errors import RateLimited

if TYPE_CHECKING:
    from tlvproxy.config.keys import KeyExpr, RequestView
    from tlvproxy.config.model import RateLimitRule

# A request whose key is absent is limited under this key (docs/configuration.md
# "rate_limits").
ABSENT_KEY = "-"
# Float slack, in requests and seconds: a bucket that should have drained exactly
# in time (4.00001 - 2.00001 is not exactly 2.0) admits, and 2.0000000000000004 s
# of waiting is 2 s.
EPSILON = 1e-9
# Buckets looked at for expiry per bucket added: more than one, so the map
# shrinks back once a crowd of keys goes quiet.
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


class RuleBuckets(OrderedDict[Hashable, list[float]]):
    """A rule's buckets in one process: key value -> [level, time of the last
    admission], oldest first, and the rule's `rate` now, at which drained
    buckets are found (a reload may change it)."""

    __slots__ = ("rate",)

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate


# One rule of a check: its buckets, its rate per second and burst, and the
# position of its key's value in the check's values.
Step = tuple[RuleBuckets, float, float, int]


class ProcessBuckets:
    """Leaky buckets in this process's memory, by rule and key value: the
    arithmetic every store keeps, and the `store: local` buckets of a gateway
    that runs as one process (docs/configuration.md "Where the buckets live"),
    which needs no store shared with other processes.

    Each bucket holds a level: the requests it has admitted that have not yet
    flowed out at its rule's `rate`. A request raises it by one; it is refused
    when that would exceed `burst + 1`, so `burst + 1` requests pass at the
    same instant and one more every `1/rate` seconds after that.

    A rule's buckets are found by its name (`rule`), so a reload that keeps a
    rule keeps them. Memory: at most `max_keys` buckets per rule. A bucket that
    has fully drained is worth nothing: each new bucket looks at up to four of
    the rule's oldest, dropping those that have drained and moving the others
    to the recent end. Past `max_keys`, the rule's oldest bucket is evicted
    (that key then starts afresh, so the limit errs on the side of admitting);
    size `max_keys` above the number of keys active within `(burst + 1) / rate`
    seconds. A check that finds its bucket touches nothing but the bucket: the
    order is kept as buckets are added, not as they are used.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._rules: dict[str, RuleBuckets] = {}

    def __len__(self) -> int:
        """How many buckets are held now, every rule's."""
        return sum(len(held) for held in self._rules.values())

    def rule(self, name: str, rate: float) -> RuleBuckets:
        """The buckets of the rule named `name`, for the `Step`s of a check,
        draining at `rate` from now on."""
        held = self._rules.get(name)
        if held is None:
            held = self._rules[name] = RuleBuckets(rate)
        held.rate = rate
        return held

    def retain(self, names: Collection[str]) -> None:
        """Forget the buckets of every rule not in `names` (a reload dropped them)."""
        for name in [name for name in self._rules if name not in names]:
            del self._rules[name]

    def check(self, steps: Sequence[Step], values: Sequence[Hashable], now: float) -> Verdict:
        """Admit one request on the bucket of each rule of `steps` at time
        `now` (seconds, monotonic): the bucket of the value at the step's key
        position in `values`.

        Returns None when every bucket admits it (each then counting it), or
        the position in `steps` of the first that refuses and the whole
        seconds (at least 1) after which it would admit; a refused request
        counts in no bucket.
        """
        # Each bucket counts the request as it admits it; a refusal takes the
        # request back out of those before it (`_uncount`).
        for position, (held, rate, burst, key) in enumerate(steps):
            value = values[key]
            bucket = held.get(value)
            if bucket is None:
                _expire(held, now)
                held[value] = [1.0, now]
                if len(held) > self.max_keys:
                    held.popitem(last=False)
                continue
            elapsed = now - bucket[1]
            level = bucket[0] - rate * elapsed if elapsed > 0.0 else bucket[0]
            if level - burst > EPSILON:
                _uncount(steps[:position], values)
                wait = (level - burst) / rate
                return position, max(1, math.ceil(wait - EPSILON))
            bucket[0] = level + 1.0 if level > 0.0 else 1.0
            bucket[1] = now
        return None


def _uncount(steps: Sequence[Step], values: Sequence[Hashable]) -> None:
    # Each of these buckets counted the request at `now`, which is now its
    # time: one less is the level it had drained to by then, which admits
    # exactly as its state before the check did (a bucket added by the check
    # goes back to empty, as good as absent).
    for held, _, _, key in steps:
        held[values[key]][0] -= 1.0


def _expire(held: RuleBuckets, now: float) -> None:
    # Called before a bucket is added, so a rule's map grows only by keys still
    # in use: of the _EXPIRE_BATCH oldest buckets, drop those that have drained,
    # and move the others to the recent end, so that the next look goes on
    # past them. A few at a time, so that after a long quiet spell no single
    # request pays for expiring the whole map.
    rate = held.rate
    for _ in range(_EXPIRE_BATCH):
        value = next(iter(held), None)
        if value is None:
            return
        level, last = held[value]
        if level - rate * (now - last) > 0.0:
            held.move_to_end(value)
        else:
            del held[value]


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
        self._unlisted = self._plan("")
        self._plans = {name: self._plan(name) for name in named}

    def _plan(self, command_name: str) -> tuple[Plan, tuple[Step, ...]]:
        plan = Plan.of(self._rules, command_name)
        steps = tuple(
            (self._store.rule(self._rules[index].name, rate), rate, burst, position)
            for index, rate, burst, position in plan.steps
        )
        return plan, steps

    def __len__(self) -> int:
        """How many buckets are held now."""
        return len(self._store)

    def applies(self, command_name: str) -> bool:
        """Whether any rule limits `command_name` (when not, `check` always admits)."""
        return bool(self._plans.get(command_name, self._unlisted)[1])

    def check(self, command_name: str, request: RequestView, now: float) -> Refusal | None:
        """Admit one request for `command_name` at time `now` (seconds, monotonic).

        Applies every rule whose `commands` is unset or lists `command_name`, each
        on the bucket of the value of its key in `request` ("-" when absent).
        Returns None when every rule admits it (and each bucket then counts it), or
        the `Refusal` of the first refusing rule in table order; a refused request
        counts in no bucket.
        """
        plan, steps = self._plans.get(command_name, self._unlisted)
        if not steps:
            return None
        values = [key.evaluate(request) for key in plan.keys]
        verdict = self._store.check(
            steps, [ABSENT_KEY if value is None else value for value in values], now
        )
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

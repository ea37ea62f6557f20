"""Leaky-bucket rate limits (SPEC 4.4): burst, refusal, recovery, keys and memory."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlvproxy.config.keys import parse_key
from tlvproxy.config.model import RateLimitRule
from tlvproxy.errors import RateLimited
from tlvproxy.policy.ratelimit import ProcessBuckets, RateLimiter, Refusal

if TYPE_CHECKING:
    from collections.abc import Mapping


@attrs.frozen
class Request:
    """A RequestView as the servers build one."""

    remote_addr: str = "10.0.0.1"
    headers: Mapping[str, str] = attrs.field(factory=dict)
    query: Mapping[str, str] = attrs.field(factory=dict)
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    identity: None = None
    numbers: None = None


def user(uid: str) -> Request:
    return Request(headers={"x-user-id": uid})


def rule(
    name: str = "per_user",
    *,
    rate: float = 10.0,
    burst: int = 2,
    key: str = "header.X-User-Id",
    commands: tuple[str, ...] | None = None,
) -> RateLimitRule:
    return RateLimitRule(name=name, commands=commands, key=parse_key(key), rate=rate, burst=burst)


def admitted(limiter: RateLimiter, request: Request, now: float, n: int, cmd: str = "send") -> int:
    return sum(limiter.check(cmd, request, now) is None for _ in range(n))


def test_burst_then_refusal_then_recovery_after_one_interval():
    # rate 4/s: 1/rate = 0.25 s is exact in binary floating point.
    limiter = RateLimiter([rule(rate=4.0, burst=2)])
    alice = user("alice")
    assert [limiter.check("send", alice, 0.0) for _ in range(3)] == [None, None, None]
    assert limiter.check("send", alice, 0.0) == Refusal("per_user", 1)
    assert limiter.check("send", alice, 0.2499) == Refusal("per_user", 1)
    assert limiter.check("send", alice, 0.25) is None
    assert limiter.check("send", alice, 0.25) == Refusal("per_user", 1)
    assert limiter.check("send", alice, 0.5) is None


def test_zero_burst_admits_one_per_interval():
    limiter = RateLimiter([rule(rate=2.0, burst=0)])
    alice = user("alice")
    assert admitted(limiter, alice, 0.0, 5) == 1
    assert admitted(limiter, alice, 0.5, 5) == 1
    assert admitted(limiter, alice, 1.0, 5) == 1


def test_long_idle_refills_only_up_to_burst():
    limiter = RateLimiter([rule(rate=10.0, burst=3)])
    alice = user("alice")
    assert admitted(limiter, alice, 0.0, 10) == 4
    assert admitted(limiter, alice, 3600.0, 10) == 4


def test_refused_requests_do_not_consume():
    limiter = RateLimiter([rule(rate=1.0, burst=0)])
    alice = user("alice")
    assert limiter.check("send", alice, 0.0) is None
    for tenth in range(1, 10):
        assert limiter.check("send", alice, tenth / 10) is not None
    assert limiter.check("send", alice, 1.0) is None


@pytest.mark.parametrize(
    ("rate", "burst", "now", "retry_after"),
    [
        (10.0, 0, 0.0, 1),  # 0.1 s rounds up to 1
        (0.5, 0, 0.0, 2),  # exactly 2 s stays 2
        (0.5, 0, 0.5, 2),  # 1.5 s rounds up to 2
        (0.5, 0, 1.9, 1),  # 0.1 s left
        (1 / 3, 0, 0.0, 3),
        (1 / 3, 0, 1.0, 2),  # 2 s, though floats compute 2.0000000000000004
        (1 / 7, 0, 4.0, 3),  # 3 s, though floats compute 3.0000000000000004
        (0.1, 4, 0.0, 10),
    ],
)
def test_retry_after_is_seconds_until_admitted_rounded_up(rate, burst, now, retry_after):
    limiter = RateLimiter([rule(rate=rate, burst=burst)])
    alice = user("alice")
    assert admitted(limiter, alice, 0.0, burst + 1) == burst + 1
    refusal = limiter.check("send", alice, now)
    assert refusal == Refusal("per_user", retry_after)


def test_keys_are_isolated():
    limiter = RateLimiter([rule(rate=1.0, burst=1)])
    assert admitted(limiter, user("alice"), 0.0, 5) == 2
    assert admitted(limiter, user("bob"), 0.0, 5) == 2
    assert limiter.check("send", user("alice"), 0.0) is not None
    assert len(limiter) == 2


def test_absent_key_is_limited_under_dash():
    limiter = RateLimiter([rule(rate=1.0, burst=1)])
    anonymous = Request()
    assert admitted(limiter, anonymous, 0.0, 1) == 1
    assert admitted(limiter, Request(remote_addr="10.9.9.9"), 0.0, 5) == 1
    # A caller whose header literally says "-" shares that bucket (SPEC 4.4).
    assert limiter.check("send", user("-"), 0.0) == Refusal("per_user", 1)


@pytest.mark.parametrize(
    ("key", "request_a", "request_b"),
    [
        ("remote_addr", Request(remote_addr="1.1.1.1"), Request(remote_addr="2.2.2.2")),
        ("query.did", Request(query={"did": "a"}), Request(query={"did": "b"})),
        (
            "path.user_id",
            Request(path_params={"user_id": "1"}),
            Request(path_params={"user_id": "2"}),
        ),
        ("cookie.sid", Request(headers={"cookie": "sid=a"}), Request(headers={"cookie": "sid=b"})),
    ],
)
def test_every_key_expression_separates_buckets(key, request_a, request_b):
    limiter = RateLimiter([rule(rate=1.0, burst=0, key=key)])
    assert admitted(limiter, request_a, 0.0, 3) == 1
    assert admitted(limiter, request_b, 0.0, 3) == 1


def test_commands_filter():
    limiter = RateLimiter([rule(rate=1.0, burst=0, commands=("send_message",))])
    alice = user("alice")
    assert limiter.applies("send_message")
    assert not limiter.applies("get_profile")
    assert admitted(limiter, alice, 0.0, 3, cmd="send_message") == 1
    assert admitted(limiter, alice, 0.0, 3, cmd="get_profile") == 3
    assert len(limiter) == 1


def test_rule_without_commands_limits_every_command_in_one_bucket():
    limiter = RateLimiter([rule(rate=1.0, burst=1)])
    alice = user("alice")
    assert limiter.applies("anything")
    assert limiter.check("send_message", alice, 0.0) is None
    assert limiter.check("get_profile", alice, 0.0) is None
    assert limiter.check("echo", alice, 0.0) == Refusal("per_user", 1)


def test_first_refusing_rule_is_reported_and_nothing_is_consumed():
    global_rule = rule("global", rate=100.0, burst=0, key="remote_addr")
    strict = rule("strict", rate=1.0, burst=0, commands=("send",))
    limiter = RateLimiter([global_rule, strict])
    alice = user("alice")
    assert limiter.check("send", alice, 0.0) is None
    # "strict" refuses at 0.5 s; "global" (which would admit) must not count it,
    # so a different command admitted by "global" alone still passes at 0.5 s.
    assert limiter.check("send", alice, 0.5) == Refusal("strict", 1)
    assert limiter.check("other", alice, 0.5) is None
    assert limiter.check("other", alice, 0.5) == Refusal("global", 1)


def test_table_order_decides_which_refusal_is_reported():
    first = rule("first", rate=1.0, burst=0)
    second = rule("second", rate=1.0, burst=0)
    limiter = RateLimiter([first, second])
    assert limiter.check("send", user("a"), 0.0) is None
    assert limiter.check("send", user("a"), 0.0) == Refusal("first", 1)


def test_no_rules_admit_everything():
    limiter = RateLimiter([])
    assert not limiter.applies("send")
    assert admitted(limiter, user("a"), 0.0, 100) == 100
    assert len(limiter) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0}, "rate must be > 0"),
        ({"rate": -1.0}, "rate must be > 0"),
        ({"rate": float("nan")}, "rate must be > 0"),
        ({"burst": -1}, "burst must be >= 0"),
    ],
)
def test_bad_rules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        RateLimiter([rule("bad", **kwargs)])
    assert "'bad'" in str(info.value)


def test_bad_max_keys_is_rejected():
    with pytest.raises(ValueError, match="max_keys must be >= 1"):
        RateLimiter([rule()], max_keys=0)


def test_refusal_renders_as_rate_limited_error():
    error = Refusal("per_user", 3).error()
    assert isinstance(error, RateLimited)
    assert error.http_status == 429
    assert error.code == "rate_limited"
    assert error.headers() == [("Retry-After", "3")]
    assert "per_user" in error.message


def test_drained_buckets_expire():
    limiter = RateLimiter([rule(rate=10.0, burst=5)])
    for i in range(1000):
        assert limiter.check("send", user(str(i)), 0.0) is None
    assert len(limiter) == 1000
    # Every bucket held one request, drained after 0.1 s; each new key expires
    # up to four drained ones, oldest first.
    assert limiter.check("send", user("late"), 0.1) is None
    assert len(limiter) == 1000 - 4 + 1
    for i in range(300):
        assert limiter.check("send", user(f"new{i}"), 0.1) is None
    assert len(limiter) == 300 + 1  # and "late"
    # The expired keys start afresh: a full burst again.
    assert admitted(limiter, user("0"), 0.1, 10) == 6


def test_buckets_still_draining_are_kept():
    limiter = RateLimiter([rule(rate=1.0, burst=5)])
    assert admitted(limiter, user("old"), 0.0, 3) == 3
    assert limiter.check("send", user("new"), 2.5) is None
    assert len(limiter) == 2
    # "old" still holds half a request: 5 more pass, not 6.
    assert admitted(limiter, user("old"), 2.5, 10) == 5


def test_the_cap_evicts_the_oldest_bucket():
    limiter = RateLimiter([rule(rate=0.001, burst=0)], max_keys=2)
    assert limiter.check("send", user("a"), 0.0) is None
    assert limiter.check("send", user("b"), 0.0) is None
    assert limiter.check("send", user("a"), 1.0) is not None  # using "a" does not renew it
    assert limiter.check("send", user("c"), 1.0) is None  # evicts "a", the oldest
    assert len(limiter) == 2
    assert limiter.check("send", user("b"), 1.0) is not None
    assert limiter.check("send", user("a"), 1.0) is None  # forgotten, so admitted


def test_expiry_goes_on_past_buckets_still_draining():
    # The oldest buckets still hold requests: each new key moves them to the
    # recent end, so the drained ones behind them are found and dropped.
    limiter = RateLimiter([rule(rate=1.0, burst=5)])
    assert admitted(limiter, user("busy"), 0.0, 6) == 6  # drains by 6.0
    for i in range(8):
        assert limiter.check("send", user(f"idle{i}"), 0.0) is None  # each drained by 1.0
    assert len(limiter) == 9
    for i in range(3):
        assert limiter.check("send", user(f"new{i}"), 2.0) is None
    assert len(limiter) == 1 + 3  # "busy" and the new keys
    assert limiter.check("send", user("busy"), 2.0) is None  # still counted: 4 left, 1 more
    assert limiter.check("send", user("busy"), 2.0) is None
    assert limiter.check("send", user("busy"), 2.0) is not None


@attrs.frozen
class UserOnly:
    """The cheapest RequestView for the million-key test: only the header it uses."""

    uid: str
    remote_addr: str = "10.0.0.1"
    query: Mapping[str, str] = attrs.field(factory=dict)
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    identity: None = None
    numbers: None = None

    @property
    def headers(self) -> Mapping[str, str]:
        return {"x-user-id": self.uid}


def test_memory_stays_bounded_under_millions_of_keys():
    cap = 5_000
    # A rate so slow that nothing drains: only the LRU cap bounds the map.
    limiter = RateLimiter([rule(rate=0.001, burst=3)], max_keys=cap)
    check = limiter.check
    largest = 0
    for i in range(1_100_000):
        assert check("send", UserOnly(str(i)), i * 1e-6) is None
        if i % 1000 == 0:
            largest = max(largest, len(limiter))
    assert largest == cap
    assert len(limiter) == cap


_times = st.lists(
    st.floats(min_value=0.0, max_value=5.0, allow_nan=False), min_size=1, max_size=200
).map(sorted)


@given(
    times=_times,
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 1 / 3]),
    burst=st.integers(0, 5),
)
def test_admitted_never_exceed_burst_plus_rate_times_elapsed(times, rate, burst):
    limiter = RateLimiter([rule(rate=rate, burst=burst)])
    alice = user("alice")
    admitted_at = [t for t in times if limiter.check("send", alice, t) is None]
    assert admitted_at, "the first request is always admitted"
    # Over every window, not only from the first request.
    for i, start in enumerate(admitted_at):
        for j in range(i, len(admitted_at)):
            count = j - i + 1
            assert count <= burst + 1 + rate * (admitted_at[j] - start) + 1e-9


@given(
    times=_times,
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 1 / 3]),
    burst=st.integers(0, 5),
)
def test_retry_after_is_honoured(times, rate, burst):
    limiter = RateLimiter([rule(rate=rate, burst=burst)])
    alice = user("alice")
    for t in times:
        refusal = limiter.check("send", alice, t)
        if refusal is not None:
            assert refusal.retry_after >= 1
            assert limiter.check("send", alice, t + refusal.retry_after) is None
            return


def test_policy_modules_do_not_import_trio():
    code = (
        "import sys, tlvproxy.policy.ratelimit, tlvproxy.policy.waf; "
        "sys.exit('trio' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False)
    assert result.returncode == 0


def test_recovery_is_exact_despite_float_subtraction():
    # Found by hypothesis: 4.00001 - 2.00001 is 1.9999999999999998, which left a
    # sliver in the bucket and refused the request Retry-After promised to admit.
    limiter = RateLimiter([rule(rate=0.5, burst=0)])
    alice = user("alice")
    assert limiter.check("send", alice, 2.00001) is None
    assert limiter.check("send", alice, 2.00001) == Refusal("per_user", 2)
    assert limiter.check("send", alice, 4.00001) is None


def test_a_bucket_drains_at_its_rules_rate_of_now_after_a_reload():
    # A reload that slows a rule must not let its buckets expire at the old,
    # faster rate: the bucket of a key at its limit would be dropped, and the
    # key get a whole new burst at once.
    store = ProcessBuckets(max_keys=10)
    fast = (store.rule("per_user", 100.0), 100.0, 0.0, 0)
    assert store.check([fast], ["attacker"], 0.0) is None
    slow = (store.rule("per_user", 1 / 60), 1 / 60, 0.0, 0)  # the reload
    assert store.check([slow], ["attacker"], 0.001) == (0, 60)  # the reloaded rule refuses
    for n in range(5):  # other keys come: each new bucket expires drained ones
        assert store.check([slow], [f"other{n}"], 1.0) is None
    # still the first admission, draining slowly
    assert store.check([slow], ["attacker"], 1.0) == (0, 59)

"""Split rules (SPEC 4.6): tail, values and percent on a key, the first match
winning, and the stable hash behind percent."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlvproxy.config.keys import parse_key
from tlvproxy.config.model import SplitRule
from tlvproxy.policy.split import bucket, first_match, matches

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.keys import KeyExpr


@attrs.frozen
class Request:
    """A RequestView as the servers build one."""

    remote_addr: str = "10.0.0.1"
    headers: Mapping[str, str] = attrs.field(factory=dict)
    query: Mapping[str, str] = attrs.field(factory=dict)
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    identity: None = None
    numbers: Mapping[KeyExpr, str] | None = None


def rule(key: str = "query.uid", **kind: object) -> SplitRule:
    return SplitRule(key=parse_key(key), to="next", **kind)  # type: ignore[arg-type]


def test_the_hash_is_blake2b_of_the_utf8_key_modulo_10000() -> None:
    # Fixed values: a gateway of another version, or on another machine, must
    # put each key in the same bucket.
    assert [bucket(key) for key in ("", "42", "alice", "device-1", "用户")] == [
        9876,
        1738,
        4729,
        3323,
        2718,
    ]
    digest = hashlib.blake2b("用户".encode(), digest_size=8).digest()
    assert bucket("用户") == int.from_bytes(digest, "big") % 10000


def test_the_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    keys = [f"user-{n}" for n in range(50)]
    program = (
        "import sys; from tlvproxy.policy.split import bucket; "
        "print(','.join(str(bucket(k)) for k in sys.argv[1:]))"
    )
    found = set()
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", program, *keys],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        found.add(result.stdout.strip())
    assert found == {",".join(str(bucket(k)) for k in keys)}


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_percent_takes_within_one_point_of_p_over_10000_keys(percent: int) -> None:
    split = rule(percent=percent * 100)
    taken = sum(matches(split, f"{n}") for n in range(10_000))
    assert abs(taken / 10_000 - percent / 100) <= 0.01


@given(st.text(max_size=40), st.integers(0, 10_000), st.integers(0, 10_000))
def test_raising_percent_keeps_the_keys_it_took(key: str, low: int, high: int) -> None:
    low, high = sorted((low, high))
    if matches(rule(percent=low), key):
        assert matches(rule(percent=high), key)


def test_percent_edges() -> None:
    assert not any(matches(rule(percent=0), str(n)) for n in range(1000))
    assert all(matches(rule(percent=10_000), str(n)) for n in range(1000))


@pytest.mark.parametrize(
    ("value", "taken"),
    [("10", True), ("21", True), ("1232", False), ("7", False), ("", False), ("1a", False)],
)
def test_tail_reads_the_last_decimal_digit(value: str, taken: bool) -> None:
    assert matches(rule(tail=frozenset({0, 1})), value) is taken


def test_values_and_an_absent_key() -> None:
    listed = rule(values=frozenset({"beta", "42"}))
    assert matches(listed, "beta")
    assert matches(listed, "42")
    assert not matches(listed, "Beta")
    assert not matches(listed, "042")
    for kind in ({"values": frozenset({""})}, {"tail": frozenset(range(10))}, {"percent": 10_000}):
        assert not matches(rule(**kind), None)


def test_the_first_matching_rule_wins() -> None:
    rules = [
        rule("header.x-group", values=frozenset({"beta"})),
        rule("query.uid", tail=frozenset({1})),
        rule("query.uid", percent=10_000),
    ]
    assert first_match(rules, Request(headers={"x-group": "beta"}, query={"uid": "1"}), ()) == 0
    assert first_match(rules, Request(query={"uid": "11"}), ()) == 1
    assert first_match(rules, Request(query={"uid": "12"}), ()) == 2
    assert first_match(rules, Request(), ()) is None


def test_an_empty_key_is_absent() -> None:
    # `?did=`: no rule takes it, not even 100%, whose hash of "" it would be in.
    rules = [
        rule("query.did", values=frozenset({""})),
        rule("query.did", percent=10_000),
    ]
    assert first_match(rules, Request(query={"did": ""}), ()) is None
    assert first_match(rules, Request(query={"did": "a"}), ()) == 1


def test_a_key_that_fills_a_number_reads_the_number_though_nobody_read_it_yet() -> None:
    # A WebSocket session reads only its own uid: the split reads the others
    # as a REST request of the command has them read, `007` as `7`.
    uid = parse_key("query.uid")
    rules = [rule("query.uid", values=frozenset({"7"})), rule("query.uid", percent=10_000)]
    assert first_match(rules, Request(query={"uid": "007"}), {uid}) == 0
    assert first_match(rules, Request(query={"uid": "+7"}), {uid}) == 0
    assert first_match(rules, Request(query={"uid": "007"}), ()) == 1
    # Already read (REST): the same number.
    assert first_match(rules, Request(query={"uid": "007"}, numbers={uid: "7"}), {uid}) == 0
    # No number: absent, as a REST request would have been refused.
    assert first_match(rules, Request(query={"uid": "7a"}), {uid}) is None

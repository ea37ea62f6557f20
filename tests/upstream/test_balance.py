"""Balancing algorithms, pure (no trio, no sockets)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from tlvproxy.upstream.balance import HashRing, RoundRobin, stable_hash


def test_smooth_round_robin_interleaves_by_weight() -> None:
    rr = RoundRobin([5, 1, 1])
    picks = [rr.choose([True, True, True]) for _ in range(14)]
    # nginx's smooth weighted round robin: a a b a c a a, twice.
    assert picks == [0, 0, 1, 0, 2, 0, 0] * 2


def test_round_robin_skips_ineligible_nodes_and_keeps_the_ratio() -> None:
    rr = RoundRobin([3, 2, 1])
    picks = Counter(rr.choose([True, False, True]) for _ in range(400))
    assert picks == {0: 300, 2: 100}
    assert rr.choose([False, False, False]) is None


@pytest.mark.parametrize("weights", [[], [1, 0]])
def test_round_robin_rejects_bad_weights(weights: list[int]) -> None:
    with pytest.raises(ValueError, match="at least"):
        RoundRobin(weights)


def nodes(count: int) -> list[tuple[str, int]]:
    return [(f"10.0.0.{i}:7001", 1) for i in range(count)]


KEYS = [f"device-{i}" for i in range(20_000)]


def test_the_ring_is_stable_across_instances_and_processes() -> None:
    first = HashRing(nodes(5))
    second = HashRing(nodes(5))
    owners = [first.owner(k) for k in KEYS[:500]]
    assert owners == [second.owner(k) for k in KEYS[:500]]
    # Every worker process must agree: no dependence on PYTHONHASHSEED.
    script = (
        "from tlvproxy.upstream.balance import HashRing;"
        f"ring = HashRing({nodes(5)!r});"
        f"print([ring.owner(k) for k in {KEYS[:500]!r}])"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == str(owners)
    assert stable_hash("device-1") != stable_hash("device-2")


def test_removing_one_of_n_nodes_moves_only_its_keys() -> None:
    full = HashRing(nodes(5))
    fewer = HashRing(nodes(5)[:2] + nodes(5)[3:])  # 10.0.0.2 removed from the table
    before = [full.owner(k) for k in KEYS]
    names = [name for name, _ in nodes(5)]
    remaining = [name for i, name in enumerate(names) if i != 2]
    after = [remaining[fewer.owner(k)] for k in KEYS]
    moved = [k for k, b, a in zip(KEYS, before, after, strict=True) if names[b] != a]
    assert moved == [k for k, b in zip(KEYS, before, strict=True) if b == 2]
    assert 0.14 < len(moved) / len(KEYS) < 0.26  # about 1/N


def test_an_ineligible_node_moves_only_its_keys_to_the_next_one() -> None:
    ring = HashRing(nodes(4))
    all_up = [True] * 4
    node_down = [True, False, True, True]
    for key in KEYS[:2000]:
        owner = ring.choose(key, all_up)
        assert owner == ring.owner(key)
        chosen = ring.choose(key, node_down)
        assert chosen == owner if owner != 1 else chosen in (0, 2, 3)
    assert ring.choose("x", [False] * 4) is None


def test_ring_points_follow_weights() -> None:
    ring = HashRing([("a:1", 3), ("b:1", 1)])
    share = Counter(ring.owner(k) for k in KEYS)
    assert 0.68 < share[0] / len(KEYS) < 0.82


@pytest.mark.parametrize(
    ("ring_nodes", "message"),
    [([], "at least one node"), ([("a", 1), ("a", 2)], "distinct"), ([("a", 0)], "at least 1")],
)
def test_ring_rejects_bad_nodes(ring_nodes: list[tuple[str, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashRing(ring_nodes)


def test_a_ring_of_heavy_nodes_is_capped_and_keeps_their_proportions() -> None:
    from tlvproxy.upstream.balance import MAX_RING_POINTS

    ring = HashRing([(f"10.0.{i // 250}.{i % 250}:7001", 1000 if i else 3000) for i in range(1000)])
    assert len(ring._points) <= MAX_RING_POINTS + 1000
    owned = Counter(ring._owners)
    assert abs(owned[0] - 3 * owned[1]) <= 3

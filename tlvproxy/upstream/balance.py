"""Node choice for an upstream: smooth weighted round robin and a consistent-hash ring.

Owns: the two `balance` algorithms (docs/configuration.md "upstreams"), over node indexes.
Must not: import trio, read a clock or know about connections; the pool says which
nodes are eligible (healthy, reachable, not yet tried) on every call.

Both skip ineligible nodes. `RoundRobin` is nginx's smooth weighted round robin
(ngx_http_upstream_get_peer): every eligible node gains its weight, the richest is
chosen and pays the total, so weights 5:1:1 give a,a,b,a,c,a,a rather than bursts.
`HashRing` puts `POINTS_PER_WEIGHT * weight` points per node (fewer in proportion
past MAX_RING_POINTS) on a 64-bit ring with a
stable hash (blake2b, never Python's randomised `hash()`), so every process maps a key
to the same node, and a node leaving moves only the keys it owned (about 1/N of them):
each key walks clockwise to the first eligible node.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

POINTS_PER_WEIGHT: Final = 160
# The points of a ring, at most (plus one per node): weights come from whoever
# registers in etcd (up to 1000 each, 1000 nodes), and a ring of 160 points per
# weight unit would take seconds to build. Past it, each node gets points in
# proportion to its weight, at least one (docs/configuration.md "upstreams").
MAX_RING_POINTS: Final = 32_768


class RoundRobin:
    """Smooth weighted round robin over node indexes 0..len(weights)-1.

    Raises ValueError for an empty list or a weight below 1.
    """

    __slots__ = ("_current", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights:
            raise ValueError("round robin needs at least one node")
        if any(w < 1 for w in weights):
            raise ValueError(f"node weights must be at least 1, got {list(weights)}")
        self._weights = tuple(weights)
        self._current = [0] * len(weights)

    def choose(self, eligible: Sequence[bool]) -> int | None:
        """The next node among those with `eligible[i]` true, or None if there is none."""
        best = -1
        total = 0
        current = self._current
        for i, weight in enumerate(self._weights):
            if not eligible[i]:
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return best


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over `nodes`, given as (name, weight) pairs.

    A node's points are the hashes of "NAME#i", so they depend only on its own name:
    adding or removing another node leaves them in place. Raises ValueError for an
    empty list, a repeated name or a weight below 1.
    """

    __slots__ = ("_owners", "_points")

    def __init__(
        self,
        nodes: Sequence[tuple[str, int]],
        *,
        points_per_weight: int = POINTS_PER_WEIGHT,
        max_points: int = MAX_RING_POINTS,
    ) -> None:
        if not nodes:
            raise ValueError("a hash ring needs at least one node")
        names = [name for name, _ in nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be distinct, got {names}")
        if any(weight < 1 for _, weight in nodes):
            raise ValueError(f"node weights must be at least 1, got {[w for _, w in nodes]}")
        total = points_per_weight * sum(weight for _, weight in nodes)

        def points(weight: int) -> int:
            if total <= max_points:
                return points_per_weight * weight
            return max(1, points_per_weight * weight * max_points // total)

        ring = sorted(
            (stable_hash(f"{name}#{i}"), index)
            for index, (name, weight) in enumerate(nodes)
            for i in range(points(weight))
        )
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]

    def owner(self, key: str) -> int:
        """The node owning `key` when every node is eligible."""
        return self._owners[self._position(key)]

    def choose(self, key: str, eligible: Sequence[bool]) -> int | None:
        """The first eligible node clockwise from `key`'s point, or None if there is none."""
        if not any(eligible):
            return None
        owners = self._owners
        start = self._position(key)
        size = len(owners)
        for step in range(size):
            node = owners[(start + step) % size]
            if eligible[node]:
                return node
        return None

    def _position(self, key: str) -> int:
        return bisect.bisect_left(self._points, stable_hash(key)) % len(self._points)

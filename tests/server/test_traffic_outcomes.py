"""Mirrored copies' outcomes (SPEC 4.6): worked out by `Traffic.run` once both
answers are in, a large comparison in steps that let other tasks run, and
the bound of 1,000 copies outstanding."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import trio.testing

from tlvproxy.config.loader import parse_table
from tlvproxy.errors import UpstreamUnavailable
from tlvproxy.framing import FLAG_RESPONSE, Frame
from tlvproxy.metrics import Metrics
from tlvproxy.server.traffic import COMPARE_STEP, MAX_OUTSTANDING, Traffic
from tlvproxy.upstream.pool import open_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tlvproxy.server.traffic import CommandTraffic

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"

TABLE = f"""
proto: {{paths: [{PROTO_ROOT}], files: [demo/im.proto]}}
upstreams:
  im: {{nodes: [127.0.0.1:9]}}
  im_next: {{nodes: [127.0.0.1:9]}}
commands:
  - name: big
    command: 0x1003
    upstream: im
    codec: json
    mirror: {{to: big_next, compare: true}}
  - {{name: big_next, command: 0x1003, upstream: im_next, codec: json}}
"""


def answer(body: object) -> Frame:
    return Frame(command=0x1003, seq=1, flags=FLAG_RESPONSE, body=json.dumps(body).encode())


def outstanding(metrics: Metrics) -> float:
    found = metrics.registry.get_sample_value("tlvproxy_mirror_outstanding")
    assert found is not None
    return found


def outcome(metrics: Metrics, name: str) -> float:
    found = metrics.registry.get_sample_value(
        "tlvproxy_mirror_total", {"command": "big", "outcome": name}
    )
    return 0.0 if found is None else found


@asynccontextmanager
async def rules(metrics: Metrics, nursery: trio.Nursery) -> AsyncIterator[CommandTraffic]:
    """The `big` command's rules on a running `Traffic` (its pools never used)."""
    table = parse_table(TABLE, Path("commands.yaml"))
    traffic = Traffic(metrics)
    await nursery.start(traffic.run)
    async with open_pool(table.upstreams["im_next"], table.framing, metrics) as pool:
        yield traffic.for_table(table, {"im_next": pool})["big"]


async def test_a_large_comparison_lets_other_tasks_run_between_its_steps() -> None:
    metrics = Metrics()
    ticks = 0

    async def ticker() -> None:
        # Runs until the outcome is counted: each pass of it is a scheduler
        # pass the comparison left to other tasks.
        nonlocal ticks
        while outcome(metrics, "different") == 0:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery, rules(metrics, nursery) as big:
        size = 20 * COMPARE_STEP
        copy = big.copy(big.command, "request-1")
        assert copy is not None
        copy.primary_answered(answer(list(range(size))))
        copy.on_reply(answer([*range(size - 1), -1]), "127.0.0.1:9")
        nursery.start_soon(ticker)
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
        assert outcome(metrics, "different") == 1
        # About one pass per step of COMPARE_STEP elements.
        assert ticks >= 10
        nursery.cancel_scope.cancel()


async def test_beyond_max_outstanding_copies_are_dropped_until_some_are_worked_out() -> None:
    metrics = Metrics()
    async with trio.open_nursery() as nursery, rules(metrics, nursery) as big:
        copies = [big.copy(big.command, str(n)) for n in range(MAX_OUTSTANDING + 5)]
        kept = [copy for copy in copies if copy is not None]
        assert len(kept) == MAX_OUTSTANDING
        assert outstanding(metrics) == MAX_OUTSTANDING
        assert outcome(metrics, "dropped") == 5
        # A copy with both answers in makes room once worked out; one with a
        # single answer keeps its place.
        kept[0].primary_answered(answer({"a": 1}))
        kept[0].on_reply(answer({"a": 1}), "127.0.0.1:9")
        kept[1].primary_answered(answer({"a": 1}))
        await trio.testing.wait_all_tasks_blocked()
        assert big.owner.outstanding == MAX_OUTSTANDING - 1
        assert outcome(metrics, "same") == 1
        assert big.copy(big.command, "again") is not None
        assert big.copy(big.command, "too many") is None
        assert outcome(metrics, "dropped") == 6
        # A copy that fails, or whose caller's request does, is `failed`.
        kept[1].on_error(UpstreamUnavailable("the connection was lost"), None)
        kept[2].primary_failed()
        kept[2].on_reply(answer({"a": 1}), "127.0.0.1:9")
        await trio.testing.wait_all_tasks_blocked()
        assert outcome(metrics, "failed") == 2
        assert big.owner.outstanding == outstanding(metrics) == MAX_OUTSTANDING - 2
        nursery.cancel_scope.cancel()

"""Mirrored copies' outcomes (SPEC 4.6): sent to the real demo service, worked
out by `Traffic.run` once both answers are in, a large comparison (a million
elements) in steps that let other tasks run throughout, and the bound of
1,000 copies outstanding, which every copy gives back whatever becomes of it
and of its caller's request."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import trio.testing

from tlvproxy.config.loader import parse_table
from tlvproxy.errors import BadRequest
from tlvproxy.framing import FLAG_RESPONSE, Frame
from tlvproxy.metrics import Metrics
from tlvproxy.mock_upstream import serve_mock_upstream
from tlvproxy.server.mirror import MirroredCall
from tlvproxy.server.traffic import COMPARE_STEP, MAX_OUTSTANDING, Traffic
from tlvproxy.server.view import RequestContext
from tlvproxy.upstream.pool import open_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    from tlvproxy.config.model import CommandSpec
    from tlvproxy.server.traffic import CommandTraffic

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schema"

# `big` is mirrored to `echo` on im_next, which the demo service plays: it
# answers each copy with the copy's own body. Both take and answer
# conv.All, whose `r_uint32` is a packed repeated field (a million elements
# fit in 1 MiB).
TABLE = """
proto: {{paths: [{root}], files: [convert_test.proto]}}
framing: {{max_body: 4 MiB}}
upstreams:
  im: {{nodes: [127.0.0.1:9]}}
  im_next: {{nodes: [{next}]}}
commands:
  - name: big
    command: 0x1003
    upstream: im
    request: conv.All
    response: conv.All
    mirror: {{to: echo, compare: true}}
  - {{name: echo, command: 0x1003, upstream: im_next, request: conv.All, response: conv.All}}
"""
VIEW = RequestContext(remote_addr="10.0.0.1", headers=[], query_string="")


def body(big: CommandTraffic, text: str = "", numbers: Iterable[int] = ()) -> bytes:
    """A conv.All with `f_string` and `r_uint32`, as a frame body."""
    schema = big.table.schema
    assert schema is not None
    message = schema.message_class("conv.All")(f_string=text)
    message.r_uint32.extend(numbers)
    data: bytes = message.SerializeToString()
    return data


def answer(data: bytes) -> Frame:
    return Frame(command=0x1003, seq=1, flags=FLAG_RESPONSE, body=data)


def copy_of(data: bytes) -> Callable[[CommandSpec], bytes]:
    """The `encode` of a copy whose body is `data`."""
    return lambda to: data


def refused(to: CommandSpec) -> bytes:
    raise BadRequest(f"{to.name} cannot take this body")


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
    """The `big` command's rules on a running `Traffic`, its copies sent to
    the demo service."""
    placeholder = parse_table(TABLE.format(root=SCHEMA_DIR, next="127.0.0.1:9"), Path("c.yaml"))
    address = await nursery.start(
        partial(serve_mock_upstream, "127.0.0.1", 0, placeholder, upstream="im_next")
    )
    table = parse_table(TABLE.format(root=SCHEMA_DIR, next=address), Path("commands.yaml"))
    traffic = Traffic(metrics)
    await nursery.start(traffic.run)
    async with open_pool(table.upstreams["im_next"], table.framing, metrics) as pool:
        yield traffic.for_table(table, {"im_next": pool})["big"]


def mirror(
    big: CommandTraffic, caller: MirroredCall, encode: Callable[[CommandSpec], bytes]
) -> None:
    big.mirror_after(caller, big.command, "request-1", encode, 0, VIEW)


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(30):
        while not predicate():  # noqa: ASYNC110 - the answers come over a socket
            await trio.sleep(0.01)


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
        caller = MirroredCall()
        mirror(big, caller, copy_of(body(big, numbers=[*range(size - 1), 0])))
        copy = caller._copy
        assert copy is not None
        await until(lambda: copy.reply is not None)
        # Both answers in: the comparison starts, and the ticker with it.
        caller.settled(answer(body(big, numbers=range(size))))
        nursery.start_soon(ticker)
        await until(lambda: outcome(metrics, "different") == 1)
        # About one pass per step of COMPARE_STEP elements.
        assert ticks >= 10
        nursery.cancel_scope.cancel()


async def test_a_million_elements_leave_room_for_other_tasks_throughout() -> None:
    metrics = Metrics()
    size = 1_000_000
    gaps: list[float] = []

    async def ticker() -> None:
        # Each pass notes how long the comparison kept it waiting.
        last = trio.current_time()
        while outcome(metrics, "different") == 0:
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery, rules(metrics, nursery) as big:
        caller = MirroredCall()
        mirror(big, caller, copy_of(body(big, numbers=[0] * (size - 1) + [1])))
        copy = caller._copy
        assert copy is not None
        await until(lambda: copy.reply is not None)
        # The ticker first, so that it sees the comparison's first step too.
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        caller.settled(answer(body(big, numbers=[0] * size)))
        await until(lambda: outcome(metrics, "different") == 1)
        assert len(gaps) >= size // COMPARE_STEP
        # A step is about COMPARE_STEP elements, a millisecond or two; taking
        # the million elements at once held other tasks for most of a second.
        assert max(gaps) < 0.2, max(gaps)
        nursery.cancel_scope.cancel()


async def test_beyond_max_outstanding_copies_are_dropped_until_some_are_worked_out() -> None:
    metrics = Metrics()
    async with trio.open_nursery() as nursery, rules(metrics, nursery) as big:
        callers = [MirroredCall() for _ in range(MAX_OUTSTANDING + 5)]
        for caller in callers:
            mirror(big, caller, copy_of(body(big, "a")))
        assert big.owner.outstanding == outstanding(metrics) == MAX_OUTSTANDING
        assert outcome(metrics, "dropped") == 5
        # Every copy got its answer; those whose caller has none keep their place.
        await trio.sleep(0.5)
        assert big.owner.outstanding == MAX_OUTSTANDING
        callers[0].settled(answer(body(big, "a")))
        await until(lambda: outcome(metrics, "same") == 1)
        assert big.owner.outstanding == outstanding(metrics) == MAX_OUTSTANDING - 1
        mirror(big, MirroredCall(), copy_of(body(big, "a")))
        assert big.owner.outstanding == MAX_OUTSTANDING
        mirror(big, MirroredCall(), copy_of(body(big, "a")))
        assert outcome(metrics, "dropped") == 6
        # A caller's request that got no answer: its copy is `failed`.
        callers[1].settled(None)
        await until(lambda: outcome(metrics, "failed") == 1)
        assert big.owner.outstanding == outstanding(metrics) == MAX_OUTSTANDING - 1
        nursery.cancel_scope.cancel()


async def test_no_copy_keeps_its_place_whatever_its_callers_outcome() -> None:
    metrics = Metrics()
    async with trio.open_nursery() as nursery, rules(metrics, nursery) as big:
        # A body the mirror's command refuses: failed at once, no place taken.
        mirror(big, MirroredCall(), refused)
        assert outcome(metrics, "failed") == 1
        assert big.owner.outstanding == outstanding(metrics) == 0
        # The caller's outcome came before the copy was made (the pool settles
        # a request with no healthy node before `submit` returns).
        early = MirroredCall()
        early.settled(None)
        mirror(big, early, copy_of(body(big, "a")))
        answered = MirroredCall()
        answered.settled(answer(body(big, "b")))
        mirror(big, answered, copy_of(body(big, "a")))
        # And the usual order.
        late = MirroredCall()
        mirror(big, late, copy_of(body(big, "c")))
        late.settled(answer(body(big, "c")))
        await until(lambda: big.owner.outstanding == 0)
        assert outstanding(metrics) == 0
        assert (outcome(metrics, "failed"), outcome(metrics, "different")) == (2, 1)
        assert outcome(metrics, "same") == 1
        nursery.cancel_scope.cancel()


async def test_a_copy_that_cannot_be_sent_gives_its_place_back() -> None:
    metrics = Metrics()
    table = parse_table(TABLE.format(root=SCHEMA_DIR, next="127.0.0.1:9"), Path("commands.yaml"))
    traffic = Traffic(metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(traffic.run)
        async with open_pool(table.upstreams["im_next"], table.framing, metrics) as closed:
            pass
        # The pool in force is closed (a reload retired it), or there is none
        # (a reload removed the upstream): either way the copy fails, once.
        for pools, failed in (({"im_next": closed}, 1), ({}, 2)):
            big = traffic.for_table(table, pools)["big"]
            caller = MirroredCall()
            mirror(big, caller, copy_of(body(big, "a")))
            assert big.owner.outstanding == 1
            caller.settled(answer(body(big, "a")))
            await until(lambda failed=failed: outcome(metrics, "failed") == failed)
            assert big.owner.outstanding == outstanding(metrics) == 0
        nursery.cancel_scope.cancel()

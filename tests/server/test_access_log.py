"""AccessLog: records reach the logger in batches, in order, with their own time;
the request tally is published after each batch."""

from __future__ import annotations

import logging
import time

import pytest
import trio
import trio.testing

from tlvproxy.metrics import Metrics, RequestTally
from tlvproxy.server import access_log
from tlvproxy.server.access_log import MAX_PENDING, AccessLog


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def sink():
    logger = logging.getLogger("tests.access_log")
    handler = _Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


async def test_one_pass_of_records_is_handed_over_after_the_pass_in_order(sink):
    logger, collected = sink
    access = AccessLog(logger)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        for n in range(3):
            access.add({"request_id": f"r{n}", "status": 200})
        assert collected.records == []  # the requests went on without formatting
        await trio.testing.wait_all_tasks_blocked()
        assert [r.request_id for r in collected.records] == ["r0", "r1", "r2"]
        assert {r.getMessage() for r in collected.records} == {"request"}
        access.add({"request_id": "r3"})
        await trio.testing.wait_all_tasks_blocked()
        assert [r.request_id for r in collected.records][-1] == "r3"
        nursery.cancel_scope.cancel()


async def test_records_pending_when_run_ends_are_handed_over(sink):
    logger, collected = sink
    access = AccessLog(logger)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(access.run)
            access.add({"request_id": "last"})
            scope.cancel()
    assert [r.request_id for r in collected.records] == ["last"]


def test_a_record_keeps_the_time_it_was_added(sink):
    logger, collected = sink
    access = AccessLog(logger)
    before = time.time()
    access.add({"request_id": "timed"})
    after = time.time()
    time.sleep(0.05)  # the batch is written well after the request ended
    access.flush()
    [record] = collected.records
    assert before <= record.created <= after
    assert record.pathname == access_log.__file__  # where the record was made, as before
    assert record.msecs == int((record.created - int(record.created)) * 1000)


def test_pending_records_are_bounded_without_run(sink):
    logger, collected = sink
    access = AccessLog(logger)
    for n in range(MAX_PENDING - 1):
        access.add({"n": n})
    assert collected.records == []
    access.add({"n": MAX_PENDING - 1})
    assert [r.n for r in collected.records] == list(range(MAX_PENDING))


def test_nothing_is_logged_below_the_level_and_nothing_is_kept(sink):
    logger, collected = sink
    logger.setLevel(logging.WARNING)
    access = AccessLog(logger)
    access.add({"request_id": "quiet"})
    access.flush()
    logger.setLevel(logging.INFO)
    access.flush()
    assert collected.records == []


def _requests(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "tlvproxy_http_requests_total", {"route": "echo", "method": "GET", "status": "200"}
    )


async def test_the_tally_is_published_after_each_pass(sink):
    logger, collected = sink
    metrics = Metrics()
    tally = RequestTally(metrics)
    access = AccessLog(logger, tally=tally)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        for n in range(3):
            tally.count("echo", "GET", 200, 0.002)
            access.add({"request_id": f"r{n}"})
        assert _requests(metrics) is None  # counted, not yet published
        await trio.testing.wait_all_tasks_blocked()
        assert len(collected.records) == 3
        assert _requests(metrics) == 3
        assert (
            metrics.registry.get_sample_value(
                "tlvproxy_http_request_duration_seconds_bucket", {"route": "echo", "le": "0.0025"}
            )
            == 3
        )
        tally.count("echo", "GET", 200, 0.002)
        access.add({"request_id": "r3"})
        await trio.testing.wait_all_tasks_blocked()
        assert _requests(metrics) == 4
        nursery.cancel_scope.cancel()


def test_the_tally_is_published_below_the_log_level_too(sink):
    logger, collected = sink
    logger.setLevel(logging.WARNING)
    metrics = Metrics()
    tally = RequestTally(metrics)
    access = AccessLog(logger, tally=tally)
    tally.count("echo", "GET", 200, 0.002)
    access.add({"request_id": "quiet"})
    access.flush()
    assert collected.records == []
    assert _requests(metrics) == 1


async def test_records_added_after_run_ends_are_written_at_once(sink):
    # At shutdown another task (the REST task's last pass) may answer after
    # this one has ended: its records are written as they come, not lost.
    logger, collected = sink
    access = AccessLog(logger)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        nursery.cancel_scope.cancel()
    access.add({"request_id": "late"})
    assert [r.request_id for r in collected.records] == ["late"]

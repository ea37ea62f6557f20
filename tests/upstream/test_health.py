"""Health counting and reconnect backoff, pure (SPEC 4.5)."""

from __future__ import annotations

import pytest

from tlvproxy.upstream.health import Backoff, NodeHealth


def test_consecutive_failures_make_a_node_unhealthy() -> None:
    health = NodeHealth(unhealthy_after=3, healthy_after=2)
    assert [health.record_failure(), health.record_failure()] == [False, False]
    health.record_answer()  # an answer ends the streak
    assert [health.record_failure() for _ in range(3)] == [False, False, True]
    assert not health.healthy
    assert health.record_failure() is False  # already unhealthy: no second transition


def test_only_probe_successes_in_a_row_revive_a_node() -> None:
    health = NodeHealth(unhealthy_after=1, healthy_after=2)
    health.record_failure()
    health.record_answer()
    assert not health.healthy  # ordinary answers never revive a node
    assert health.record_probe_success() is False
    health.record_failure()  # a failed probe restarts the count
    assert health.record_probe_success() is False
    assert health.record_probe_success() is True
    assert health.healthy
    assert health.record_probe_success() is False


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        NodeHealth(unhealthy_after=0, healthy_after=1)


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(base=0.5, cap=3.0)
    assert backoff.ready(0.0)
    assert [backoff.failed(10.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.not_before == 13.0
    assert not backoff.ready(12.9)
    assert backoff.ready(13.0)
    backoff.succeeded()
    assert backoff.ready(10.0)
    assert backoff.failed(20.0) == 0.5


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(base=2.0, cap=1.0)

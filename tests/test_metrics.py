"""RequestTally: counted in plain numbers, published as the very values
`inc()` and `observe()` per request leave, in one process or several."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from math import inf, nan
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import multiprocess
from prometheus_client.metrics import Histogram

from tlvproxy.metrics import _LATENCY_BUCKETS, Metrics, RequestTally

REPO = Path(__file__).resolve().parents[1]


def _samples(families) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """Every sample but `_created` (a clock reading) and those of one process
    (a `pid` label, tlvproxy_config_revision's), the value as its repr so
    that NaN equals NaN."""
    return sorted(
        (sample.name, tuple(sorted(sample.labels.items())), repr(sample.value))
        for family in families
        for sample in family.samples
        if not sample.name.endswith("_created") and "pid" not in sample.labels
    )


def _per_request(metrics: Metrics, route: str, method: str, status: int, duration: float) -> None:
    """What the REST handler did for each request before the tally."""
    metrics.http_requests.labels(route, method, str(status)).inc()
    metrics.http_request_duration.labels(route).observe(duration)


_DURATIONS = st.one_of(
    st.floats(min_value=0, max_value=20),  # past the last bound (10 s) too
    st.sampled_from(_LATENCY_BUCKETS),  # exactly on a bound: that bucket, as `le` says
    st.floats(),  # negative, inf, NaN: whatever observe makes of them
)
_REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["echo", "users", "404"]),
        st.sampled_from(["GET", "POST"]),
        st.sampled_from([200, 404, 504]),
        _DURATIONS,
    ),
    max_size=60,
)


@given(earlier=_REQUESTS, passes=st.lists(_REQUESTS, max_size=4))
def test_published_values_are_those_of_inc_and_observe_per_request(earlier, passes):
    reference, tallied = Metrics(), Metrics()
    tally = RequestTally(tallied)
    for request in earlier:  # the sums start from something
        _per_request(reference, *request)
        _per_request(tallied, *request)
    for requests in passes:
        for request in requests:
            _per_request(reference, *request)
            tally.count(*request)
        tally.publish()
        assert _samples(tallied.registry.collect()) == _samples(reference.registry.collect())


def test_random_durations_on_and_past_the_bounds_give_the_same_samples():
    rng = random.Random(20240501)
    reference, tallied = Metrics(), Metrics()
    tally = RequestTally(tallied)
    for n in range(5000):
        duration = rng.choice(
            [rng.uniform(0, 0.05), rng.uniform(0, 12), rng.choice(_LATENCY_BUCKETS), 10.5, 1e3]
        )
        request = (rng.choice(["a", "b"]), "GET", rng.choice([200, 502]), duration)
        _per_request(reference, *request)
        tally.count(*request)
        if n % 97 == 0:
            tally.publish()
    tally.publish()
    registry = tallied.registry
    for route in ("a", "b"):
        for le in (*map(str, map(float, _LATENCY_BUCKETS)), "+Inf"):
            labels = {"route": route, "le": le}
            name = "tlvproxy_http_request_duration_seconds_bucket"
            value = registry.get_sample_value(name, labels)
            assert value == reference.registry.get_sample_value(name, labels)
        for suffix in ("_count", "_sum"):
            name = "tlvproxy_http_request_duration_seconds" + suffix
            value = registry.get_sample_value(name, {"route": route})
            assert value == reference.registry.get_sample_value(name, {"route": route})
    assert registry.get_sample_value(
        "tlvproxy_http_request_duration_seconds_bucket", {"route": "a", "le": "10.0"}
    ) < registry.get_sample_value(
        "tlvproxy_http_request_duration_seconds_bucket", {"route": "a", "le": "+Inf"}
    )
    assert _samples(registry.collect()) == _samples(reference.registry.collect())


def test_nan_and_infinite_durations_are_counted_as_observe_counts_them():
    reference, tallied = Metrics(), Metrics()
    tally = RequestTally(tallied)
    for duration in (nan, inf, -inf, -1.0, 0.0):
        _per_request(reference, "echo", "GET", 200, duration)
        tally.count("echo", "GET", 200, duration)
    tally.publish()
    assert _samples(tallied.registry.collect()) == _samples(reference.registry.collect())


def test_publishing_nothing_changes_nothing():
    metrics = Metrics()
    tally = RequestTally(metrics)
    tally.publish()
    assert _samples(metrics.registry.collect()) == _samples(Metrics().registry.collect())
    tally.count("echo", "GET", 200, 0.003)
    tally.publish()
    published = _samples(metrics.registry.collect())
    tally.publish()
    tally.publish()
    assert _samples(metrics.registry.collect()) == published


def test_the_bounds_are_the_histograms():
    child = Metrics().http_request_duration.labels("echo")
    assert isinstance(child, Histogram)
    assert tuple(child._upper_bounds) == (*_LATENCY_BUCKETS, inf)
    assert len(child._buckets) == len(_LATENCY_BUCKETS) + 1


# One process's requests in multiprocess mode, counted per request or tallied.
# The value class is chosen when prometheus_client is imported, from the
# environment: hence a process of its own.
_MULTIPROCESS_SCRIPT = """
import random, sys
from prometheus_client import values
from tlvproxy.metrics import _LATENCY_BUCKETS, Metrics, RequestTally

assert values.ValueClass._multiprocess
metrics = Metrics()
tally = RequestTally(metrics)
rng = random.Random(7)
for n in range(2000):
    route = rng.choice(["a", "b"])
    duration = rng.choice([rng.uniform(0, 12), rng.choice(_LATENCY_BUCKETS)])
    if sys.argv[1] == "observe":
        metrics.http_requests.labels(route, "GET", "200").inc()
        metrics.http_request_duration.labels(route).observe(duration)
    else:
        tally.count(route, "GET", 200, duration)
        if n % 37 == 0:
            tally.publish()
tally.publish()
"""


@pytest.mark.slow
def test_in_multiprocess_mode_the_files_hold_the_same_values(tmp_path):
    collected = {}
    for mode in ("observe", "tally"):
        directory = tmp_path / mode
        directory.mkdir()
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
        subprocess.run(
            [sys.executable, "-c", _MULTIPROCESS_SCRIPT, mode],
            cwd=REPO,
            env=env,
            check=True,
            timeout=60,
        )
        assert any(directory.glob("histogram_*.db"))
        collector = multiprocess.MultiProcessCollector(None, path=str(directory))
        collected[mode] = _samples(collector.collect())
    assert collected["tally"] == collected["observe"]
    count = [s for s in collected["tally"] if s[0] == "tlvproxy_http_requests_total"]
    assert sum(float(value) for *_, value in count) == 2000

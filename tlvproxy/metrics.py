"""Every Prometheus metric of docs/operations.md "Metrics", on one object per process.

Owns: the metric objects, their names, labels and buckets.
Must not: keep module-level metric objects (tests run many gateways in one
process), or decide what is counted; callers do that.

With several workers, prometheus-client's multiprocess mode sums the workers'
values (see `supervisor.py`, which sets PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

from bisect import bisect_left
from math import inf

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Upstream request outcomes, the `outcome` label of tlvproxy_upstream_requests_total.
OUTCOMES = ("ok", "status", "timeout", "unavailable", "protocol_error")
# Mirrored copies' outcomes, the `outcome` label of tlvproxy_mirror_total
# (docs/configuration.md "mirror").
MIRROR_OUTCOMES = ("same", "different", "answered", "failed", "dropped")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The histogram's bucket upper bounds as prometheus-client keeps them: floats,
# then +Inf (`Histogram._prepare_buckets`).
_LATENCY_BOUNDS = (*map(float, _LATENCY_BUCKETS), inf)


class Metrics:
    """The gateway's metrics, registered on `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "tlvproxy_http_requests",
            "REST requests answered",
            ("route", "method", "status"),
            registry=r,
        )
        self.http_request_duration = Histogram(
            "tlvproxy_http_request_duration_seconds",
            "REST request duration, from the request head to the answer",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "tlvproxy_upstream_requests",
            "Requests sent to upstream nodes, by outcome",
            ("upstream", "node", "outcome"),
            registry=r,
        )
        self.upstream_node_healthy = Gauge(
            "tlvproxy_upstream_node_healthy",
            "1 when the node is healthy, 0 when not",
            ("upstream", "node"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.websocket_sessions = Gauge(
            "tlvproxy_websocket_sessions",
            "WebSocket sessions open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.websocket_messages = Counter(
            "tlvproxy_websocket_messages",
            "WebSocket messages, by direction (in: from clients, out: to clients)",
            ("direction",),
            registry=r,
        )
        self.push_sessions = Gauge(
            "tlvproxy_push_sessions",
            "Push sessions (server-sent events and long polling) open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.push_messages = Counter(
            "tlvproxy_push_messages",
            "Push session messages, by direction (in: from clients, out: to clients) "
            "and transport (http: messages and their answers, sse: pushes on event "
            "streams, poll: pushes in poll answers)",
            ("direction", "transport"),
            registry=r,
        )
        self.frames_rejected = Counter(
            "tlvproxy_frames_rejected",
            "Malformed frames and undecodable bodies received from upstreams",
            ("reason",),
            registry=r,
        )
        self.rate_limited = Counter(
            "tlvproxy_rate_limited",
            "Requests and messages refused by a rate limit",
            ("rule",),
            registry=r,
        )
        self.rate_limit_store_errors = Counter(
            "tlvproxy_rate_limit_store_errors",
            "Rate-limit checks whose store could not answer in time (on_store_error decided)",
            ("rule",),
            registry=r,
        )
        self.waf_blocked = Counter(
            "tlvproxy_waf_blocked",
            "Requests and messages a WAF rule matched (deny and log)",
            ("rule",),
            registry=r,
        )
        self.auth_failures = Counter(
            "tlvproxy_auth_failures",
            "Requests and handshakes refused for their credentials (docs/security.md)",
            ("authenticator", "reason"),
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "tlvproxy_tls_certificate_expiry_seconds",
            "Seconds until each certificate of `tls` expires (negative once it has), "
            "by its cert path",
            ("name",),
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tls_handshake_failures = Counter(
            "tlvproxy_tls_handshake_failures",
            "TLS handshakes on the https listener that failed or timed out, by reason",
            ("reason",),
            registry=r,
        )
        self.config_revision = Gauge(
            "tlvproxy_config_revision",
            "The etcd revision of the running table (0 for a table file); with "
            "workers, one sample per worker",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.config_reloads = Counter(
            "tlvproxy_config_reloads",
            "Table reloads, by result (ok, error)",
            ("result",),
            registry=r,
        )
        self.split = Counter(
            "tlvproxy_split",
            "Requests a split rule sent as another command, by command and `to` command",
            ("command", "to"),
            registry=r,
        )
        self.mirror = Counter(
            "tlvproxy_mirror",
            "Mirrored copies of requests, by command and outcome (same, different, "
            "answered, failed, dropped)",
            ("command", "outcome"),
            registry=r,
        )
        self.mirror_outstanding = Gauge(
            "tlvproxy_mirror_outstanding",
            "Mirrored copies sent and not yet worked out (at most 1,000 per worker)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.fallbacks = Counter(
            "tlvproxy_fallbacks",
            "Answers a fallback gave in the upstream's place, by command and kind "
            "(static, last_good)",
            ("command", "kind"),
            registry=r,
        )


class RequestTally:
    """The REST requests of one process counted in plain ints and floats until
    `publish()` adds them to `tlvproxy_http_requests_total` and
    `tlvproxy_http_request_duration_seconds` of `metrics`.

    Why: a `Counter.inc` and a `Histogram.observe` per request cost a lock and
    a float addition per value, and with several workers a write to the
    multiprocess file each (bucket, sum, counter). Counted here, a request
    costs two dict look-ups and an append; the owner publishes once per
    scheduler pass (`AccessLog.flush`), so the metrics lag by at most a pass.
    The published values are exactly those `inc()` and `observe()` per request
    would have left, to the last bit of the sum.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counts: dict[tuple[str, str, int], int] = {}
        # Each duration, not their sum: `observe` adds them to the histogram's
        # sum one by one, and float addition is not associative, so `publish`
        # adds them in the same order to get the same sum.
        self._durations: dict[str, list[float]] = {}
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[str, Histogram] = {}

    def count(self, route: str, method: str, status: int, duration: float) -> None:
        """Count one answered request: its route label, method, status and
        duration in seconds (from the request head to the answer)."""
        key = (route, method, status)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        durations = self._durations.get(route)
        if durations is None:
            self._durations[route] = [duration]
        else:
            durations.append(duration)

    def publish(self) -> None:
        """Add what was counted since the last call to the metrics, and forget it."""
        counts = self._counts
        if counts:
            self._counts = {}
            for key, n in counts.items():
                self._counter(key).inc(n)
        durations = self._durations
        if durations:
            self._durations = {}
            for route, values in durations.items():
                self._observe(self._histogram(route), values)

    def _counter(self, key: tuple[str, str, int]) -> Counter:
        child = self._counters.get(key)
        if child is None:
            route, method, status = key
            child = self._metrics.http_requests.labels(route, method, str(status))
            self._counters[key] = child
        return child

    def _histogram(self, route: str) -> Histogram:
        child = self._histograms.get(route)
        if child is None:
            child = self._histograms[route] = self._metrics.http_request_duration.labels(route)
        return child

    @staticmethod
    def _observe(child: Histogram, durations: list[float]) -> None:
        """`child.observe(d)` for each of `durations`, one write per value touched.

        prometheus-client has no bulk observe, so this writes the child's own
        values: `_buckets[i]`, the count of observations in bucket i alone (not
        cumulative, see `Histogram.observe` and `_child_samples`), and `_sum`.
        They are the value objects every write goes through: with several
        workers (PROMETHEUS_MULTIPROC_DIR) they write this process's
        multiprocess file, which the scrape sums over the workers. A collector
        of our own would report this process's numbers alone, never summed.
        """
        bounds = _LATENCY_BOUNDS
        in_bucket = [0] * len(bounds)
        total = child._sum.get()
        for duration in durations:
            total += duration
            # observe's bucket: the first bound >= duration. No bound is for
            # NaN (bisect would say the first): observe counts it in none.
            index = bisect_left(bounds, duration)
            if duration <= bounds[index]:
                in_bucket[index] += 1
        for value, n in zip(child._buckets, in_bucket, strict=True):
            if n:
                value.inc(n)
        child._sum.set(total)

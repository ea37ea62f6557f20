"""Every Prometheus metric of SPEC 6, on one object per process.

Owns: the metric objects, their names, labels and buckets.
Must not: keep module-level metric objects (tests run many gateways in one
process), or decide what is counted; callers do that.

With several workers, prometheus-client's multiprocess mode sums the workers'
values (see `supervisor.py`, which sets PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Upstream request outcomes, the `outcome` label of tlvproxy_upstream_requests_total.
OUTCOMES = ("ok", "status", "timeout", "unavailable", "protocol_error")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.waf_blocked = Counter(
            "tlvproxy_waf_blocked",
            "Requests and messages a WAF rule matched (deny and log)",
            ("rule",),
            registry=r,
        )
        self.config_reloads = Counter(
            "tlvproxy_config_reloads",
            "Table reloads, by result (ok, error)",
            ("result",),
            registry=r,
        )

"""The bookkeeping of connection limits (tlvproxy/server/admission.py)."""

from __future__ import annotations

import ipaddress

from tlvproxy.config.model import Address, Limits, NodeSpec, UpstreamSpec
from tlvproxy.server.admission import (
    Admission,
    counted_address,
    descriptor_budget,
    upstream_reserve,
)

LIMITS = Limits(max_connections=4, max_connections_per_ip=2)


def test_per_address_counts_are_dropped_at_zero() -> None:
    admission = Admission(budget=100)
    for round_ in range(3):
        assert admission.admit("192.0.2.1", LIMITS) is None
        assert admission.admit("192.0.2.1", LIMITS) is None
        refusal = admission.admit("192.0.2.1", LIMITS)
        assert refusal is not None
        assert refusal.kind == "max_connections_per_ip", round_
        admission.release("192.0.2.1")
        admission.release("192.0.2.1")
        # Nothing is left behind by an address whose connections are gone.
        assert admission.per_address == {}
        assert admission.clients == 0


def test_max_connections_counts_every_address() -> None:
    admission = Admission(budget=100)
    for n in range(4):
        assert admission.admit(f"192.0.2.{n}", LIMITS) is None
    refusal = admission.admit("192.0.2.9", LIMITS)
    assert refusal is not None
    assert refusal.kind == "max_connections"
    assert "max_connections (4)" in refusal.message
    assert "192.0.2.9" not in admission.per_address  # a refusal counts nothing


def test_a_session_takes_a_second_descriptor() -> None:
    admission = Admission(budget=3)
    assert admission.admit(None, LIMITS) is None
    assert admission.admit_session(None, LIMITS) is None
    assert admission.admit(None, LIMITS) is None  # 3 descriptors: 2 clients, 1 session
    refusal = admission.admit_session(None, LIMITS)
    assert refusal is not None
    assert refusal.kind == "descriptors"
    refusal = admission.admit(None, LIMITS)
    assert refusal is not None
    assert refusal.kind == "descriptors"
    admission.release_session(None)
    assert admission.admit_session(None, LIMITS) is None


def test_a_session_through_a_trusted_proxy_counts_the_forwarded_client() -> None:
    admission = Admission(budget=100)
    for _ in range(3):
        assert admission.admit(None, LIMITS) is None  # the proxy's connections
    assert admission.admit_session("198.51.100.7", LIMITS) is None
    assert admission.admit_session("198.51.100.7", LIMITS) is None
    refusal = admission.admit_session("198.51.100.7", LIMITS)
    assert refusal is not None
    assert refusal.kind == "max_connections_per_ip"
    admission.release_session("198.51.100.7")
    admission.release_session("198.51.100.7")
    assert admission.per_address == {}
    assert admission.sessions == 0


def test_counted_address() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert counted_address("10.1.2.3", ()) == "10.1.2.3"
    assert counted_address("10.1.2.3", trusted) is None
    assert counted_address("192.0.2.1", trusted) == "192.0.2.1"


def test_the_reserve_and_the_budget() -> None:
    nodes = tuple(NodeSpec(address=Address("127.0.0.1", 7000 + n)) for n in range(3))
    spec = UpstreamSpec(name="im", nodes=nodes, connections=4)
    assert upstream_reserve([spec, spec]) == 2 * 3 * (4 + 1)
    assert descriptor_budget(1024, 20, 200) == 804
    assert descriptor_budget(100, 20, 200) == 0

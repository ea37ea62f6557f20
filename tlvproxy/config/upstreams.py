"""Reading the `upstreams` and `etcd` sections (docs/configuration.md
"upstreams", "discovery", "etcd"), and the node values etcd holds.

Owns: what each key of those sections accepts (nodes, balance, health,
heartbeat, discovery, the etcd endpoints and prefix) and the model values
they become.
Must not: look across sections (the loader does), or stop at the first
problem: every reader records problems on the `NodeReader`.

Decisions made here:
- `heartbeat.command` is a bare number; it need not be a command of the table.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Literal

import yaml

from tlvproxy.config import nodes
from tlvproxy.config.model import (
    Address,
    EtcdSpec,
    HealthSpec,
    HeartbeatSpec,
    NodeSpec,
    UpstreamSpec,
)
from tlvproxy.config.nodes import Invalid, Node, NodeReader, join
from tlvproxy.config.sections import host_port, key_expr, positive_duration

if TYPE_CHECKING:
    from tlvproxy.framing import HeaderLayout

_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_PREFIX_NAME = re.compile(r"[A-Za-z0-9_.:@\-]+")
_MAX_PREFIX = 256


def read_upstreams(
    r: NodeReader, node: Node | None, framing: HeaderLayout
) -> dict[str, UpstreamSpec]:
    result: dict[str, UpstreamSpec] = {}
    if node is None:
        return result
    found = r.mapping(node, "upstreams")
    for name, spec_node in (found or {}).items():
        path = join("upstreams", name)
        if not _UPSTREAM_NAME.fullmatch(name):
            r.error(spec_node, path, "an upstream name uses letters, digits, _ . -")
        spec = _upstream(r, name, spec_node, path, framing)
        if spec is not None:
            result[name] = spec
    return result


def _upstream(
    r: NodeReader, name: str, node: Node, path: str, framing: HeaderLayout
) -> UpstreamSpec | None:
    keys = (
        "nodes",
        "balance",
        "hash_on",
        "connections",
        "connect_timeout",
        "timeout",
        "retries",
        "heartbeat",
        "health",
        "max_in_flight",
    )
    found = r.mapping(node, path, (*keys, "discovery"))
    if found is None:
        return None
    discovery = None
    if "discovery" in found:
        dpath = join(path, "discovery")
        dfound = r.mapping(found["discovery"], dpath, ("etcd",), ("etcd",))
        discovery = r.get(dfound, "etcd", dpath, etcd_prefix, None)
        if "nodes" in found:
            r.error(found["nodes"], join(path, "nodes"), "give nodes or discovery, not both")
    elif "nodes" not in found:
        r.error(node, join(path, "nodes"), "required key is missing (or give discovery)")
    balance: Literal["round_robin", "consistent_hash"] = r.get(
        found, "balance", path, nodes.choice("round_robin", "consistent_hash"), "round_robin"
    )
    hash_on = r.get(found, "hash_on", path, key_expr, None)
    if balance == "consistent_hash" and "hash_on" not in found:
        r.error(node, join(path, "hash_on"), "required when balance is consistent_hash")
    default = UpstreamSpec(name=name, nodes=())
    heartbeat = None
    if "heartbeat" in found:
        heartbeat = _heartbeat(r, found["heartbeat"], join(path, "heartbeat"), framing)
    health = default.health
    if "health" in found:
        hpath = join(path, "health")
        hfound = r.mapping(found["health"], hpath, ("unhealthy_after", "healthy_after"))
        health = HealthSpec(
            unhealthy_after=r.get(
                hfound, "unhealthy_after", hpath, nodes.integer(1), health.unhealthy_after
            ),
            healthy_after=r.get(
                hfound, "healthy_after", hpath, nodes.integer(1), health.healthy_after
            ),
        )
    return UpstreamSpec(
        name=name,
        nodes=_nodes(r, found.get("nodes"), join(path, "nodes")),
        discovery=discovery,
        balance=balance,
        hash_on=hash_on,
        connections=r.get(found, "connections", path, nodes.integer(1), default.connections),
        connect_timeout=r.get(
            found, "connect_timeout", path, positive_duration, default.connect_timeout
        ),
        timeout=r.get(found, "timeout", path, positive_duration, default.timeout),
        retries=r.get(found, "retries", path, nodes.integer(0), default.retries),
        heartbeat=heartbeat,
        health=health,
        max_in_flight=r.get(found, "max_in_flight", path, nodes.integer(1), default.max_in_flight),
    )


def etcd_prefix(value: Any) -> str:
    """A key prefix of etcd: `/` and then names separated by single `/`
    (printable ASCII, no `.` or `..` name); a trailing `/` is dropped."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise Invalid(f"expected a key prefix like /tlvproxy, got {value!r}")
    prefix = value.rstrip("/")
    names = prefix.split("/")[1:]
    if (
        not names
        or len(prefix) > _MAX_PREFIX
        or not all(_PREFIX_NAME.fullmatch(name) and name not in (".", "..") for name in names)
    ):
        raise Invalid(
            f"expected a key prefix like /tlvproxy (names of letters, digits and "
            f"._-:@ separated by single /), got {value!r}"
        )
    return prefix


def etcd_endpoint(value: Any) -> str:
    """An etcd endpoint: http(s)://HOST:PORT, nothing more; without a trailing `/`."""
    if not isinstance(value, str):
        raise Invalid(f"expected an etcd endpoint like http://127.0.0.1:2379, got {value!r}")
    parsed = urllib.parse.urlsplit(value)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or port is None
        or parsed.path not in ("", "/")
        or parsed.query
        or parsed.fragment
        or parsed.username is not None
    ):
        raise Invalid(f"expected an etcd endpoint like http://127.0.0.1:2379, got {value!r}")
    return value.rstrip("/")


def node_value(value: Any) -> NodeSpec:
    """A node registered in etcd (docs/configuration.md "discovery"): the text
    `HOST:PORT` or the JSON `{"address": "HOST:PORT", "weight": N}`.

    Raises Invalid saying what is wrong."""
    if not isinstance(value, str):
        raise Invalid("expected HOST:PORT or a JSON object")
    text = value.strip()
    if not text.startswith("{"):
        return NodeSpec(address=host_port(1)(text))
    try:
        found = json.loads(text)
    except ValueError as exc:
        raise Invalid(f"not JSON: {exc}") from None
    if not isinstance(found, dict) or "address" not in found:
        raise Invalid('expected {"address": "HOST:PORT", "weight": N}')
    unknown = sorted(set(found) - {"address", "weight"})
    if unknown:
        raise Invalid(f"unknown key {unknown[0]!r} (expected address, weight)")
    weight = nodes.integer(1, 1000)(found.get("weight", 1))
    return NodeSpec(address=host_port(1)(found["address"]), weight=weight)


def read_etcd(r: NodeReader, node: Node | None) -> EtcdSpec | None:
    if node is None:
        return None
    found = r.mapping(node, "etcd", ("endpoints",), ("endpoints",))
    if found is None or "endpoints" not in found:
        return None
    items = r.sequence(found["endpoints"], "etcd.endpoints")
    if items == []:
        r.error(found["endpoints"], "etcd.endpoints", "give at least one endpoint")
    endpoints = [
        r.value(item, join("etcd.endpoints", i), etcd_endpoint, "")
        for i, item in enumerate(items or [])
    ]
    return EtcdSpec(endpoints=tuple(e for e in endpoints if e)) if all(endpoints) else None


def _nodes(r: NodeReader, node: Node | None, path: str) -> tuple[NodeSpec, ...]:
    if node is None:
        return ()
    items = r.sequence(node, path)
    if items is None:
        return ()
    if not items:
        r.error(node, path, "an upstream needs at least one node")
    result: list[NodeSpec] = []
    seen: set[Address] = set()
    for i, item in enumerate(items):
        ipath = join(path, i)
        if isinstance(item, yaml.MappingNode):
            found = r.mapping(item, ipath, ("address", "weight"), ("address",))
            address = r.get(found, "address", ipath, host_port(1), None)
            weight = r.get(found, "weight", ipath, nodes.integer(1, 1000), 1)
        else:
            address = r.value(item, ipath, host_port(1), None)
            weight = 1
        if address is None:
            continue
        if address in seen:
            r.error(item, ipath, f"node {address} is listed twice")
        seen.add(address)
        result.append(NodeSpec(address=address, weight=weight))
    return tuple(result)


def _heartbeat(r: NodeReader, node: Node, path: str, framing: HeaderLayout) -> HeartbeatSpec | None:
    found = r.mapping(node, path, ("command", "interval"), ("command", "interval"))
    if found is None or "command" not in found or "interval" not in found:
        return None
    command = r.get(found, "command", path, nodes.integer(0, framing.field_max("command")), None)
    interval = r.get(found, "interval", path, positive_duration, None)
    if command is None or interval is None:
        return None
    return HeartbeatSpec(command=command, interval=interval)

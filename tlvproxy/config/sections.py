"""Reading the table's self-contained sections (docs/configuration.md): listen,
trusted_proxies, framing, json, status_map, limits and waf, and the value
converters the loader shares (upstreams and etcd are upstreams.py's).

Owns: what each key of those sections accepts and the model values they become.
Must not: look across sections (undefined upstreams, messages, commands and
routes are `loader.py`'s cross-references), or stop at the first problem: every
reader records problems on the `NodeReader` and returns a usable default.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from tlvproxy.config import nodes
from tlvproxy.config.keys import KeyExpr, parse_key
from tlvproxy.config.model import (
    Address,
    JsonOptions,
    Limits,
    ListenSpec,
    WafRule,
)
from tlvproxy.config.nodes import Invalid, Node, NodeReader, join
from tlvproxy.framing import HeaderField, HeaderLayout, LayoutError, default_layout
from tlvproxy.policy.waf import catastrophic_reason
from tlvproxy.units import parse_duration, parse_size

if TYPE_CHECKING:
    from tlvproxy.config.model import Network
    from tlvproxy.framing import FieldType

_WAF_LOCATIONS: Final = ("path", "query", "body", "headers")


# ---------------------------------------------------------------- value converters


def host_port(low_port: int) -> Any:
    """A HOST:PORT (or [IPV6]:PORT) converter whose port is at least `low_port`."""

    def convert(value: Any) -> Address:
        if not isinstance(value, str):
            raise Invalid(f"expected HOST:PORT, got {value!r}")
        if value.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)", value)
            if match is None:
                raise Invalid(f"expected [IPV6]:PORT, got {value!r}")
            host, port = match.groups()
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise Invalid(f"{host!r} is not an IPv6 address") from None
        else:
            host, colon, port = value.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise Invalid(f"expected HOST:PORT, got {value!r}")
            if ":" in host:
                raise Invalid(f"write an IPv6 address as [HOST]:PORT, got {value!r}")
        number = int(port)
        if not low_port <= number <= 65535:
            raise Invalid(f"port {number} is not between {low_port} and 65535")
        return Address(host, number)

    return convert


def key_expr(value: Any) -> KeyExpr:
    """A key expression (docs/configuration.md "Key expressions").

    Raises ValueError naming the accepted forms."""
    return parse_key(value)


def _network(value: Any) -> Network:
    if not isinstance(value, str):
        raise Invalid(f"expected a CIDR like 10.0.0.0/8, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"expected a CIDR like 10.0.0.0/8, got {value!r}") from None


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise Invalid(f"expected a duration above zero, got {value!r}")
    return seconds


def positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise Invalid(f"expected a size above zero, got {value!r}")
    return size


def _status_key(top: int) -> Any:
    convert = nodes.integer(1, top)

    def check(value: Any) -> int:
        if value == 0 and not isinstance(value, bool):
            raise Invalid("status 0 means success; it cannot be mapped")
        return convert(value)

    return check


# ---------------------------------------------------------------- sections


def read_listen(r: NodeReader, node: Node | None) -> ListenSpec:
    if node is None:
        return ListenSpec()
    found = r.mapping(node, "listen", ("http", "https", "admin"))
    default = ListenSpec()
    if found is None:
        return default
    optional_address = lambda v: None if v is None else host_port(0)(v)  # noqa: E731
    http = r.get(found, "http", "listen", optional_address, default.http)
    https = r.get(found, "https", "listen", optional_address, default.https)
    admin = r.get(found, "admin", "listen", optional_address, default.admin)
    if http is None and https is None:
        r.error(node, "listen", "http and https are both null: nothing would serve requests")
    return ListenSpec(http=http, https=https, admin=admin)


def read_networks(r: NodeReader, node: Node | None) -> tuple[Network, ...]:
    items = [] if node is None else r.sequence(node, "trusted_proxies") or []
    result = []
    for i, item in enumerate(items):
        network = r.value(item, join("trusted_proxies", i), _network, None)
        if network is not None:
            result.append(network)
    return tuple(result)


def read_framing(r: NodeReader, node: Node | None) -> HeaderLayout:
    if node is None:
        return default_layout()
    found = r.mapping(node, "framing", ("header", "byte_order", "length_counts", "max_body"))
    default = default_layout()
    byte_order: Literal["big", "little"] = r.get(
        found, "byte_order", "framing", nodes.choice("big", "little"), "big"
    )
    counts: Literal["body", "frame"] = r.get(
        found, "length_counts", "framing", nodes.choice("body", "frame"), "body"
    )
    max_body = r.get(found, "max_body", "framing", parse_size, default.max_body)
    fields = default.fields
    if found is not None and "header" in found:
        fields = _header_fields(r, found["header"]) or default.fields
    try:
        return HeaderLayout(
            fields=fields,
            byte_order=byte_order,
            length_counts=counts,
            max_body=max_body,
        )
    except LayoutError as exc:
        r.error(found.get("header", node) if found else node, "framing.header", str(exc))
        return default


def _header_fields(r: NodeReader, node: Node) -> tuple[HeaderField, ...] | None:
    items = r.sequence(node, "framing.header")
    if items is None:
        return None
    fields = []
    ok = True
    types = nodes.choice("u8", "u16", "u32", "u64")
    for i, item in enumerate(items):
        path = join("framing.header", i)
        found = r.mapping(item, path, ("name", "type", "value"), ("name", "type"))
        if found is None or "name" not in found or "type" not in found:
            ok = False
            continue
        before = len(r.problems)
        name = r.get(found, "name", path, nodes.text, "")
        kind = r.get(found, "type", path, types, "u8")
        value = r.get(found, "value", path, nodes.integer(0), None)
        if len(r.problems) > before:
            ok = False
            continue
        field_type = cast("FieldType", kind)  # checked by choice()
        fields.append(HeaderField(name=name, type=field_type, value=value))
    return tuple(fields) if ok else None


def read_json(r: NodeReader, node: Node | None, path: str, base: JsonOptions) -> JsonOptions:
    if node is None:
        return base
    keys = ("field_names", "enums", "emit_defaults", "ignore_unknown_fields")
    found = r.mapping(node, path, keys)
    if found is None:
        return base
    return JsonOptions(
        field_names=r.get(
            found, "field_names", path, nodes.choice("proto", "camel"), base.field_names
        ),
        enums=r.get(found, "enums", path, nodes.choice("name", "number"), base.enums),
        emit_defaults=r.get(found, "emit_defaults", path, nodes.boolean, base.emit_defaults),
        ignore_unknown_fields=r.get(
            found, "ignore_unknown_fields", path, nodes.boolean, base.ignore_unknown_fields
        ),
    )


def read_status_map(r: NodeReader, node: Node | None, framing: HeaderLayout) -> dict[int, int]:
    result: dict[int, int] = {}
    if node is None:
        return result
    top = framing.field_max("status") if framing.has("status") else 65535
    for key_node, value_node in r.pairs(node, "status_map") or []:
        key = r.value(key_node, "status_map", _status_key(top), None)
        path = join("status_map", key if key is not None else "?")
        value = r.value(value_node, path, nodes.integer(100, 599), None)
        if key is None or value is None:
            continue
        if key in result:
            r.error(key_node, path, "duplicate key")
        result[key] = value
    return result


def read_limits(r: NodeReader, node: Node | None) -> Limits:
    default = Limits()
    if node is None:
        return default
    keys = (
        "max_header_bytes",
        "max_request_body",
        "header_timeout",
        "keepalive_timeout",
        "max_connections",
        "max_connections_per_ip",
    )
    found = r.mapping(node, "limits", keys)
    return Limits(
        max_header_bytes=r.get(
            found, "max_header_bytes", "limits", positive_size, default.max_header_bytes
        ),
        max_request_body=r.get(
            found, "max_request_body", "limits", positive_size, default.max_request_body
        ),
        header_timeout=r.get(
            found, "header_timeout", "limits", positive_duration, default.header_timeout
        ),
        keepalive_timeout=r.get(
            found, "keepalive_timeout", "limits", parse_duration, default.keepalive_timeout
        ),
        max_connections=r.get(
            found, "max_connections", "limits", nodes.integer(1), default.max_connections
        ),
        max_connections_per_ip=r.get(
            found,
            "max_connections_per_ip",
            "limits",
            nodes.integer(1),
            default.max_connections_per_ip,
        ),
    )


def read_waf(r: NodeReader, node: Node | None) -> tuple[WafRule, ...]:
    if node is None:
        return ()
    names: set[str] = set()
    result: list[WafRule] = []
    for i, item in enumerate(r.sequence(node, "waf") or []):
        path = join("waf", i)
        found = r.mapping(item, path, ("name", "in", "pattern", "action"), ("name", "pattern"))
        if found is None:
            continue
        name = r.get(found, "name", path, nodes.text, "")
        if name in names:
            r.error(found["name"], join(path, "name"), f"duplicate rule name {name!r}")
        names.add(name)
        locations = _waf_locations(r, found.get("in"), join(path, "in"))
        action: Literal["deny", "log"] = r.get(
            found, "action", path, nodes.choice("deny", "log"), "deny"
        )
        pattern = _pattern(r, found.get("pattern"), join(path, "pattern"))
        if pattern is None:
            continue
        result.append(
            WafRule(
                name=name,
                locations=locations,
                pattern=pattern,
                action=action,
            )
        )
    return tuple(result)


def _waf_locations(r: NodeReader, node: Node | None, path: str) -> frozenset[Any]:
    if node is None:
        return frozenset(_WAF_LOCATIONS)
    items = r.sequence(node, path)
    if items is None:
        return frozenset(_WAF_LOCATIONS)
    if not items:
        r.error(node, path, f"name at least one of {', '.join(_WAF_LOCATIONS)}")
    where = nodes.choice(*_WAF_LOCATIONS)
    return frozenset(
        loc
        for j, item in enumerate(items)
        if (loc := r.value(item, join(path, j), where, None)) is not None
    )


def _pattern(r: NodeReader, node: Node | None, path: str) -> re.Pattern[str] | None:
    if node is None:
        return None
    text = r.value(node, path, nodes.text, None)
    if text is None:
        return None
    try:
        compiled = re.compile(text)
    except re.error as exc:
        at = f" at position {exc.pos}" if exc.pos is not None else ""
        r.error(node, path, f"invalid regular expression: {exc.msg}{at}")
        return None
    reason = catastrophic_reason(text)
    if reason is not None:
        r.error(node, path, f"the pattern can backtrack catastrophically: {reason}")
        return None
    return compiled

"""What key expressions, rules and fields see of one HTTP request
(docs/configuration.md "Key expressions").

Owns: the client address after `trusted_proxies` (X-Forwarded-For / X-Real-IP are
believed only from those networks), and lazy dicts of headers and query values.
Must not: parse HTTP; it reads what the HTTP driver already parsed.
"""

from __future__ import annotations

import ipaddress
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from tlvproxy.auth.identity import Identity
    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import Network


_NO_VALUES: Mapping[str, str] = MappingProxyType({})


def client_address(
    peer: str, headers: Sequence[tuple[str, str]], trusted: Sequence[Network]
) -> str:
    """The caller's address: `peer`, or what trusted proxies say it is.

    X-Forwarded-For is walked from the right, skipping trusted proxies, so a
    client cannot forge its address by sending the header itself
    (docs/configuration.md "Top level", `trusted_proxies`).
    """
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded: list[str] = []
    real_ip: str | None = None
    for name, value in headers:
        if name == "x-forwarded-for":
            forwarded.extend(part.strip() for part in value.split(","))
        elif name == "x-real-ip" and real_ip is None:
            real_ip = value.strip()
    for hop in reversed(forwarded):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            return hop if _is_ip(hop) else peer
    if real_ip and _is_ip(real_ip):
        return real_ip
    for hop in forwarded:
        if _is_ip(hop):
            return hop
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class RequestContext:
    """A `tlvproxy.config.keys.RequestView` of one request or WebSocket handshake."""

    # Headers and query are mapped on first use (most requests need neither);
    # plain slots rather than functools.cached_property, which takes a lock.
    __slots__ = (
        "_header_pairs",
        "_headers",
        "_query",
        "_query_string",
        "identity",
        "numbers",
        "path_params",
        "remote_addr",
    )

    def __init__(
        self,
        *,
        remote_addr: str,
        headers: Sequence[tuple[str, str]],
        query_string: str,
        path_params: Mapping[str, str] | None = None,
    ) -> None:
        self.remote_addr = remote_addr
        self._header_pairs = headers
        self._query_string = query_string
        self.path_params: Mapping[str, str] = path_params or {}
        self._headers: Mapping[str, str] | None = None
        self._query: Mapping[str, str] | None = None
        # Set once the request's credentials are verified (docs/security.md).
        self.identity: Identity | None = None
        # The values of key expressions that fill a number, normalised
        # (tlvproxy.config.keys); None until one is read.
        self.numbers: dict[KeyExpr, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """Header values by lower-case name; the first of repeated headers wins."""
        found = self._headers
        if found is None:
            pairs: dict[str, str] = {}
            for name, value in self._header_pairs:
                pairs.setdefault(name, value)
            found = self._headers = pairs
        return found

    @property
    def query(self) -> Mapping[str, str]:
        """Query values by name; the first of repeated names wins."""
        found = self._query
        if found is None:
            found = self._query = _parse_query(self._query_string)
        return found


def _parse_query(query_string: str) -> Mapping[str, str]:
    if not query_string:
        return _NO_VALUES  # most REST calls have no query: skip parse_qsl
    found: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        found.setdefault(name, value)
    return found

"""The admin listener's answers: health, readiness, metrics, config, reload.

Owns: the admin routes, the three guards every admin request passes, in this
order, and the JSON shape of /admin/config (docs/reference.md, "Admin listener"):

1. Host (403 `forbidden`), against DNS rebinding: a page on a name the attacker
   controls, re-pointed at this listener, sends that name in `Host`. Accepted:
   no Host header at all (HTTP/1.0; HTTP/1.1 without one is a 400 from the
   parser), `localhost` (any case; not `localhost.`, not `*.localhost`), an
   address in 127.0.0.0/8, `[::1]`, and the IP address the listener is bound
   to; when it is bound to 0.0.0.0 or `::`, any IP address. Each with or
   without a port, whatever the port. Any other name, or anything that is not
   `host[:port]`, is refused. `/healthz` and `/readyz` are guarded too: probes
   that dial the pod address send an IP address, which passes.
2. The bearer token (401 `unauthorized`), when the table sets `admin_token`:
   everything but GET (and HEAD) of `/healthz` and `/readyz`.
3. Content-Type (415 `unsupported_media_type`): a POST must be
   `application/json`, token or not. A cross-site page cannot send that type
   without a CORS preflight, and this listener approves none (it never sends
   an `Access-Control-Allow-*` header).

Must not: load tables or count metrics itself; it asks the gateway.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from tlvproxy.config.loader import TableError
from tlvproxy.server.http_conn import Request, Response
from tlvproxy.server.rest import render_error, request_id_of

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import Address, CommandSpec
    from tlvproxy.errors import GatewayError


class AdminBackend(Protocol):
    """What the admin API reads and drives: one gateway, or the worker supervisor."""

    @property
    def ready(self) -> bool: ...
    @property
    def table(self) -> CompiledTable: ...
    def metrics_exposition(self) -> bytes: ...
    def upstream_states(self) -> dict[str, Any]: ...
    async def reload(self) -> str: ...


_JSON = "application/json"
_PROBES = frozenset({"/healthz", "/readyz"})
_REALM = 'Bearer realm="tlvproxy-admin"'

# `Host: host[:port]` with the host an IP literal in brackets or a name of
# letters, digits, dots and hyphens; a name that reads as dotted-decimal IPv4 is
# an address. Nothing else (userinfo, spaces, non-ASCII, zone ids) is accepted.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::(?P<port>[0-9]{0,5}))?"
)
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
_MAX_PORT = 65535

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_allowed(host: str | None, bound: Address) -> bool:
    """Whether a request with this `Host` value may reach the admin listener bound
    to `bound` (the address it listens on, as the socket reports it).

    The rule is the module docstring's first guard (docs/reference.md,
    "Admin listener"): a name is accepted only if it is `localhost`, because DNS
    rebinding needs a name the attacker's DNS answers for; an IP literal is
    accepted if it is loopback, the bound address, or any address when the
    listener is bound to all of them. `None` (no Host header) is accepted.
    """
    if host is None:
        return True
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    port = match["port"]
    if port and int(port) > _MAX_PORT:
        return False
    address = _literal(match["ipv6"], match["name"])
    if address is None:
        return match["name"] is not None and match["name"].lower() == "localhost"
    if _is_loopback(address):
        return True
    listening = _bound_address(bound.host)
    if listening is None:
        return False
    return listening.is_unspecified or address == listening


def _literal(ipv6: str | None, name: str | None) -> _IPAddress | None:
    """The IP address the Host names, or None when it names a host by name (or
    a bracketed value that is not an IPv6 address, which `_HOST` lets through)."""
    try:
        if ipv6 is not None:
            return ipaddress.IPv6Address(ipv6)
        # Dotted-decimal only: 0x7f.0.0.1, 127.1 and 0177.0.0.1 are names here
        # (refused), as browsers write the address in its canonical form.
        return ipaddress.IPv4Address(name)
    except ValueError:
        return None


def _is_loopback(address: _IPAddress) -> bool:
    # Exactly ::1 for IPv6: an IPv4-mapped ::ffff:127.0.0.1 is not taken as loopback.
    if isinstance(address, ipaddress.IPv4Address):
        return address in _LOOPBACK_V4
    return address == _LOOPBACK_V6


def _bound_address(host: str) -> _IPAddress | None:
    # A link-local bind reports "fe80::1%eth0"; the Host header cannot carry a zone.
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def content_type_is_json(value: str | None) -> bool:
    """Whether a Content-Type value is `application/json`, parameters allowed and
    the media type compared without regard to case."""
    if value is None:
        return False
    media_type = value.partition(";")[0].strip(" \t")
    return media_type.lower() == _JSON


def _json(status: int, value: Any, *extra: tuple[str, str]) -> Response:
    body = json.dumps(value, ensure_ascii=False, indent=None).encode()
    return Response(status=status, headers=[("Content-Type", _JSON), *extra], body=body)


def _error(
    status: int, code: str, message: str, *extra: tuple[str, str], **details: Any
) -> Response:
    return _json(status, {"error": {"code": code, "message": message, **details}}, *extra)


def admin_error(error: GatewayError, request: Request | None) -> Response:
    """The admin listener's answer to a malformed or slow request (never enveloped)."""
    return render_error(error, request_id_of(request), envelope=False)


class AdminHandler:
    """Answers admin requests for one gateway process (or the supervisor).

    `bound` is the address the admin listener's socket is bound to; the Host
    guard compares against it.
    """

    def __init__(self, backend: AdminBackend, *, bound: Address) -> None:
        self._backend = backend
        self._bound = bound

    async def __call__(self, request: Request) -> Response:
        if refused := self._guard(request):
            return refused
        path, method = request.path, request.method
        if path == "/healthz":
            return self._only_get(method) or _json(200, {"status": "ok"})
        if path == "/readyz":
            if refused := self._only_get(method):
                return refused
            if not self._backend.ready:
                return _json(503, {"status": "draining"})
            if down := self._without_healthy_nodes():
                return _json(503, {"status": "no healthy node", "upstreams": down})
            return _json(200, {"status": "ready"})
        if path == "/metrics":
            if refused := self._only_get(method):
                return refused
            return Response(
                status=200,
                headers=[("Content-Type", CONTENT_TYPE_LATEST)],
                body=self._backend.metrics_exposition(),
            )
        if path == "/openapi.json":
            if refused := self._only_get(method):
                return refused
            from tlvproxy.openapi import build_document

            return _json(200, build_document(self._backend.table))
        if path == "/admin/config":
            return self._only_get(method) or _json(200, self._config())
        if path == "/admin/reload":
            if method != "POST":
                return _error(405, "method_not_allowed", "use POST", ("Allow", "POST"))
            return await self._reload()
        return _error(404, "route_not_found", f"no admin endpoint at {path}")

    def _guard(self, request: Request) -> Response | None:
        """The refusal of the first guard the request fails, or None (module docstring)."""
        if not host_allowed(request.header("host"), self._bound):
            return _error(
                403,
                "forbidden",
                "the Host header names neither localhost nor this listener's address",
            )
        probe = request.path in _PROBES and request.method in ("GET", "HEAD")
        if not probe and not self._authorised(request):
            return _error(
                401,
                "unauthorized",
                "this endpoint needs a valid bearer token",
                ("WWW-Authenticate", _REALM),
            )
        if request.method == "POST" and not content_type_is_json(
            _only_one(request, "content-type")
        ):
            return _error(
                415,
                "unsupported_media_type",
                f"the admin API takes Content-Type: {_JSON}",
            )
        return None

    @staticmethod
    def _only_get(method: str) -> Response | None:
        if method in ("GET", "HEAD"):
            return None
        return _error(405, "method_not_allowed", "use GET", ("Allow", "GET, HEAD"))

    def _without_healthy_nodes(self) -> list[str]:
        """The upstreams of `readiness.require_healthy_upstreams` that have no
        healthy node now (docs/operations.md "Readiness")."""
        required = self._backend.table.readiness.require_healthy_upstreams
        if not required:
            return []
        states = self._backend.upstream_states()
        return [
            name
            for name in required
            if not any(node.get("healthy") for node in states.get(name, {}).get("nodes", ()))
        ]

    def _authorised(self, request: Request) -> bool:
        token = self._backend.table.admin_token
        if token is None:
            return True
        scheme, _, value = (request.header("authorization") or "").strip().partition(" ")
        try:
            # The parsers decode header bytes as latin-1; this gives the bytes back.
            given = value.strip().encode("latin-1")
        except UnicodeEncodeError:
            return False
        # Constant-time compare: the token must not leak through response timing.
        matches = hmac.compare_digest(given, token.encode())
        return scheme.lower() == "bearer" and matches

    async def _reload(self) -> Response:
        try:
            version = await self._backend.reload()
        except TableError as exc:
            return _error(
                400,
                "invalid_table",
                "the table did not load; the old one stays",
                errors=exc.problems,
            )
        return _json(200, {"version": version})

    def _config(self) -> dict[str, Any]:
        table = self._backend.table
        return {
            "version": table.version,
            "source": _source(table),
            # Where a table kept in etcd was read, and the revision of its last
            # change (docs/operations.md "Running a fleet").
            "etcd": None
            if table.origin is None
            else {"endpoints": list(table.origin.endpoints), "prefix": table.origin.prefix},
            "revision": None if table.origin is None else table.origin.revision,
            "commands": [_command(c, table) for c in table.commands],
            "routes": [
                {"method": r.method, "path": r.template, "command": r.command.name}
                for r in (table.router.routes if table.router is not None else ())
            ],
            "websocket": None
            if table.websocket is None
            else {
                "path": table.websocket.path,
                "upstream": table.websocket.upstream,
                "mode": table.websocket.mode,
                "auth": table.websocket.auth,
            },
            "sessions": None
            if table.sessions is None
            else {
                "path": table.sessions.path,
                "upstream": table.sessions.upstream,
                "auth": table.sessions.auth,
            },
            # Names and kinds only: key sets, key digests and secrets stay out.
            "auth": [{"name": name, "type": spec.kind} for name, spec in table.auth.items()],
            "upstreams": self._backend.upstream_states(),
        }


def _source(table: CompiledTable) -> str | None:
    if table.origin is not None:
        return "etcd"
    return None if table.source is None else str(table.source)


def _command(command: CommandSpec, table: CompiledTable) -> dict[str, Any]:
    return {
        "name": command.name,
        "command": f"0x{command.command:04x}",
        "upstream": command.upstream,
        "codec": command.codec,
        "request": command.request,
        "response": command.response,
        "push": command.push,
        "http": None
        if command.http is None
        else {"method": command.http.method, "path": command.http.path},
        "auth": command.auth,
        **_traffic(command, table),
    }


def _traffic(command: CommandSpec, table: CompiledTable) -> dict[str, Any]:
    """A command's split, mirror and fallback (docs/configuration.md "split,
    mirror, fallback"); a static body as callers get it."""
    rules = command.traffic
    if rules is None:
        return {"split": [], "mirror": None, "fallback": None}
    split = []
    for rule in rules.split:
        shown: dict[str, Any] = {"key": str(rule.key), "to": rule.to}
        if rule.tail is not None:
            shown["tail"] = sorted(rule.tail)
        elif rule.values is not None:
            shown["values"] = sorted(rule.values)
        elif rule.percent is not None:
            shown["percent"] = rule.percent / 100  # basis points
        split.append(shown)
    mirror = rules.mirror
    fallback = rules.fallback
    shown_fallback = None
    if fallback is not None:
        last_good = fallback.last_good
        shown_fallback = {
            "body": None
            if fallback.body is None
            else table.codecs[command.name].decode_response(fallback.body),
            "last_good": None
            if last_good is None
            else {
                "key": str(last_good.key),
                "ttl": last_good.ttl,
                "max_entries": last_good.max_entries,
                "max_bytes": last_good.max_bytes,
            },
        }
    return {
        "split": split,
        "mirror": None
        if mirror is None
        else {
            "to": mirror.to,
            "percent": mirror.percent / 100,
            "compare": mirror.compare,
            "log_values": mirror.log_values,
        },
        "fallback": shown_fallback,
    }


def _only_one(request: Request, name: str) -> str | None:
    """The value of header `name` if the request has it exactly once, else None."""
    values = [value for header, value in request.headers if header == name]
    return values[0] if len(values) == 1 else None

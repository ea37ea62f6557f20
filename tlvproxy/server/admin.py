"""The admin listener's answers (SPEC 6): health, readiness, metrics, config, reload.

Owns: the admin routes, the bearer-token check on /admin/*, and the JSON shape of
/admin/config. Must not: load tables or count metrics itself; it asks the gateway.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from tlvproxy.config.loader import TableError
from tlvproxy.server.http_conn import Request, Response
from tlvproxy.server.rest import render_error, request_id_of

if TYPE_CHECKING:
    from tlvproxy.config.model import CommandSpec, Table
    from tlvproxy.errors import GatewayError


class AdminBackend(Protocol):
    """What the admin API reads and drives: one gateway, or the worker supervisor."""

    @property
    def ready(self) -> bool: ...
    @property
    def table(self) -> Table: ...
    def metrics_exposition(self) -> bytes: ...
    def upstream_states(self) -> dict[str, Any]: ...
    async def reload(self) -> str: ...


_JSON = "application/json"


def _json(status: int, value: Any, *extra: tuple[str, str]) -> Response:
    body = json.dumps(value, ensure_ascii=False, indent=None).encode()
    return Response(status=status, headers=[("Content-Type", _JSON), *extra], body=body)


def _error(status: int, code: str, message: str, **details: Any) -> Response:
    return _json(status, {"error": {"code": code, "message": message, **details}})


def admin_error(error: GatewayError, request: Request | None) -> Response:
    """The admin listener's answer to a malformed or slow request (never enveloped)."""
    return render_error(error, request_id_of(request), envelope=False)


class AdminHandler:
    """Answers admin requests for one gateway process."""

    def __init__(self, backend: AdminBackend) -> None:
        self._backend = backend

    async def __call__(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path == "/healthz":
            return self._only_get(method) or _json(200, {"status": "ok"})
        if path == "/readyz":
            if refused := self._only_get(method):
                return refused
            if self._backend.ready:
                return _json(200, {"status": "ready"})
            return _json(503, {"status": "draining"})
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
        if path.startswith("/admin/"):
            if not self._authorised(request):
                return _error(401, "unauthorized", "this endpoint needs a valid bearer token")
            if path == "/admin/config":
                return self._only_get(method) or _json(200, self._config())
            if path == "/admin/reload":
                if method != "POST":
                    return _error(405, "method_not_allowed", "use POST")
                return await self._reload()
        return _error(404, "route_not_found", f"no admin endpoint at {path}")

    @staticmethod
    def _only_get(method: str) -> Response | None:
        if method in ("GET", "HEAD"):
            return None
        response = _error(405, "method_not_allowed", "use GET")
        return Response(
            status=405, headers=[*response.headers, ("Allow", "GET, HEAD")], body=response.body
        )

    def _authorised(self, request: Request) -> bool:
        token = self._backend.table.admin_token
        if token is None:
            return True
        given = request.header("authorization") or ""
        scheme, _, value = given.partition(" ")
        # Constant-time compare: the token must not leak through response timing.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        )

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
            "source": None if table.source is None else str(table.source),
            "commands": [_command(c) for c in table.commands],
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
            },
            "upstreams": self._backend.upstream_states(),
        }


def _command(command: CommandSpec) -> dict[str, Any]:
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
    }

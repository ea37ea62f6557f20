"""The OpenAPI 3.1 document of a table's REST routes, assembled
(docs/operations.md "Admin listener").

Owns: the document's frame: its version and info, the servers "try it"
tools call (the HTTP and HTTPS listeners), the paths with an operation per
route (operations.py), and the components: schemas, error answers and a
security scheme per authenticator.
Must not: do I/O, import trio, or change the table. `tlvproxy openapi` prints
the result and the admin listener serves it at GET /openapi.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tlvproxy.config.model import ApiKeyAuthSpec, JwtAuthSpec
from tlvproxy.openapi.operations import Operations

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import AuthSpec

OPENAPI_VERSION: Final = "3.1.0"


def build_document(table: CompiledTable) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every REST route of `table`, as a JSON-able dict.

    The table must have been loaded (it has a schema and a router); a table
    without routes gives a document with no paths.
    """
    operations = Operations(table)
    paths: dict[str, dict[str, Any]] = {}
    routes = table.router.routes if table.router is not None else ()
    for route in routes:
        paths.setdefault(route.template, {})[route.method.lower()] = operations.operation(route)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tlvproxy REST routes",
            "version": table.version or "0",
            "description": (
                "Each operation sends one TLV command to an upstream service and answers "
                "with its response. Generated from the gateway's table"
                + (f" {table.source.name}" if table.source is not None else "")
                + "."
            ),
        },
        "servers": _servers(table),
        "paths": paths,
        "components": {
            "schemas": operations.messages.schemas,
            "responses": operations.responses,
            "securitySchemes": {name: _security_scheme(spec) for name, spec in table.auth.items()},
        },
    }


def _servers(table: CompiledTable) -> list[dict[str, Any]]:
    """The HTTP and HTTPS listeners, so that "try it" tools call the gateway,
    not the admin port.

    A wildcard address is no host to call: the host becomes a variable."""
    servers = []
    for scheme, address in (("http", table.listen.http), ("https", table.listen.https)):
        if address is None:
            continue
        if address.host in ("0.0.0.0", "::"):
            servers.append(
                {
                    "url": f"{scheme}://{{host}}:{address.port}",
                    "variables": {
                        "host": {"default": "localhost", "description": "the gateway's host"}
                    },
                }
            )
        else:
            servers.append({"url": f"{scheme}://{address}"})
    return servers


def _security_scheme(spec: AuthSpec) -> dict[str, Any]:
    """How a caller presents credentials to one authenticator (docs/security.md)."""
    if isinstance(spec, JwtAuthSpec):
        place = spec.token_from[0] if spec.token_from else None
        if place is None or (place.source == "header" and place.name == "authorization"):
            return {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        return {"type": "apiKey", "in": place.source, "name": place.name}
    if isinstance(spec, ApiKeyAuthSpec):
        return {"type": "apiKey", "in": spec.source.source, "name": spec.source.name}
    return {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": 'Signature keyId=...,algorithm="hmac-sha256",headers=...,signature=...; '
        'see the gateway\'s docs/security.md, "Signed requests".',
    }

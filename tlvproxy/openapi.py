"""The OpenAPI 3.1 document of a table's REST routes (docs/operations.md "Admin listener").

Owns: turning a loaded `Table` into one OpenAPI document: an operation per REST
route with its path, query and header parameters, its request body and its
answers, and JSON Schemas generated from the protobuf descriptors as the proto3
JSON mapping writes them under the command's `json` options.
Must not: do I/O, import trio, or change the table. `tlvproxy openapi` prints the
result and the admin listener serves it at GET /openapi.json.

Decisions made here:
- Schemas describe what the gateway writes: field names per `json.field_names`,
  enums per `json.enums`, 64-bit integers as decimal strings, bytes as base64.
  On input the gateway is more lenient (both field spellings, enums by name or
  number, 64-bit integers as numbers too); the descriptions say so.
- A message is the component `<full name>`; when a command's `json` options make
  its JSON differ from the table's (other field names or enum form), the
  component is `<full name>-<field_names>-<enums>`. `-` cannot occur in a
  protobuf name, so the two never collide.
- Body-less methods (GET, HEAD, DELETE, OPTIONS) list the top-level scalar fields
  of the request as query parameters; the others take a JSON body. Path
  parameters are required. Fields filled from `fields` are the gateway's, so
  they are not parameters; key expressions reading a header, query value or
  cookie (`uid`, `fields`) become optional parameters of that kind.
- A command with a fallback lists the X-Fallback header on its 200 answer; one
  with a split answers with any of the response messages of the commands it
  may be sent as (`anyOf`).
- Every error status of docs/reference.md "Errors" is listed, plus each
  `status_map` value not among them; with `envelope: true` every answer is HTTP
  200 with the envelope.
- `json` commands take and give any JSON value; `raw` commands take and give
  application/octet-stream (a base64 string inside an envelope).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from google.protobuf.descriptor import FieldDescriptor

from tlvproxy.config.model import ApiKeyAuthSpec, JwtAuthSpec
from tlvproxy.routing import template_params

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor, EnumDescriptor

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import AuthSpec, CommandSpec, JsonOptions
    from tlvproxy.routing import Route

OPENAPI_VERSION: Final = "3.1.0"
_JSON: Final = "application/json"
_OCTETS: Final = "application/octet-stream"
_BODYLESS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})

# Every error status and the codes it carries (docs/reference.md "Errors").
ERROR_CODES: Final[dict[int, tuple[str, ...]]] = {
    400: ("bad_request",),
    401: ("unauthorized",),
    403: ("forbidden",),
    404: ("route_not_found",),
    405: ("method_not_allowed",),
    408: ("request_timeout",),
    413: ("payload_too_large",),
    429: ("rate_limited",),
    431: ("headers_too_large",),
    500: ("upstream_status", "internal_error"),
    502: ("upstream_unavailable", "upstream_protocol_error"),
    503: ("shutting_down",),
    504: ("upstream_timeout",),
}
_ERROR_TEXT: Final = {
    400: "The body is not valid JSON, or a field is unknown or of the wrong type.",
    401: (
        "Credentials missing, malformed, expired or not valid for the command's "
        "authenticator; see the WWW-Authenticate header."
    ),
    403: "A deny WAF rule matched (the message names the rule), or the caller lacks a claim.",
    404: "No route for the path.",
    405: "The path exists for other methods; see the Allow header.",
    408: "The request head or body did not arrive in time.",
    413: "The body is over limits.max_request_body.",
    429: "A rate limit refused the request; see the Retry-After header.",
    431: "The request head is over limits.max_header_bytes.",
    500: "The upstream answered a non-zero status that status_map does not map.",
    502: "No healthy upstream node, the connection failed, or the upstream sent a bad frame.",
    503: "The gateway is draining.",
    504: "The upstream did not answer within the timeout.",
}
_ERROR_BODY: Final = "ErrorBody"
_ENVELOPE: Final = "Envelope"
_REQUEST_ID_HEADER: Final = {
    "X-Request-Id": {
        "description": "The caller's X-Request-Id, or a new one.",
        "schema": {"type": "string"},
    }
}
_FALLBACK_HEADER: Final = {
    "X-Fallback": {
        "description": (
            "Present when the gateway answered in the upstream's place (the upstream was "
            "unavailable, timed out or sent a bad answer): static, the table's fallback "
            "body; last_good, the last good answer to the same request."
        ),
        "schema": {"type": "string", "enum": ["static", "last_good"]},
    }
}

_T = FieldDescriptor
_INT32: Final = {"type": "integer", "format": "int32"}
_UINT32: Final = {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
_INT64: Final = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64: Final = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_BYTES: Final = {"type": "string", "format": "byte", "contentEncoding": "base64"}
_SCALARS: Final[dict[int, dict[str, Any]]] = {
    _T.TYPE_INT32: _INT32,
    _T.TYPE_SINT32: _INT32,
    _T.TYPE_SFIXED32: _INT32,
    _T.TYPE_UINT32: _UINT32,
    _T.TYPE_FIXED32: _UINT32,
    _T.TYPE_INT64: _INT64,
    _T.TYPE_SINT64: _INT64,
    _T.TYPE_SFIXED64: _INT64,
    _T.TYPE_UINT64: _UINT64,
    _T.TYPE_FIXED64: _UINT64,
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: _BYTES,
}
# proto3 JSON writes non-finite floats as these strings.
_FLOAT_WORDS: Final = ["NaN", "Infinity", "-Infinity"]

# Well-known types whose JSON form is not an object of their fields (proto3 JSON mapping).
_WRAPPERS: Final[dict[str, int]] = {
    "google.protobuf.DoubleValue": _T.TYPE_DOUBLE,
    "google.protobuf.FloatValue": _T.TYPE_FLOAT,
    "google.protobuf.Int64Value": _T.TYPE_INT64,
    "google.protobuf.UInt64Value": _T.TYPE_UINT64,
    "google.protobuf.Int32Value": _T.TYPE_INT32,
    "google.protobuf.UInt32Value": _T.TYPE_UINT32,
    "google.protobuf.BoolValue": _T.TYPE_BOOL,
    "google.protobuf.StringValue": _T.TYPE_STRING,
    "google.protobuf.BytesValue": _T.TYPE_BYTES,
}
_WELL_KNOWN: Final[dict[str, dict[str, Any]]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, e.g. 2024-01-02T03:04:05.678Z",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Seconds with up to 9 decimals and an 's', e.g. 1.5s",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated lowerCamelCase field paths",
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value"},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
        "description": "The packed message's fields beside its type URL",
    },
}


def build_document(table: CompiledTable) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every REST route of `table`, as a JSON-able dict.

    The table must have been loaded (it has a schema and a router); a table
    without routes gives a document with no paths.
    """
    builder = _Builder(table)
    paths: dict[str, dict[str, Any]] = {}
    routes = table.router.routes if table.router is not None else ()
    for route in routes:
        paths.setdefault(route.template, {})[route.method.lower()] = builder.operation(route)
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
            "schemas": builder.schemas,
            "responses": builder.responses,
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


def _error_body_schema() -> dict[str, Any]:
    codes = sorted({code for group in ERROR_CODES.values() for code in group})
    return {
        "type": "object",
        "description": 'The error answer; see the gateway\'s docs/reference.md, "Errors".',
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "request_id"],
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {
                        "type": "string",
                        "description": "What was wrong, in words a caller can act on.",
                    },
                    "request_id": {"type": "string"},
                    "status": {
                        "type": "integer",
                        "description": "upstream_status only: the upstream's status.",
                    },
                    "body": {
                        "description": "upstream_status only: the decoded response, "
                        "when it decodes.",
                    },
                },
            }
        },
    }


def _envelope_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": (
            "With envelope: true every answer is HTTP 200 with this object. code is the "
            "upstream status (0 = success) or, for an error of the gateway, the HTTP "
            "status it would have answered."
        ),
        "required": ["code", "msg", "data"],
        "properties": {
            "code": {"type": "integer"},
            "msg": {"type": "string"},
            "data": {
                "description": "The response on success; null or the decoded response otherwise."
            },
        },
    }


def _error_response(text: str, codes: tuple[str, ...], status: int) -> dict[str, Any]:
    headers: dict[str, Any] = dict(_REQUEST_ID_HEADER)
    if status == 405:
        headers["Allow"] = {
            "description": "The methods the path has.",
            "schema": {"type": "string"},
        }
    if status == 429:
        headers["Retry-After"] = {
            "description": "Seconds until a retry can pass.",
            "schema": {"type": "integer"},
        }
    return {
        "description": f"{text} Codes: {', '.join(codes)}.",
        "headers": headers,
        "content": {_JSON: {"schema": _ref(_ERROR_BODY)}},
    }


def _answer_headers(command: CommandSpec) -> dict[str, Any]:
    """The headers of a command's 200 answer: X-Request-Id, and X-Fallback when
    it has a fallback (docs/configuration.md "fallback")."""
    headers = dict(_REQUEST_ID_HEADER)
    if command.traffic is not None and command.traffic.fallback is not None:
        headers.update(_FALLBACK_HEADER)
    return headers


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Builder:
    """Collects the components of one document while operations are built."""

    def __init__(self, table: CompiledTable) -> None:
        self.table = table
        self.schemas: dict[str, Any] = {}
        self.responses: dict[str, Any] = {}
        if table.envelope:
            self.schemas[_ENVELOPE] = _envelope_schema()
        else:
            self.schemas[_ERROR_BODY] = _error_body_schema()
            self._error_responses()

    def _error_responses(self) -> None:
        """One answer per error status (docs/reference.md "Errors"), and per `status_map`
        value: an upstream status mapped onto a status answers with code upstream_status."""
        mapped: dict[int, list[int]] = {}
        for upstream_status, http_status in sorted(self.table.status_map.items()):
            mapped.setdefault(http_status, []).append(upstream_status)
        for status in sorted({*ERROR_CODES, *mapped}):
            text = _ERROR_TEXT.get(status, "")
            codes = ERROR_CODES.get(status, ())
            if status in mapped:
                shown = ", ".join(str(s) for s in mapped[status])
                text = f"{text} status_map maps the upstream's status {shown} here.".strip()
                if "upstream_status" not in codes:
                    codes = (*codes, "upstream_status")
            self.responses[f"Error{status}"] = _error_response(text, codes, status)

    # ------------------------------------------------------------ operations

    def operation(self, route: Route) -> dict[str, Any]:
        command = route.command
        options = command.json or self.table.json
        request = self._request_descriptor(command)
        operation: dict[str, Any] = {
            "operationId": command.name,
            "summary": f"{command.name} (command 0x{command.command:04x})",
            "description": self._describe(command),
            "tags": [command.upstream] if command.upstream else [],
        }
        parameters = self._parameters(route, request, options)
        if parameters:
            operation["parameters"] = parameters
        if route.method not in _BODYLESS:
            operation["requestBody"] = self._request_body(command, request, options)
        operation["responses"] = self._responses(command, options)
        if command.auth is not None:
            operation["security"] = [{command.auth: []}]
        else:
            operation["security"] = []  # public, whatever a default says
            operation["responses"].pop("401", None)
        return operation

    def _describe(self, command: CommandSpec) -> str:
        lines = [f"Sends command 0x{command.command:04x} to upstream {command.upstream}."]
        if command.codec == "protobuf":
            lines.append(f"Request {command.request}, response {command.response}.")
            lines.append(
                "Input also accepts both field spellings (proto and lowerCamelCase), "
                "enums by name or number and 64-bit integers as numbers."
            )
        elif command.codec == "json":
            lines.append("The JSON body passes through unchanged; so does the answer.")
        else:
            lines.append("The body bytes pass through unchanged; so do the answer's.")
        if command.fields:
            filled = ", ".join(f"{name} (from {key})" for name, key in command.fields.items())
            lines.append(f"Filled by the gateway: {filled}.")
        if command.uid is not None:
            lines.append(f"The frame's uid comes from {command.uid}.")
        if command.idempotent:
            lines.append("Idempotent: retried on another node after a failure.")
        rules = command.traffic
        if rules is not None:
            targets = sorted({rule.to for rule in rules.split})
            if targets:
                lines.append(
                    f"Split: some requests are sent as {', '.join(targets)} instead, "
                    "which answers them."
                )
            if rules.mirror is not None:
                lines.append(
                    f"Mirrored: a copy of {rules.mirror.percent / 100:g}% of the requests "
                    f"goes to {rules.mirror.to}; the answer is this command's."
                )
            if rules.fallback is not None:
                lines.append(
                    "Fallback: when the upstream cannot answer, a 200 answer with the "
                    "X-Fallback header may stand in."
                )
        return " ".join(lines)

    def _request_descriptor(self, command: CommandSpec) -> Descriptor | None:
        schema = self.table.schema
        if command.codec != "protobuf" or command.request is None or schema is None:
            return None
        return schema.descriptor(command.request)

    def _parameters(
        self, route: Route, request: Descriptor | None, options: JsonOptions
    ) -> list[dict[str, Any]]:
        command = route.command
        # Path parameters and `fields` may name a field by its proto or its JSON name.
        fields = {} if request is None else {f.name: f for f in request.fields}
        fields.update({} if request is None else {f.json_name: f for f in request.fields})
        parameters: list[dict[str, Any]] = []
        path_names = template_params(route.template)
        for name in path_names:
            field = fields.get(name)
            parameters.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"} if field is None else self._field(field, options),
                }
            )
        seen = {("path", name) for name in path_names}
        taken = {fields[name].number for name in (*path_names, *command.fields) if name in fields}
        if request is not None and route.method in _BODYLESS:
            for field in request.fields:
                if field.number in taken:
                    continue
                # Overlays set top-level scalars only (docs/configuration.md "How a REST
                # request becomes a request message (overlays)").
                if field.is_repeated or field.message_type is not None:
                    continue
                seen.add(("query", field.name))
                parameters.append(
                    {
                        "name": field.name,
                        "in": "query",
                        "required": False,
                        "schema": self._field(field, options),
                    }
                )
        keys: list[tuple[KeyExpr, str]] = []
        if command.uid is not None:
            keys.append((command.uid, "The user id sent in the frame header (default 0)."))
        keys.extend(
            (key, f"Fills the request field {field}.") for field, key in command.fields.items()
        )
        for key, description in keys:
            where = {"header": "header", "query": "query", "cookie": "cookie"}.get(key.source)
            if where is None or (where, key.name) in seen:
                continue
            seen.add((where, key.name))
            parameters.append(
                {
                    "name": key.name,
                    "in": where,
                    "required": False,
                    "description": description,
                    "schema": {"type": "string"},
                }
            )
        return parameters

    def _request_body(
        self, command: CommandSpec, request: Descriptor | None, options: JsonOptions
    ) -> dict[str, Any]:
        if command.codec == "raw":
            content = {_OCTETS: {"schema": {"type": "string", "contentMediaType": _OCTETS}}}
        elif request is None:
            content = {_JSON: {"schema": {"description": "Any JSON value"}}}
        else:
            content = {_JSON: {"schema": self._message(request, options)}}
        return {
            "required": False,
            "description": "An empty body is the empty object."
            if command.codec == "protobuf"
            else "Passed through as the frame body.",
            "content": content,
        }

    def _response_schema(self, command: CommandSpec, options: JsonOptions) -> dict[str, Any]:
        """The answer's schema; with a split, any of the commands' it may be sent as."""
        schemas = [self._own_response_schema(command, options)]
        rules = command.traffic
        for rule in () if rules is None else rules.split:
            target = self.table.commands_by_name[rule.to]
            shown = self._own_response_schema(target, target.json or self.table.json)
            if shown not in schemas:
                schemas.append(shown)
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}

    def _own_response_schema(self, command: CommandSpec, options: JsonOptions) -> dict[str, Any]:
        schema = self.table.schema
        if command.codec == "protobuf" and command.response is not None and schema is not None:
            return self._message(schema.descriptor(command.response), options)
        if command.codec == "raw":
            return {"type": "string", "contentEncoding": "base64"}
        return {"description": "Any JSON value"}

    def _responses(self, command: CommandSpec, options: JsonOptions) -> dict[str, Any]:
        if self.table.envelope:
            data = self._response_schema(command, options)
            schema = {
                "allOf": [
                    _ref(_ENVELOPE),
                    {"properties": {"data": {"anyOf": [data, {"type": "null"}]}}},
                ]
            }
            return {
                "200": {
                    "description": "Every answer, success or error, in the envelope.",
                    "headers": _answer_headers(command),
                    "content": {_JSON: {"schema": schema}},
                }
            }
        if command.codec == "raw":
            content = {_OCTETS: {"schema": {"type": "string", "contentMediaType": _OCTETS}}}
        else:
            content = {_JSON: {"schema": self._response_schema(command, options)}}
        responses: dict[str, Any] = {
            "200": {
                "description": "The upstream answered status 0.",
                "headers": _answer_headers(command),
                "content": content,
            }
        }
        for name in self.responses:
            responses[name.removeprefix("Error")] = {"$ref": f"#/components/responses/{name}"}
        return responses

    # ------------------------------------------------------------ schemas

    def _variant(self, options: JsonOptions) -> str:
        base = self.table.json
        if (options.field_names, options.enums) == (base.field_names, base.enums):
            return ""
        return f"-{options.field_names}-{options.enums}"

    def _message(self, descriptor: Descriptor, options: JsonOptions) -> dict[str, Any]:
        """A $ref to the component of `descriptor`, generating it (and what it uses) once."""
        name = descriptor.full_name
        if name in _WELL_KNOWN or name in _WRAPPERS:
            if name not in self.schemas:
                self.schemas[name] = _well_known(name)
            return _ref(name)
        component = name + self._variant(options)
        if component in self.schemas:
            return _ref(component)
        schema: dict[str, Any] = {"type": "object", "properties": {}}
        self.schemas[component] = schema  # placed first: recursive messages refer to it
        properties: dict[str, Any] = schema["properties"]
        for field in descriptor.fields:
            key = field.name if options.field_names == "proto" else field.json_name
            properties[key] = self._field(field, options)
        exclusive: dict[str, Any] = {}
        for oneof in descriptor.oneofs:
            members = [
                f.name if options.field_names == "proto" else f.json_name for f in oneof.fields
            ]
            if len(members) < 2:
                continue  # a proto3 `optional` field's synthetic oneof
            for member in members:
                others = {other: False for other in members if other != member}
                exclusive[member] = {"properties": others}
        if exclusive:
            schema["dependentSchemas"] = exclusive
        schema["description"] = f"protobuf {name}"
        return _ref(component)

    def _field(self, field: FieldDescriptor, options: JsonOptions) -> dict[str, Any]:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            key_field = message.fields_by_name["key"]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self._field(message.fields_by_name["value"], options),
            }
            if key_field.type == _T.TYPE_BOOL:
                schema["propertyNames"] = {"enum": ["true", "false"]}
            elif key_field.type != _T.TYPE_STRING:
                schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
            return schema
        single = self._single(field, options)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def _single(self, field: FieldDescriptor, options: JsonOptions) -> dict[str, Any]:
        if field.message_type is not None:
            return self._message(field.message_type, options)
        if field.enum_type is not None:
            return self._enum(field.enum_type, options)
        return _scalar(field.type)

    def _enum(self, enum: EnumDescriptor, options: JsonOptions) -> dict[str, Any]:
        if enum.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        by_number = options.enums == "number"
        component = enum.full_name + (
            "" if options.enums == self.table.json.enums else f"-{options.enums}s"
        )
        if component not in self.schemas:
            if by_number:
                shown = ", ".join(f"{v.number} = {v.name}" for v in enum.values)
                self.schemas[component] = {
                    "type": "integer",
                    "enum": [v.number for v in enum.values],
                    "description": f"protobuf enum {enum.full_name}: {shown}",
                }
            else:
                self.schemas[component] = {
                    "type": "string",
                    "enum": [v.name for v in enum.values],
                    "description": f"protobuf enum {enum.full_name}",
                }
        return _ref(component)


def _well_known(name: str) -> dict[str, Any]:
    wrapped = _WRAPPERS.get(name)
    if wrapped is None:
        return dict(_WELL_KNOWN[name])
    return {**_scalar(wrapped), "description": f"{name}: the wrapped value itself"}


def _scalar(kind: int) -> dict[str, Any]:
    if kind in (_T.TYPE_DOUBLE, _T.TYPE_FLOAT):
        return {
            "oneOf": [
                {"type": "number", "format": "double" if kind == _T.TYPE_DOUBLE else "float"},
                {"type": "string", "enum": _FLOAT_WORDS},
            ]
        }
    return dict(_SCALARS[kind])

"""The operations of the OpenAPI document: one per REST route, with its
parameters, its request body and its answers (docs/reference.md "Mapping").

Owns: what an operation says of its command: the summary and description,
the path, query, header and cookie parameters, the request body, the
answers' schemas (a split's included) and the security requirement.
Must not: generate message schemas (messages.py does) or the error answers
(answers.py), do I/O or import trio.

Decisions made here:
- Body-less methods (GET, HEAD, DELETE, OPTIONS) list the top-level scalar fields
  of the request as query parameters; the others take a JSON body. Path
  parameters are required. Fields filled from `fields` are the gateway's, so
  they are not parameters; key expressions reading a header, query value or
  cookie (`uid`, `fields`) become optional parameters of that kind.
- A command with a split answers with any of the response messages of the
  commands it may be sent as (`anyOf`).
- `json` commands take and give any JSON value; `raw` commands take and give
  application/octet-stream (a base64 string inside an envelope).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tlvproxy.openapi.answers import (
    ENVELOPE,
    ERROR_BODY,
    JSON_TYPE,
    answer_headers,
    envelope_schema,
    error_body_schema,
    error_responses,
)
from tlvproxy.openapi.messages import MessageSchemas, ref
from tlvproxy.routing import template_params

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import CommandSpec, JsonOptions
    from tlvproxy.routing import Route

_OCTETS: Final = "application/octet-stream"
_BODYLESS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class Operations:
    """Builds the operations of one document (`operation`) and collects the
    components they use: the message schemas (`messages.schemas`, with the
    error body or the envelope first) and the error answers (`responses`)."""

    def __init__(self, table: CompiledTable) -> None:
        self.table = table
        self.messages = MessageSchemas(table.json)
        self.responses: dict[str, Any] = {}
        if table.envelope:
            self.messages.schemas[ENVELOPE] = envelope_schema()
        else:
            self.messages.schemas[ERROR_BODY] = error_body_schema()
            self.responses = error_responses(table.status_map)

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
                    "schema": {"type": "string"}
                    if field is None
                    else self.messages.field(field, options),
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
                        "schema": self.messages.field(field, options),
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
            content = {JSON_TYPE: {"schema": {"description": "Any JSON value"}}}
        else:
            content = {JSON_TYPE: {"schema": self.messages.message(request, options)}}
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
            return self.messages.message(schema.descriptor(command.response), options)
        if command.codec == "raw":
            return {"type": "string", "contentEncoding": "base64"}
        return {"description": "Any JSON value"}

    def _responses(self, command: CommandSpec, options: JsonOptions) -> dict[str, Any]:
        if self.table.envelope:
            data = self._response_schema(command, options)
            schema = {
                "allOf": [
                    ref(ENVELOPE),
                    {"properties": {"data": {"anyOf": [data, {"type": "null"}]}}},
                ]
            }
            return {
                "200": {
                    "description": "Every answer, success or error, in the envelope.",
                    "headers": answer_headers(command),
                    "content": {JSON_TYPE: {"schema": schema}},
                }
            }
        if command.codec == "raw":
            content = {_OCTETS: {"schema": {"type": "string", "contentMediaType": _OCTETS}}}
        else:
            content = {JSON_TYPE: {"schema": self._response_schema(command, options)}}
        responses: dict[str, Any] = {
            "200": {
                "description": "The upstream answered status 0.",
                "headers": answer_headers(command),
                "content": content,
            }
        }
        for name in self.responses:
            responses[name.removeprefix("Error")] = {"$ref": f"#/components/responses/{name}"}
        return responses

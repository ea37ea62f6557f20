"""JSON Schemas of protobuf messages, as the gateway writes them
(docs/reference.md "Mapping"), for the OpenAPI document.

Owns: the schema component of each message and enum a document uses,
generated once from the descriptors under a command's `json` options, and
how one component refers to another (`ref`).
Must not: know routes, commands or answers (operations.py and answers.py
use these schemas), do I/O or import trio.

Decisions made here:
- Schemas describe what the gateway writes: field names per `json.field_names`,
  enums per `json.enums`, 64-bit integers as decimal strings, bytes as base64.
  On input the gateway is more lenient (both field spellings, enums by name or
  number, 64-bit integers as numbers too); operations.py's descriptions say so.
- A message is the component `<full name>`; when a command's `json` options make
  its JSON differ from the table's (other field names or enum form), the
  component is `<full name>-<field_names>-<enums>`. `-` cannot occur in a
  protobuf name, so the two never collide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from google.protobuf.descriptor import FieldDescriptor

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor, EnumDescriptor

    from tlvproxy.config.model import JsonOptions

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


def ref(name: str) -> dict[str, Any]:
    """A reference to the schema component `name`."""
    return {"$ref": f"#/components/schemas/{name}"}


class MessageSchemas:
    """The schema components of one document (`schemas`, by name), generated
    as operations ask for them; `base` is the table's `json` options, whose
    components carry no variant suffix."""

    def __init__(self, base: JsonOptions) -> None:
        self.base = base
        self.schemas: dict[str, Any] = {}

    def _variant(self, options: JsonOptions) -> str:
        base = self.base
        if (options.field_names, options.enums) == (base.field_names, base.enums):
            return ""
        return f"-{options.field_names}-{options.enums}"

    def message(self, descriptor: Descriptor, options: JsonOptions) -> dict[str, Any]:
        """A $ref to the component of `descriptor`, generating it (and what it uses) once."""
        name = descriptor.full_name
        if name in _WELL_KNOWN or name in _WRAPPERS:
            if name not in self.schemas:
                self.schemas[name] = _well_known(name)
            return ref(name)
        component = name + self._variant(options)
        if component in self.schemas:
            return ref(component)
        schema: dict[str, Any] = {"type": "object", "properties": {}}
        self.schemas[component] = schema  # placed first: recursive messages refer to it
        properties: dict[str, Any] = schema["properties"]
        for field in descriptor.fields:
            key = field.name if options.field_names == "proto" else field.json_name
            properties[key] = self.field(field, options)
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
        return ref(component)

    def field(self, field: FieldDescriptor, options: JsonOptions) -> dict[str, Any]:
        """The schema of one field: an object for a map, an array when repeated,
        else its one value's (a $ref for a message or an enum)."""
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            key_field = message.fields_by_name["key"]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self.field(message.fields_by_name["value"], options),
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
            return self.message(field.message_type, options)
        if field.enum_type is not None:
            return self._enum(field.enum_type, options)
        return _scalar(field.type)

    def _enum(self, enum: EnumDescriptor, options: JsonOptions) -> dict[str, Any]:
        if enum.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        by_number = options.enums == "number"
        component = enum.full_name + (
            "" if options.enums == self.base.enums else f"-{options.enums}s"
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
        return ref(component)


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

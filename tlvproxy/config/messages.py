"""Checking what a command says of its protobuf messages against the compiled
schema (docs/configuration.md "commands").

Owns: the form of a full message name and whether the schema has it, which
request fields a command's path parameters and `fields` may fill (top-level
fields settable from a string), and which of its key expressions fill a
number (docs/configuration.md "Numbers read once").
Must not: read a command's other keys (commands.py does), or stop at the
first problem: every problem is recorded on the `NodeReader` with its place.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

from google.protobuf.descriptor import FieldDescriptor

from tlvproxy.config import nodes
from tlvproxy.config.nodes import Invalid, join, suggest
from tlvproxy.routing import template_params

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.config.nodes import Node, NodeReader
    from tlvproxy.schema.protos import Schema

_INTEGER_TYPES: Final = frozenset(
    (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    )
)


def _message_name(value: Any) -> str:
    name = nodes.text(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
        raise Invalid(f"expected a full message name like demo.im.Profile, got {name!r}")
    return name


def read_message(r: NodeReader, node: Node | None, path: str, schema: Schema | None) -> str | None:
    """The full message name at `node` (None when there is none or it is not
    a name); a name the compiled `schema` lacks is recorded."""
    if node is None:
        return None
    name = r.value(node, path, _message_name, None)
    if name is None or schema is None:
        return name
    if not schema.has_message(name):
        r.error(
            node,
            path,
            f"undefined message {name!r} (not in proto.files)"
            + suggest(name, schema.message_names),
        )
    return name


def check_request_fields(
    r: NodeReader,
    spec: CommandSpec,
    path: str,
    schema: Schema,
    *,
    http: dict[str, Node],
    fields: dict[str, Node],
) -> None:
    """Path parameters and `fields` must be top-level fields settable from a string.

    `http` and `fields` hold the nodes of the command's `http` and `fields`
    keys, where a problem is recorded."""
    assert spec.request is not None  # the caller checked
    descriptor = schema.descriptor(spec.request)
    by_name = {f.name: f for f in descriptor.fields}
    by_name.update({f.json_name: f for f in descriptor.fields})

    def check(name: str, node: Node, where: str, what: str) -> None:
        field = by_name.get(name)
        if field is None:
            r.error(
                node,
                where,
                f"{what} {name!r} is not a field of {spec.request}"
                + suggest(name, [f.name for f in descriptor.fields]),
            )
        elif field.message_type is not None and not field.message_type.full_name.startswith(
            "google.protobuf."
        ):
            r.error(node, where, f"{what} {name!r} is a message field; it cannot take a string")

    if spec.http is not None:
        try:
            params = template_params(spec.http.path)
        except ValueError:
            params = ()  # route_problems reports the template
        for name in params:
            check(name, http["path"], join(path, "http.path"), "path parameter")
    for name, node in fields.items():
        check(name, node, join(path, f"fields.{name}"), "field")


def numeric_keys(
    uid: KeyExpr | None, fields: Mapping[str, KeyExpr], request: str | None, schema: Schema | None
) -> tuple[KeyExpr, ...]:
    """The key expressions that fill a number: `uid`, and `fields` of integer type."""
    numeric = [] if uid is None else [uid]
    if fields and request is not None and schema is not None and schema.has_message(request):
        by_name = {f.name: f for f in schema.descriptor(request).fields}
        for name, key in fields.items():
            field = by_name.get(name)
            if field is not None and field.cpp_type in _INTEGER_TYPES and key not in numeric:
                numeric.append(key)
    return tuple(numeric)

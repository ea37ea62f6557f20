"""Compiling the table's .proto files into a private descriptor pool
(docs/configuration.md "proto").

Owns: running protoc (grpcio-tools, in process) over `proto.files`, turning its
errors into located problems, and the `Schema`: one private `DescriptorPool` and
the message classes built from it.
Must not: touch the default descriptor pool (a reload with changed messages must
build a new, independent pool in the same process), import generated modules,
or know about the table or JSON.

protoc runs through `grpc_tools._protoc_compiler.get_protos`, the entry point
behind `grpc_tools.protoc._protos`, rather than `protoc.main([... --descriptor_set_out])`:
`main` prints its errors on the process's stderr, which we could only capture by
redirecting file descriptor 2 for the whole process while a reload runs in a
worker thread. `get_protos` raises structured errors (file, line, column) and
returns the generated Python code of each file and its imports; each carries its
serialized `FileDescriptorProto` as the literal argument of `AddSerializedFile`,
which is all we read from it. The generated code is never executed.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import grpc_tools
from google.protobuf import descriptor_pool, message_factory
from grpc_tools import _protoc_compiler

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
    from google.protobuf.message import Message

# protoc's bundled well-known types (google/protobuf/*.proto), always importable.
WELL_KNOWN_INCLUDE = Path(grpc_tools.__file__).parent / "_proto"

_SERIALIZED_FILE = re.compile(rb"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)", re.DOTALL)


class SchemaError(Exception):
    """The .proto files did not compile; `problems` are "FILE:LINE:COL: message" lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@attrs.frozen(eq=False)
class Schema:
    """The compiled messages of one loaded table, in a pool of its own.

    `files` lists every file in the pool (imports first); `digest` is a hex
    SHA-256 of their descriptors, so a changed message changes it.
    """

    pool: descriptor_pool.DescriptorPool
    files: tuple[str, ...]
    digest: str
    _classes: Mapping[str, type[Message]]
    _descriptors: Mapping[str, Descriptor]
    _fields: Mapping[str, Mapping[str, FieldDescriptor]]

    def message_class(self, full_name: str) -> type[Message]:
        """The class of the message `full_name` (e.g. "demo.im.Profile"). Raises KeyError."""
        return self._classes[full_name]

    def has_message(self, full_name: str) -> bool:
        return full_name in self._classes

    def descriptor(self, full_name: str) -> Descriptor:
        """The descriptor of the message `full_name`. Raises KeyError."""
        return self._descriptors[full_name]

    def fields_by_key(self, full_name: str) -> Mapping[str, FieldDescriptor]:
        """The fields of message `full_name` under both their proto name and their
        JSON name (the two spellings proto3 JSON input accepts). Raises KeyError."""
        return self._fields[full_name]

    def enum_descriptor(self, full_name: str) -> EnumDescriptor:
        """The descriptor of the enum `full_name`. Raises KeyError."""
        try:
            return self.pool.FindEnumTypeByName(full_name)
        except KeyError:
            raise KeyError(full_name) from None

    @property
    def message_names(self) -> tuple[str, ...]:
        """Every message's full name (nested ones included, map entries not), sorted."""
        return tuple(sorted(self._classes))


def compile_schema(import_paths: Sequence[Path], files: Sequence[str]) -> Schema:
    """Compile `files` (paths relative to one of `import_paths`) and their imports.

    The well-known types (google/protobuf/*.proto) are always importable.
    Returns a `Schema` over a new private pool. Raises SchemaError with every
    protoc error, each naming the .proto file, line and column.
    """
    include = [os.fsencode(p) for p in import_paths] + [os.fsencode(WELL_KNOWN_INCLUDE)]
    serialized: dict[bytes, None] = {}  # insertion-ordered set: imports come first
    problems: list[str] = []
    for name in files:
        try:
            generated = _protoc_compiler.get_protos(os.fsencode(name), include)
        except _protoc_compiler.ProtocErrors as exc:
            problems.extend(_describe(error, import_paths) for error in exc.errors())
            continue
        for module, code in generated:
            match = _SERIALIZED_FILE.search(code)
            if match is None:
                problems.append(f"{name}: protoc gave no descriptor for {module.decode()}")
                continue
            serialized.setdefault(ast.literal_eval(match.group(1).decode("ascii")))
    if problems:
        raise SchemaError(problems)
    return _build(tuple(serialized))


def _describe(error: _protoc_compiler.ProtocError, import_paths: Sequence[Path]) -> str:
    name = os.fsdecode(error.filename)
    message = os.fsdecode(error.message)
    if error.line < 0:
        if message == "File not found.":
            roots = ", ".join(str(p) for p in import_paths) or "none"
            return f"{name}: file not found in the import paths ({roots})"
        return f"{name}: {message}"
    # protoc counts lines and columns from 0; editors count from 1.
    return f"{_on_disk(name, import_paths)}:{error.line + 1}:{error.column + 1}: {message}"


def _on_disk(name: str, import_paths: Sequence[Path]) -> str:
    for root in import_paths:
        candidate = root / name
        if candidate.is_file():
            return str(candidate)
    return name


def _build(serialized: tuple[bytes, ...]) -> Schema:
    pool = descriptor_pool.DescriptorPool()
    digest = hashlib.sha256()
    names: list[str] = []
    classes: dict[str, type[Message]] = {}
    descriptors: dict[str, Descriptor] = {}
    fields: dict[str, dict[str, FieldDescriptor]] = {}
    for data in serialized:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
        file = pool.AddSerializedFile(data)
        names.append(file.name)
        pending = list(file.message_types_by_name.values())
        while pending:
            descriptor = pending.pop()
            if descriptor.GetOptions().map_entry:
                continue
            classes[descriptor.full_name] = message_factory.GetMessageClass(descriptor)
            descriptors[descriptor.full_name] = descriptor
            by_key = {f.name: f for f in descriptor.fields}
            by_key.update({f.json_name: f for f in descriptor.fields})
            fields[descriptor.full_name] = by_key
            pending.extend(descriptor.nested_types)
    return Schema(pool, tuple(names), digest.hexdigest(), classes, descriptors, fields)

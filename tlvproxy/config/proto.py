"""Reading the table's `proto` section and compiling the files it names
(docs/configuration.md "proto").

Owns: what `paths` and `files` accept (each path and file inside the table's
confinement, each file found in the import paths; `paths` defaults to the
table's own directory), and compiling the files into the table's `Schema`.
Must not: check what the commands make of the messages (the loader does), or
import trio. Compiling runs protoc, which is why a running gateway loads a
table off the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from tlvproxy.config import nodes
from tlvproxy.config.model import ProtoSpec
from tlvproxy.config.nodes import Invalid, join
from tlvproxy.schema.protos import Schema, SchemaError, compile_schema

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.nodes import Node, NodeReader


def read_proto(
    r: NodeReader, node: Node | None, base: Path
) -> tuple[ProtoSpec, Schema | None, list[str]]:
    """The `proto` section, and its files compiled: the `ProtoSpec`, the
    `Schema` (None when the section or the compile failed), and protoc's
    problems, which have no place in the table."""
    paths: list[Path] = []
    files: list[str] = []
    failed = False
    found = {} if node is None else r.mapping(node, "proto", ("paths", "files"))
    if found is None:
        return ProtoSpec(), None, []
    for key in ("paths", "files"):
        if key in found and not isinstance(found[key], yaml.SequenceNode):
            r.sequence(found[key], join("proto", key))
            failed = True
    if "paths" in found:
        for i, item in enumerate(r.sequence(found["paths"], "proto.paths") or []):
            path = join("proto.paths", i)
            text = r.value(item, path, nodes.text, None)
            if text is None:
                failed = True
                continue
            try:
                directory = r.file(base, text)
            except Invalid as exc:
                r.error(item, path, str(exc))
                failed = True
                continue
            if not directory.is_dir():
                r.error(item, path, f"no such directory: {directory}")
                failed = True
            paths.append(directory)
    if not paths:
        paths.append(base)
    if "files" in found:
        for i, item in enumerate(r.sequence(found["files"], "proto.files") or []):
            path = join("proto.files", i)
            text = r.value(item, path, nodes.text, None)
            if text is None:
                failed = True
                continue
            try:
                for root in paths:
                    r.file(root, text)
            except Invalid as exc:
                r.error(item, path, str(exc))
                failed = True
                continue
            if not any((root / text).is_file() for root in paths):
                roots = ", ".join(str(p) for p in paths)
                r.error(item, path, f"{text} is not in the import paths ({roots})")
                failed = True
            files.append(text)
    spec = ProtoSpec(paths=tuple(paths), files=tuple(files))
    if failed:
        return spec, None, []
    try:
        return spec, compile_schema(paths, files), []
    except SchemaError as exc:
        return spec, None, exc.problems

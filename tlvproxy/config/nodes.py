"""Reading YAML nodes with their locations, collecting every problem (docs/configuration.md).

Owns: `NodeReader`, which walks a composed YAML node tree (PyYAML nodes keep
their marks), converts scalars to typed values, rejects unknown and duplicate
keys, and records each problem as "FILE:LINE:COL: path.to.key: message".
Must not: know what the table means; `loader.py` says which keys exist and what
they become. A reader never stops at the first problem: a bad value is recorded
and the caller carries on with a default, so one pass finds them all.
"""

from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable
    from pathlib import Path

T = TypeVar("T")

Node = yaml.Node


class Invalid(ValueError):
    """A value that cannot be used; the reader records it at the node."""


def join(path: str, key: str | int) -> str:
    """`commands[3].http.path` style paths."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def suggest(name: str, known: Iterable[str]) -> str:
    """The "; did you mean 'x'?" that ends an error naming a misspelt `name`:
    the closest of `known`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def kind(node: Node, value: Any = None) -> str:
    """How a node reads in an error message: "a list", "a mapping", "42", "null"."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


class NodeReader:
    """Typed access to YAML nodes; `problems` collects (position, text) pairs."""

    def __init__(self, source: Path, *, confine: Path | None = None) -> None:
        self.source = source
        # The directory every file the table names must be in (a table from
        # etcd: docs/operations.md "Running a fleet"); None: anywhere.
        self.confine = confine
        self.problems: list[tuple[tuple[int, int], str]] = []
        self._constructor = SafeConstructor()

    def file(self, base: Path, name: str) -> Path:
        """`base / name`, the path of a file or directory the table names.

        Raises Invalid when `confine` is set and the path leads out of it (an
        absolute path, `..`, a symbolic link)."""
        path = base / name
        if self.confine is not None:
            root = os.path.realpath(self.confine)
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                raise Invalid(
                    f"{name!r} is outside the table's directory: a table kept in etcd "
                    "names its files by relative paths under it"
                )
        return path

    def error(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        where = f"{self.source}:{mark.line + 1}:{mark.column + 1}"
        self.problems.append(((mark.line, mark.column), f"{where}: {path or '(table)'}: {message}"))

    def scalar(self, node: Node) -> Any:
        """The typed value of a scalar node. Raises Invalid for a mapping or list."""
        if not isinstance(node, yaml.ScalarNode):
            raise Invalid(f"expected a single value, got {kind(node)}")
        try:
            return self._constructor.construct_object(node)
        except ConstructorError as exc:
            raise Invalid(str(exc.problem)) from None

    def mapping(
        self,
        node: Node,
        path: str,
        keys: Collection[str] | None = None,
        required: Collection[str] = (),
    ) -> dict[str, Node] | None:
        """The mapping's value nodes by key, or None (recorded) if it is not a mapping.

        With `keys`, any other key is recorded as unknown; missing `required`
        keys are recorded at the mapping. Duplicate keys are recorded.
        """
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got {self._show(node)}")
            return None
        self._constructor.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        found: dict[str, Node] = {}
        for key_node, value_node in node.value:
            try:
                key = self.scalar(key_node)
            except Invalid as exc:
                self.error(key_node, path, f"a key must be a string: {exc}")
                continue
            if not isinstance(key, str):
                if keys is not None:
                    self.error(key_node, path, f"a key must be a string, got {kind(key_node, key)}")
                    continue
                key = str(key)
            child = join(path, key)
            if key in found:
                self.error(key_node, child, "duplicate key")
            elif keys is not None and key not in keys:
                self.error(key_node, child, f"unknown key (expected one of: {', '.join(keys)})")
            else:
                found[key] = value_node
        for name in required:
            if name not in found:
                self.error(node, join(path, name), "required key is missing")
        return found

    def document(self, node: Node) -> Any:
        """The whole value of `node`, mappings and lists included, as
        yaml.safe_load builds it. Raises Invalid when it cannot be built."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            raise Invalid(str(exc.problem)) from None

    def pairs(self, node: Node, path: str) -> list[tuple[Node, Node]] | None:
        """A mapping's (key node, value node) pairs, for keys that are not strings."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got {self._show(node)}")
            return None
        self._constructor.flatten_mapping(node)
        return list(node.value)

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        """The items of a list node, or None (recorded) if it is not a list."""
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, f"expected a list, got {self._show(node)}")
            return None
        return list(node.value)

    def value(self, node: Node, path: str, convert: Callable[[Any], T], default: T) -> T:
        """`convert(scalar value)`, or `default` after recording why it failed.

        `convert` raises Invalid or ValueError with a message for the user.
        """
        try:
            return convert(self.scalar(node))
        except ValueError as exc:
            self.error(node, path, str(exc))
            return default

    def get(
        self,
        found: dict[str, Node] | None,
        key: str,
        path: str,
        convert: Callable[[Any], T],
        default: T,
    ) -> T:
        """`value()` of `found[key]`, or `default` when the key is absent."""
        if found is None or key not in found:
            return default
        return self.value(found[key], join(path, key), convert, default)

    def _show(self, node: Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            try:
                return kind(node, self.scalar(node))
            except Invalid:
                return "a value"
        return kind(node)


# ---------------------------------------------------------------- converters


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def optional_text(value: Any) -> str | None:
    return None if value is None else text(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {_show(value)}")
    return value


def integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    """A converter for whole numbers in [low, high]; numeric strings ("0x1001") too."""

    def convert(value: Any) -> int:
        number = value
        if isinstance(value, str):
            try:
                number = int(value.strip(), 0)
            except ValueError:
                raise Invalid(f"expected a whole number, got {_show(value)}") from None
        if not isinstance(number, int) or isinstance(number, bool):
            raise Invalid(f"expected a whole number, got {_show(value)}")
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise Invalid(f"expected a number {bound}, got {_show(value)}")
        return number

    return convert


def choice(*options: str) -> Callable[[Any], Any]:
    """A converter for one of `options`; Any, so a Literal-typed field takes it."""

    def convert(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise Invalid(f"expected one of {', '.join(options)}; got {_show(value)}")
        return value

    return convert


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)

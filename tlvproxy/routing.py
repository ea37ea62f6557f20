"""REST routing: (method, path) -> the command's route and its path parameters.

Owns: parsing `http.path` templates (`/v1/users/{user_id}/profile`), finding
conflicts between routes, and matching a request to a route, telling 404 from
405 (docs/configuration.md "Routes").
Must not: parse HTTP, percent-decode, or read the query string; the server hands
over the decoded path.

Rules:
- A template starts with `/`; each `{name}` is a whole segment and matches one
  non-empty segment. A trailing slash is significant.
- The most specific route wins: at the first segment where two matching templates
  differ, a literal beats a parameter (`GET /v1/users/me` before
  `GET /v1/users/{id}`). Two routes for one method are a conflict when they could
  match the same path and neither is more specific segment by segment: the same
  template up to parameter names (`/v1/a/{x}` and `/v1/a/{y}`), or crossing
  parameters (`/a/{x}/c` and `/a/b/{y}`).
- HEAD matches only routes declared with method HEAD: a GET route runs a command
  upstream, so HEAD on it answers 405 with `Allow` listing GET rather than
  running the command for headers alone.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import attrs

from tlvproxy.errors import MethodNotAllowed, RouteNotFound

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from tlvproxy.config.model import CommandSpec

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%]*")


class RouteError(ValueError):
    """A route the table cannot have; the loader reports it with its location."""


class InvalidTemplate(RouteError):
    """An `http.path` that is not a valid template."""


class RouteConflict(RouteError):
    """Two routes that could match the same request; the message names both."""


@attrs.frozen(slots=True)
class Route:
    """One REST route: `template` is the `http.path`, also the `route` metric label."""

    method: str
    template: str
    command: CommandSpec


@attrs.frozen(slots=True)
class RouteMatch:
    route: Route
    params: Mapping[str, str]


# A parsed template: a literal segment is a str, a parameter is _Param.
@attrs.frozen(slots=True)
class _Param:
    name: str


_Segment = str | _Param


def parse_template(template: str) -> tuple[_Segment, ...]:
    """The segments of an `http.path` template. Raises InvalidTemplate saying why."""
    if not template.startswith("/"):
        raise InvalidTemplate(f"path {template!r} must start with '/'")
    if "?" in template or "#" in template:
        raise InvalidTemplate(f"path {template!r} cannot hold a query or fragment")
    if template == "/":
        return ()
    segments: list[_Segment] = []
    names: set[str] = set()
    parts = template[1:].split("/")
    for index, part in enumerate(parts):
        if not part and index != len(parts) - 1:
            raise InvalidTemplate(f"path {template!r} has an empty segment")
        param = _PARAM.fullmatch(part)
        if param is not None:
            name = param.group(1)
            if name in names:
                raise InvalidTemplate(f"path {template!r} repeats the parameter {{{name}}}")
            names.add(name)
            segments.append(_Param(name))
        elif "{" in part or "}" in part:
            raise InvalidTemplate(
                f"path {template!r}: segment {part!r} must be a literal or a whole "
                "{name} parameter (letters, digits, underscore)"
            )
        elif not _SEGMENT_CHARS.fullmatch(part):
            raise InvalidTemplate(f"path {template!r}: segment {part!r} has invalid characters")
        else:
            segments.append(part)
    return tuple(segments)


def template_params(template: str) -> tuple[str, ...]:
    """The parameter names of a template, in order. Raises InvalidTemplate."""
    return tuple(s.name for s in parse_template(template) if isinstance(s, _Param))


def _at_least_as_specific(a: tuple[_Segment, ...], b: tuple[_Segment, ...]) -> bool:
    """Whether every path `a` matches is matched by `b` (given they overlap)."""
    return all(
        isinstance(y, _Param) or not isinstance(x, _Param) for x, y in zip(a, b, strict=True)
    )


def route_problems(commands: Iterable[CommandSpec]) -> list[tuple[CommandSpec, RouteError]]:
    """Every invalid template (InvalidTemplate) and conflict (RouteConflict) among
    the commands' routes, each paired with the command to blame (the later of two)."""
    problems: list[tuple[CommandSpec, RouteError]] = []
    seen: dict[str, _Seen] = {}  # method -> the routes checked so far
    for index, command in enumerate(commands):
        if command.http is None:
            continue
        try:
            segments = parse_template(command.http.path)
        except InvalidTemplate as exc:
            problems.append((command, exc))
            continue
        route = Route(command.http.method, command.http.path, command)
        earlier = seen.setdefault(route.method, _Seen())
        for _, other, other_segments in sorted(earlier.overlapping(segments), key=_first):
            forward = _at_least_as_specific(segments, other_segments)
            backward = _at_least_as_specific(other_segments, segments)
            if forward and backward:
                problems.append(
                    (command, RouteConflict(f"{_show(route)} duplicates {_show(other)}"))
                )
            elif not forward and not backward:
                message = (
                    f"{_show(route)} and {_show(other)} are ambiguous: both match "
                    "some paths and neither is more specific"
                )
                problems.append((command, RouteConflict(message)))
        earlier.add(index, route, segments)
    return problems


_Entry = tuple[int, Route, tuple[_Segment, ...]]


def _first(entry: _Entry) -> int:
    return entry[0]


class _Seen:
    """Routes of one method as a trie, so that finding the ones a new template
    overlaps (same length, equal literals wherever both have one) only visits the
    branches its literals allow, instead of comparing every pair."""

    __slots__ = ("entries", "literal", "param")

    def __init__(self) -> None:
        self.literal: dict[str, _Seen] = {}
        self.param: _Seen | None = None
        self.entries: list[_Entry] = []

    def add(self, index: int, route: Route, segments: tuple[_Segment, ...]) -> None:
        node = self
        for segment in segments:
            if isinstance(segment, _Param):
                if node.param is None:
                    node.param = _Seen()
                node = node.param
            else:
                node = node.literal.setdefault(segment, _Seen())
        node.entries.append((index, route, segments))

    def overlapping(self, segments: tuple[_Segment, ...]) -> Iterator[_Entry]:
        stack: list[tuple[_Seen, int]] = [(self, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(segments):
                yield from node.entries
                continue
            segment = segments[depth]
            if isinstance(segment, _Param):
                stack.extend((child, depth + 1) for child in node.literal.values())
            elif (child := node.literal.get(segment)) is not None:
                stack.append((child, depth + 1))
            if node.param is not None:
                stack.append((node.param, depth + 1))


def _show(route: Route) -> str:
    return f"{route.method} {route.template} ({route.command.name})"


class _Node:
    """A trie node: literal children first, then the parameter child."""

    __slots__ = ("literal", "param", "routes")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.routes: dict[str, tuple[Route, tuple[str, ...]]] = {}  # method -> route, names


class Router:
    """Matches requests to routes. Built once per table; immutable after `build`."""

    __slots__ = ("_root", "_static", "routes")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self._static: dict[str, dict[str, Route]] = {}
        self._root = _Node()
        for route in routes:
            segments = parse_template(route.template)
            if all(isinstance(s, str) for s in segments):
                self._static.setdefault(route.template, {})[route.method] = route
            self._insert(route, segments)

    @classmethod
    def build(cls, commands: Iterable[CommandSpec]) -> Router:
        """A router over every command with `http`. Raises InvalidTemplate or
        RouteConflict for the first problem `route_problems` finds."""
        commands = tuple(commands)
        problems = route_problems(commands)
        if problems:
            raise problems[0][1]
        return cls(
            tuple(Route(c.http.method, c.http.path, c) for c in commands if c.http is not None)
        )

    def _insert(self, route: Route, segments: tuple[_Segment, ...]) -> None:
        node = self._root
        names: list[str] = []
        for segment in segments:
            if isinstance(segment, _Param):
                if node.param is None:
                    node.param = _Node()
                names.append(segment.name)
                node = node.param
            else:
                node = node.literal.setdefault(segment, _Node())
        node.routes[route.method] = (route, tuple(names))

    def match(self, method: str, path: str) -> RouteMatch:
        """The route for `method` and the percent-decoded `path` (no query).

        Raises RouteNotFound when no route has this path, MethodNotAllowed (with
        the sorted methods that have it) when only other methods do.
        """
        static = self._static.get(path)
        if static is not None:
            route = static.get(method)
            if route is not None:
                return RouteMatch(route, {})
        if not path.startswith("/"):
            raise RouteNotFound(f"no route for {path!r}")
        parts = path[1:].split("/") if path != "/" else []
        values: list[str] = []
        found = _find(self._root, parts, 0, method, values)
        if found is not None:
            route, names = found
            return RouteMatch(route, dict(zip(names, values, strict=True)))
        # No route for this method: 405 if the path has routes for others
        # (docs/configuration.md "Routes").
        allowed: set[str] = set()
        for node in _walk(self._root, parts, 0):
            allowed.update(node.routes)
        if allowed:
            methods = tuple(sorted(allowed))
            raise MethodNotAllowed(
                f"{method} is not allowed on {path}; use {', '.join(methods)}", allow=methods
            )
        raise RouteNotFound(f"no route for {path}")


def _find(
    node: _Node, parts: list[str], index: int, method: str, values: list[str]
) -> tuple[Route, tuple[str, ...]] | None:
    """The most specific route for `method` matching `parts`; fills `values` with
    its parameter values. Literal children are tried before the parameter child."""
    if index == len(parts):
        return node.routes.get(method)
    part = parts[index]
    child = node.literal.get(part)
    if child is not None:
        found = _find(child, parts, index + 1, method, values)
        if found is not None:
            return found
    if node.param is not None and part:
        values.append(part)
        found = _find(node.param, parts, index + 1, method, values)
        if found is not None:
            return found
        values.pop()
    return None


def _walk(node: _Node, parts: list[str], index: int) -> Iterator[_Node]:
    """Every node with routes whose template matches `parts`."""
    if index == len(parts):
        if node.routes:
            yield node
        return
    part = parts[index]
    child = node.literal.get(part)
    if child is not None:
        yield from _walk(child, parts, index + 1)
    if node.param is not None and part:
        yield from _walk(node.param, parts, index + 1)

"""Reading the table's `commands` (docs/configuration.md "commands").

Owns: what each key of a command accepts (its name, word, codec, messages,
`push`, `http` route, `uid`, `fields`, `timeout`, `idempotent`, `json`, `auth`
and `claims`), and the cross-references among commands and with the
sections read before them: the upstream each names, the messages in the
compiled schema, its authenticator, unique names, words unique per upstream,
routes that do not clash, and, once every command is read, their `split`,
`mirror` and `fallback` (read by `traffic.py`). `check` warns of a uid or a
field the caller writes on a command with an authenticator.
Must not: build codecs or the router (the loader compiles the table), or
stop at the first problem: every problem is recorded on the `NodeReader`
with its place, and a command with a bad name, word or codec is left out of
the table once its other keys are checked.

Decisions made here:
- A protobuf command needs both `request` and `response`. A push command has
  `push` and neither `upstream`, `http`, `request`, `response`, `uid`, `fields`,
  `timeout` nor `idempotent`; for a json or raw push, `push: true` (stored as
  `push == ""`, a push with no message type).
- A command's `json:` mapping overrides the table's `json` key by key; the
  command's `json` holds the merged options (None when it gives none).
- `http.path` parameters and `fields` names must be top-level fields of the
  request message (protobuf commands); `fields` is refused for json/raw commands,
  whose bodies pass through unchanged.
- A command word is unique per upstream, not per table: a `to` command may
  reuse its command's word on another upstream. A push command has no
  upstream and may arrive on any, so its word is used by no other command.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any, Final

import attrs

from tlvproxy.config import auth, messages, nodes, sections, traffic
from tlvproxy.config.model import CommandSpec, HttpRouteSpec
from tlvproxy.config.nodes import Invalid, Node, join, suggest
from tlvproxy.config.push_sessions import CREATE_COMMAND
from tlvproxy.routing import InvalidTemplate, parse_template, route_problems, template_params

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import AuthSpec, ClaimValue, Codec, JsonOptions, UpstreamSpec
    from tlvproxy.config.nodes import NodeReader
    from tlvproxy.framing import HeaderLayout
    from tlvproxy.schema.protos import Schema

    Warn = Callable[[Node, str, str], None]

_COMMAND_KEYS: Final = (
    "name",
    "command",
    "upstream",
    "codec",
    "request",
    "response",
    "push",
    "http",
    "uid",
    "fields",
    "timeout",
    "idempotent",
    "json",
    "auth",
    "claims",
    *traffic.KEYS,
)
_PUSH_FORBIDS: Final = (
    "upstream",
    "http",
    "request",
    "response",
    "uid",
    "fields",
    "timeout",
    "idempotent",
    "auth",
    "claims",
    *traffic.KEYS,
)
_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def read_commands(
    r: NodeReader,
    node: Node | None,
    *,
    framing: HeaderLayout,
    json_options: JsonOptions,
    upstreams: Mapping[str, UpstreamSpec],
    schema: Schema | None,
    authenticators: dict[str, AuthSpec],
    default_auth: str | None,
    warn: Warn,
) -> tuple[CommandSpec, ...]:
    """The table's commands, with their traffic rules; the commands with a bad
    name, word or codec are left out (their problems are recorded)."""
    reader = _CommandReader(r, authenticators, default_auth, warn)
    return reader.read(node, framing, json_options, upstreams, schema)


# ---------------------------------------------------------------- the reader


@attrs.define
class _CommandNodes:
    """Where a command's parts sit in the file, for cross-reference errors."""

    index: int
    keys: dict[str, Node]
    http: dict[str, Node]
    fields: dict[str, Node]


class _CommandReader:
    """One pass over the `commands` of one table (`read`)."""

    def __init__(
        self,
        r: NodeReader,
        authenticators: dict[str, AuthSpec],
        default_auth: str | None,
        warn: Warn,
    ) -> None:
        self.r = r
        self.authenticators = authenticators
        self.default_auth = default_auth
        self.warn = warn
        self.command_nodes: dict[int, _CommandNodes] = {}  # id(CommandSpec) -> nodes

    def error(self, node: Node, path: str, message: str) -> None:
        self.r.error(node, path, message)

    def read(
        self,
        node: Node | None,
        framing: HeaderLayout,
        json_options: JsonOptions,
        upstreams: Mapping[str, UpstreamSpec],
        schema: Schema | None,
    ) -> tuple[CommandSpec, ...]:
        if node is None:
            return ()
        items = self.r.sequence(node, "commands")
        result: list[CommandSpec] = []
        names: dict[str, int] = {}
        words: dict[int, list[CommandSpec]] = {}  # the commands read so far, by word
        for i, item in enumerate(items or []):
            spec = self._command(i, item, framing, json_options, upstreams, schema)
            if spec is None:
                continue
            keys = self.command_nodes[id(spec)].keys
            if spec.name in names:
                first = names[spec.name]
                self.error(
                    keys["name"],
                    join(join("commands", i), "name"),
                    f"duplicate command name {spec.name!r} (first at commands[{first}])",
                )
            else:
                names[spec.name] = i
            self._check_word(spec, words.setdefault(spec.command, []))
            result.append(spec)
        commands = tuple(result)
        for spec, problem in route_problems(commands):
            if isinstance(problem, InvalidTemplate):
                continue  # _http reported it, even for commands left out of the table
            where = self.command_nodes[id(spec)]
            self.error(
                where.http.get("path", where.keys["http"]),
                join(join("commands", where.index), "http.path"),
                str(problem),
            )
        return self._traffic(commands, schema, json_options, framing)

    def _check_word(self, spec: CommandSpec, same_word: list[CommandSpec]) -> None:
        """A command word is unique per upstream; a push's word is no other
        command's (docs/configuration.md "commands"). `same_word` holds the
        commands read before `spec` with its word; `spec` joins them."""
        clash = None
        why = ""
        for earlier in same_word:
            if spec.push is not None or earlier.push is not None:
                clash = earlier
                why = (
                    "a push command's word is used by no other command, since a push "
                    "may arrive from any upstream"
                )
                break
            if spec.upstream is not None and earlier.upstream == spec.upstream:
                clash = earlier
                why = (
                    f"a command word is unique per upstream (the answers of {spec.upstream!r} "
                    "are told apart by it); another upstream may reuse it"
                )
                break
        same_word.append(spec)
        if clash is None:
            return
        first = self.command_nodes[id(clash)].index
        where = self.command_nodes[id(spec)]
        on = f" on upstream {spec.upstream!r}" if clash.push is None and spec.push is None else ""
        self.error(
            where.keys["command"],
            join(join("commands", where.index), "command"),
            f"duplicate command word 0x{spec.command:04x}{on} (first at commands[{first}], "
            f"{clash.name!r}): {why}",
        )

    def _traffic(
        self,
        commands: tuple[CommandSpec, ...],
        schema: Schema | None,
        json_options: JsonOptions,
        framing: HeaderLayout,
    ) -> tuple[CommandSpec, ...]:
        """The commands with their `split`, `mirror` and `fallback` read
        (docs/configuration.md "split, mirror, fallback"): those refer to
        other commands, so they are read once every command is."""
        reader = traffic.TrafficReader(
            self.r, {c.name: c for c in commands}, schema, json_options, framing.max_body
        )
        result = []
        for spec in commands:
            where = self.command_nodes[id(spec)]
            rules = None
            if spec.push is None:
                filled = list(spec.fields)
                if spec.http is not None:
                    with contextlib.suppress(ValueError):  # _http reported a bad template
                        filled[:0] = template_params(spec.http.path)
                path = join("commands", where.index)
                rules = reader.read(spec, where.keys, path, filled)
            result.append(spec if rules is None else attrs.evolve(spec, traffic=rules))
        return tuple(result)

    def _command(
        self,
        index: int,
        node: Node,
        framing: HeaderLayout,
        json_options: JsonOptions,
        upstreams: Mapping[str, UpstreamSpec],
        schema: Schema | None,
    ) -> CommandSpec | None:
        r = self.r
        path = join("commands", index)
        found = r.mapping(node, path, _COMMAND_KEYS, ("name", "command"))
        if found is None:
            return None
        # A bad name, number or codec still lets every other key be checked; the
        # command is only left out of the table (and of the duplicate checks).
        name = r.get(found, "name", path, _command_name, None)
        number = r.get(found, "command", path, nodes.integer(0, framing.field_max("command")), None)
        codec: Codec | None = "protobuf"
        if "codec" in found:
            choices = nodes.choice("protobuf", "json", "raw")
            codec = r.value(found["codec"], join(path, "codec"), choices, None)
        is_push = "push" in found
        push: str | None = None
        if is_push:
            push = self._push(found["push"], join(path, "push"), codec, schema)
            for key in _PUSH_FORBIDS:
                if key in found:
                    self.error(found[key], join(path, key), "a push command cannot have " + key)
        request = response = None
        if codec == "protobuf" and not is_push:
            for key in ("request", "response"):
                if key not in found:
                    self.error(node, join(path, key), "required for a protobuf command")
            request = messages.read_message(
                self.r, found.get("request"), join(path, "request"), schema
            )
            response = messages.read_message(
                self.r, found.get("response"), join(path, "response"), schema
            )
        elif codec is not None and not is_push:
            for key in ("request", "response"):
                if key in found:
                    self.error(found[key], join(path, key), "only a protobuf command has " + key)
        upstream = None
        if not is_push:
            if "upstream" not in found:
                self.error(node, join(path, "upstream"), "required (a push command has push)")
            upstream = r.get(found, "upstream", path, nodes.text, None)
            if upstream is not None and upstream not in upstreams:
                known = ", ".join(upstreams) or "none"
                self.error(
                    found["upstream"],
                    join(path, "upstream"),
                    f"undefined upstream {upstream!r} (defined: {known})"
                    + suggest(upstream, upstreams),
                )
        http_keys: dict[str, Node] = {}
        http = self._http(found.get("http"), join(path, "http"), http_keys)
        fields_keys: dict[str, Node] = {}
        fields = self._fields(
            found.get("fields"), join(path, "fields"), codec or "protobuf", fields_keys
        )
        uid = r.get(found, "uid", path, sections.key_expr, None)
        timeout = r.get(found, "timeout", path, sections.positive_duration, None)
        idempotent = r.get(found, "idempotent", path, nodes.boolean, False)
        command_json = None
        if "json" in found:
            command_json = sections.read_json(
                self.r, found["json"], join(path, "json"), json_options
            )
        command_auth = None if is_push else self.default_auth
        if "auth" in found:
            _, command_auth = auth.reference(
                r, found["auth"], join(path, "auth"), self.authenticators
            )
        claims: dict[str, tuple[ClaimValue, ...]] = {}
        if "claims" in found:
            claims = auth.read_claims(r, found["claims"], join(path, "claims"))
            if command_auth is None and not is_push:
                self.error(
                    found["claims"],
                    join(path, "claims"),
                    "claims need an authenticator (`auth`, or `default_auth`)",
                )
        if command_auth is not None:
            self._warn_caller_word(found, path, uid, fields)
        if name is None or number is None or codec is None:
            return None
        spec = CommandSpec(
            name=name,
            command=number,
            upstream=upstream,
            codec=codec,
            request=request,
            response=response,
            push=push,
            http=http,
            uid=uid,
            fields=fields,
            timeout=timeout,
            idempotent=idempotent,
            json=command_json,
            auth=command_auth,
            claims=claims,
            numeric_keys=messages.numeric_keys(uid, fields, request, schema),
        )
        where = _CommandNodes(index, found, http_keys, fields_keys)
        self.command_nodes[id(spec)] = where
        if schema is not None and request is not None and schema.has_message(request):
            messages.check_request_fields(
                self.r, spec, path, schema, http=where.http, fields=where.fields
            )
        return spec

    def _warn_caller_word(
        self, found: dict[str, Node], path: str, uid: KeyExpr | None, fields: dict[str, KeyExpr]
    ) -> None:
        """`check` warns when a command with an authenticator takes the uid or a
        field from a header: the caller's word, not its verified identity."""
        if uid is not None and uid.source == "header":
            self.warn(
                found["uid"],
                join(path, "uid"),
                f"the uid comes from {uid}, which the caller writes; use auth.sub "
                "(or auth.claim.NAME) to take it from the verified identity",
            )
        for field, key in fields.items():
            if key.source == "header":
                self.warn(
                    found["fields"],
                    join(path, f"fields.{field}"),
                    f"{field} comes from {key}, which the caller writes, although the "
                    "command has an authenticator",
                )

    def _push(self, node: Node, path: str, codec: str | None, schema: Schema | None) -> str | None:
        if codec is None:
            return ""
        if codec != "protobuf":
            try:
                value = self.r.scalar(node)
            except Invalid:
                value = None
            if value is not True:
                self.error(node, path, f"a {codec} push command is written `push: true`")
            return ""
        return messages.read_message(self.r, node, path, schema)

    def _http(self, node: Node | None, path: str, keys: dict[str, Node]) -> HttpRouteSpec | None:
        if node is None:
            return None
        found = self.r.mapping(node, path, ("method", "path"), ("method", "path"))
        if found is None or "method" not in found or "path" not in found:
            return None
        keys.update(found)
        method = self.r.get(found, "method", path, _method, None)
        template = self.r.get(found, "path", path, _template, None)
        if method is None or template is None:
            return None
        return HttpRouteSpec(method=method, path=template)

    def _fields(
        self, node: Node | None, path: str, codec: str, keys: dict[str, Node]
    ) -> dict[str, KeyExpr]:
        if node is None:
            return {}
        if codec != "protobuf":
            self.error(node, path, f"a {codec} command passes its body through; it has no fields")
            return {}
        result: dict[str, KeyExpr] = {}
        for name, value in (self.r.mapping(node, path) or {}).items():
            key = self.r.value(value, join(path, name), sections.key_expr, None)
            if key is not None:
                result[name] = key
                keys[name] = value
        return result


# ---------------------------------------------------------------- small converters


def _command_name(value: Any) -> str:
    name = nodes.text(value)
    if not _NAME.fullmatch(name):
        raise Invalid(
            f"a command name starts with a letter or _ and then uses letters, digits, "
            f"_ . or -; got {name!r}"
        )
    if name == CREATE_COMMAND:
        raise Invalid(
            f"{CREATE_COMMAND} is what rate_limits call the creation of push sessions; "
            "name the command otherwise"
        )
    return name


def _method(value: Any) -> str:
    method = nodes.text(value).upper()
    if method not in _METHODS:
        raise Invalid(f"expected an HTTP method ({', '.join(_METHODS)}), got {value!r}")
    return method


def _template(value: Any) -> str:
    template = nodes.text(value)
    parse_template(template)  # raises InvalidTemplate (a ValueError) saying why
    return template

"""commands.yaml -> one immutable `Table`, or every problem with its location
(docs/configuration.md).

Owns: the top-level keys, `commands`, the cross-references between sections
(upstreams, messages, commands, routes), building each command's codec and
the router, and the table's `version`. The self-contained sections are read
by `sections.py`, over `nodes.py`; `proto` (and compiling its files) by
`proto.py`; a command's `split`, `mirror` and `fallback` by `traffic.py`;
`websocket` by `websocket.py`; `sessions` by `push_sessions.py`;
`rate_limits` and `redis` by `rate_limits.py`; `readiness` by
`readiness.py`. The route listing `tlvproxy check` prints is `listing.py`'s.
Must not: open sockets, read a clock or import trio. It reads the table and the
.proto files, and is slow enough (protoc) that a running gateway calls it through
`trio.to_thread.run_sync`.

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
- `heartbeat.command` is a bare number; it need not be a command of the table.
- A command word is unique per upstream, not per table: a `to` command may
  reuse its command's word on another upstream. A push command has no
  upstream and may arrive on any, so its word is used by no other command.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import TYPE_CHECKING, Any, Final

import attrs
import yaml
from google.protobuf.descriptor import FieldDescriptor

from tlvproxy.config import auth, nodes, rate_limits, sections, traffic
from tlvproxy.config import upstreams as upstream_sections
from tlvproxy.config.certificates import read_tls
from tlvproxy.config.compiled import CompiledTable
from tlvproxy.config.model import (
    CommandSpec,
    HttpRouteSpec,
    JsonOptions,
    JwtAuthSpec,
    ProtoSpec,
    UpstreamSpec,
)
from tlvproxy.config.nodes import Invalid, Node, NodeReader, join, suggest
from tlvproxy.config.proto import read_proto
from tlvproxy.config.push_sessions import CREATE_COMMAND, read_sessions
from tlvproxy.config.readiness import read_readiness
from tlvproxy.config.websocket import read_websocket
from tlvproxy.routing import InvalidTemplate, Router, parse_template, route_problems
from tlvproxy.schema.codec import (
    RENDER_FACTOR,
    CommandCodec,
    JsonCodec,
    ProtobufCodec,
    RawCodec,
)
from tlvproxy.units import parse_duration

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import (
        AuthSpec,
        ClaimValue,
        Codec,
        EtcdSpec,
        ListenSpec,
        TlsSpec,
    )
    from tlvproxy.framing import HeaderLayout
    from tlvproxy.schema.protos import Schema

_TOP_KEYS: Final = (
    "listen",
    "tls",
    "admin_token",
    "workers",
    "http_parser",
    "trusted_proxies",
    "shutdown_timeout",
    "readiness",
    "cors",
    "proto",
    "framing",
    "upstreams",
    "commands",
    "json",
    "status_map",
    "envelope",
    "websocket",
    "sessions",
    "limits",
    "rate_limits",
    "redis",
    "waf",
    "auth",
    "default_auth",
    "demo",
    "etcd",
)
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
_INTEGER_TYPES: Final = frozenset(
    (
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    )
)
_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# libyaml's parser keeps node marks too and composes a large table ~10x faster.
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class TableError(Exception):
    """The table did not load; `problems` are "FILE:LINE:COL: path.to.key: message"."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_table(path: Path, *, confine: Path | None = None) -> CompiledTable:
    """Read, validate and compile the table at `path` (and its .proto files).

    With `confine`, every file the table names must be inside that directory
    (a table from etcd, docs/operations.md "Running a fleet").
    Returns the `CompiledTable` with its schema, codecs, router and version. Raises
    TableError listing every problem found.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TableError([f"{path}: cannot read the table: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TableError([f"{path}: the table is not UTF-8 text ({exc.reason})"]) from None
    return parse_table(text, path, confine=confine)


def parse_table(text: str, source: Path, *, confine: Path | None = None) -> CompiledTable:
    """Like `load_table`, from the table's text; relative paths start at `source.parent`."""
    return _TableLoader(text, source, confine).load()


# ---------------------------------------------------------------- value converters


def _message_name(value: Any) -> str:
    name = nodes.text(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
        raise Invalid(f"expected a full message name like demo.im.Profile, got {name!r}")
    return name


# ---------------------------------------------------------------- the loader


@attrs.define
class _CommandNodes:
    """Where a command's parts sit in the file, for cross-reference errors."""

    index: int
    keys: dict[str, Node]
    http: dict[str, Node]
    fields: dict[str, Node]


class _TableLoader:
    """One pass over one table text. `load()` returns the CompiledTable or raises TableError."""

    def __init__(self, text: str, source: Path, confine: Path | None = None) -> None:
        self.text = text
        self.source = source
        self.base = source.parent
        self.r = NodeReader(source, confine=confine)
        self.schema_problems: list[str] = []
        self.proto_spec = ProtoSpec()
        self.command_nodes: dict[int, _CommandNodes] = {}  # id(CommandSpec) -> nodes
        self.authenticators: dict[str, AuthSpec] = {}
        self.default_auth: str | None = None
        self.warnings: list[str] = []

    def error(self, node: Node, path: str, message: str) -> None:
        self.r.error(node, path, message)

    def warn(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.warnings.append(f"{self.source}:{mark.line + 1}:{mark.column + 1}: {path}: {message}")

    def load(self) -> CompiledTable:
        try:
            root = yaml.compose(self.text, Loader=_YAML_LOADER)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{self.source}:{mark.line + 1}:{mark.column + 1}" if mark else str(self.source)
            raise TableError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
        except yaml.YAMLError as exc:
            raise TableError([f"{self.source}: invalid YAML: {exc}"]) from None
        if root is None:
            raise TableError([f"{self.source}: the table is empty"])
        top = self.r.mapping(root, "", _TOP_KEYS)
        if top is None:
            raise TableError(self._problems())
        table = self._table(top)
        problems = self._problems()
        if problems or table is None:
            raise TableError(problems)
        return table

    def _problems(self) -> list[str]:
        ordered = [text for _, text in sorted(self.r.problems, key=lambda p: p[0])]
        return ordered + self.schema_problems

    # ------------------------------------------------------------ top level

    def _table(self, top: dict[str, Node]) -> CompiledTable | None:
        """The compiled table; None when a problem was found (in self.r.problems
        or self.schema_problems)."""
        r = self.r
        framing = sections.read_framing(self.r, top.get("framing"))
        json_options = sections.read_json(self.r, top.get("json"), "json", JsonOptions())
        upstreams = upstream_sections.read_upstreams(self.r, top.get("upstreams"), framing)
        self.proto_spec, schema, self.schema_problems = read_proto(
            self.r, top.get("proto"), self.base
        )
        self.authenticators = auth.read_auth(self.r, top.get("auth"), self.base)
        if "default_auth" in top:
            _, self.default_auth = auth.reference(
                self.r, top["default_auth"], "default_auth", self.authenticators
            )
        commands = self._commands(top.get("commands"), framing, json_options, upstreams, schema)
        websocket = read_websocket(
            self.r,
            top.get("websocket"),
            upstreams=upstreams,
            commands=commands,
            authenticators=self.authenticators,
            warn=self.warn,
        )
        sessions = read_sessions(
            self.r,
            top.get("sessions"),
            upstreams=upstreams,
            commands=commands,
            websocket=websocket,
            authenticators=self.authenticators,
            warn=self.warn,
        )
        listen = sections.read_listen(self.r, top.get("listen"))
        tls, certificates = read_tls(self.r, top.get("tls"), self.base, self.warn)
        self._check_https(top, listen, tls)
        redis = rate_limits.read_redis(self.r, top.get("redis"))
        table_kwargs: dict[str, Any] = {
            "source": self.source,
            "listen": listen,
            "tls": tls,
            "admin_token": r.get(top, "admin_token", "", nodes.optional_text, None),
            "workers": r.get(top, "workers", "", nodes.integer(1, 1024), 1),
            "http_parser": r.get(
                top, "http_parser", "", nodes.choice("auto", "h11", "httptools"), "auto"
            ),
            "trusted_proxies": sections.read_networks(self.r, top.get("trusted_proxies")),
            "shutdown_timeout": r.get(top, "shutdown_timeout", "", parse_duration, 30.0),
            "readiness": read_readiness(self.r, top.get("readiness"), upstreams),
            "cors": auth.read_cors(self.r, top.get("cors")),
            "proto": self.proto_spec,
            "framing": framing,
            "upstreams": upstreams,
            "commands": commands,
            "json": json_options,
            "status_map": sections.read_status_map(self.r, top.get("status_map"), framing),
            "envelope": r.get(top, "envelope", "", nodes.boolean, False),
            "websocket": websocket,
            "sessions": sessions,
            "limits": sections.read_limits(self.r, top.get("limits")),
            "rate_limits": rate_limits.read_rate_limits(
                self.r, top.get("rate_limits"), commands, redis, sessions=sessions is not None
            ),
            "redis": redis,
            "waf": sections.read_waf(self.r, top.get("waf")),
            "auth": self.authenticators,
            "default_auth": self.default_auth,
            "warnings": tuple(self.warnings),
            "demo": r.get(top, "demo", "", nodes.boolean, False),
            "etcd": self._etcd(top, upstreams),
        }
        if schema is None or self.r.problems or self.schema_problems:
            return None
        digest = hashlib.sha256(self.text.encode("utf-8"))
        digest.update(schema.digest.encode("ascii"))
        for spec in self.authenticators.values():
            if isinstance(spec, JwtAuthSpec) and spec.key_set is not None:
                digest.update(spec.key_set.encode("utf-8"))  # a new key file: a new version
        if certificates is not None:
            for certificate in certificates.certificates:
                digest.update(certificate.digest.encode("ascii"))  # so is a new certificate
        table_kwargs["version"] = digest.hexdigest()[:16]
        return CompiledTable(
            **table_kwargs,
            schema=schema,
            codecs=_codecs(commands, json_options, schema, framing.max_body),
            router=Router.build(commands),
            certificates=certificates,
        )

    def _etcd(self, top: dict[str, Node], upstreams: Mapping[str, UpstreamSpec]) -> EtcdSpec | None:
        spec = upstream_sections.read_etcd(self.r, top.get("etcd"))
        if spec is None and "etcd" not in top:
            for name, upstream in upstreams.items():
                if upstream.discovery is not None:
                    self.warn(
                        top["upstreams"],
                        f"upstreams.{name}.discovery",
                        "the table has no etcd section: the nodes are read from the etcd "
                        "of `serve --etcd`, and a gateway serving a file finds none",
                    )
        return spec

    def _check_https(self, top: dict[str, Node], listen: ListenSpec, tls: TlsSpec | None) -> None:
        given = "tls" in top and not top["tls"].tag.endswith(":null")
        if listen.https is not None and tls is None and not given:
            self.error(top["listen"], "listen.https", "serving https needs the tls section")
        elif tls is not None and listen.https is None:
            self.warn(
                top["tls"], "tls", "listen.https is not set: these certificates serve nothing"
            )

    # ------------------------------------------------------------ commands

    def _commands(
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
                        filled[:0] = _template_params(spec.http.path)
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
            request = self._message(found.get("request"), join(path, "request"), schema)
            response = self._message(found.get("response"), join(path, "response"), schema)
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
            numeric_keys=_numeric_keys(uid, fields, request, schema),
        )
        where = _CommandNodes(index, found, http_keys, fields_keys)
        self.command_nodes[id(spec)] = where
        if schema is not None and request is not None and schema.has_message(request):
            self._check_request_fields(spec, where, path, schema)
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
        return self._message(node, path, schema)

    def _message(self, node: Node | None, path: str, schema: Schema | None) -> str | None:
        if node is None:
            return None
        name = self.r.value(node, path, _message_name, None)
        if name is None or schema is None:
            return name
        if not schema.has_message(name):
            self.error(
                node,
                path,
                f"undefined message {name!r} (not in proto.files)"
                + suggest(name, schema.message_names),
            )
        return name

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

    def _check_request_fields(
        self, spec: CommandSpec, where: _CommandNodes, path: str, schema: Schema
    ) -> None:
        """Path parameters and `fields` must be top-level fields settable from a string."""
        assert spec.request is not None  # the caller checked
        descriptor = schema.descriptor(spec.request)
        by_name = {f.name: f for f in descriptor.fields}
        by_name.update({f.json_name: f for f in descriptor.fields})

        def check(name: str, node: Node, where: str, what: str) -> None:
            field = by_name.get(name)
            if field is None:
                self.error(
                    node,
                    where,
                    f"{what} {name!r} is not a field of {spec.request}"
                    + suggest(name, [f.name for f in descriptor.fields]),
                )
            elif field.message_type is not None and not field.message_type.full_name.startswith(
                "google.protobuf."
            ):
                self.error(
                    node, where, f"{what} {name!r} is a message field; it cannot take a string"
                )

        if spec.http is not None:
            try:
                params = _template_params(spec.http.path)
            except ValueError:
                params = []  # route_problems reports the template
            for name in params:
                check(name, where.http["path"], join(path, "http.path"), "path parameter")
        for name, node in where.fields.items():
            check(name, node, join(path, f"fields.{name}"), "field")


# ---------------------------------------------------------------- small converters


def _numeric_keys(
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


def _template_params(template: str) -> list[str]:
    """Parameter names of a template. Raises ValueError (InvalidTemplate)."""
    return [s.name for s in parse_template(template) if not isinstance(s, str)]


def _codecs(
    commands: tuple[CommandSpec, ...], options: JsonOptions, schema: Schema, max_body: int
) -> dict[str, CommandCodec]:
    json_codec = JsonCodec()
    raw_codec = RawCodec()
    codecs: dict[str, CommandCodec] = {}
    for command in commands:
        if command.codec == "json":
            codecs[command.name] = json_codec
        elif command.codec == "raw":
            codecs[command.name] = raw_codec
        else:
            response = command.push if command.push else command.response
            assert response is not None  # the loader required it
            codecs[command.name] = ProtobufCodec(
                command.name,
                schema.message_class(command.request) if command.request else None,
                schema.message_class(response),
                command.json or options,
                schema,
                # What one answer may expand to (docs/reference.md "Answers too
                # large to render").
                max_rendered=RENDER_FACTOR * max_body,
            )
    return codecs

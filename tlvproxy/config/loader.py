"""commands.yaml -> one immutable `Table`, or every problem with its location
(docs/configuration.md).

Owns: the assembly of the table: the top-level keys and the few plain values
among them (`admin_token`, `workers`, `http_parser`, `shutdown_timeout`,
`envelope`, `demo`), the order the sections are read in (each may refer to
those read before it), the checks between sections that no section reader
makes (`listen.https` needs `tls`; a `discovery` upstream without `etcd`),
building each command's codec and the router, the table's `version`, and
the order of the problems reported. Each section is read by a module of its
own, over `nodes.py`: `sections.py` (the self-contained ones), `proto.py`
(and compiling its files), `upstreams.py` (and `etcd`), `auth.py` (and
`default_auth`, `cors`), `commands.py` (over `messages.py`; a command's
`split`, `mirror` and `fallback` by `traffic.py`), `websocket.py`,
`push_sessions.py` (`sessions`), `certificates.py` (`tls`),
`rate_limits.py` (and `redis`) and `readiness.py`. The route listing
`tlvproxy check` prints is `listing.py`'s.
Must not: open sockets, read a clock or import trio. It reads the table and the
.proto files, and is slow enough (protoc) that a running gateway calls it through
`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Final

import yaml

from tlvproxy.config import auth, nodes, rate_limits, sections
from tlvproxy.config import upstreams as upstream_sections
from tlvproxy.config.certificates import read_tls
from tlvproxy.config.commands import read_commands
from tlvproxy.config.compiled import CompiledTable
from tlvproxy.config.model import (
    CommandSpec,
    JsonOptions,
    JwtAuthSpec,
    ProtoSpec,
    UpstreamSpec,
)
from tlvproxy.config.nodes import Node, NodeReader
from tlvproxy.config.proto import read_proto
from tlvproxy.config.push_sessions import read_sessions
from tlvproxy.config.readiness import read_readiness
from tlvproxy.config.websocket import read_websocket
from tlvproxy.routing import Router
from tlvproxy.schema.codec import (
    RENDER_FACTOR,
    CommandCodec,
    JsonCodec,
    ProtobufCodec,
    RawCodec,
)
from tlvproxy.schema.convert import Converters
from tlvproxy.units import parse_duration

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from tlvproxy.config.model import (
        AuthSpec,
        EtcdSpec,
        ListenSpec,
        TlsSpec,
    )
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
# libyaml's parser keeps node marks too and composes a large table ~10x faster.
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


# ---------------------------------------------------------------- the loader


class _TableLoader:
    """One pass over one table text. `load()` returns the CompiledTable or raises TableError."""

    def __init__(self, text: str, source: Path, confine: Path | None = None) -> None:
        self.text = text
        self.source = source
        self.base = source.parent
        self.r = NodeReader(source, confine=confine)
        self.schema_problems: list[str] = []
        self.proto_spec = ProtoSpec()
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
        commands = read_commands(
            self.r,
            top.get("commands"),
            framing=framing,
            json_options=json_options,
            upstreams=upstreams,
            schema=schema,
            authenticators=self.authenticators,
            default_auth=self.default_auth,
            warn=self.warn,
        )
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
            "demo": r.get(top, "demo", "", nodes.boolean, False),
            "etcd": self._etcd(top, upstreams),
        }
        # Last: every section above may warn (`_etcd` of a `discovery` upstream
        # without an etcd section, docs/configuration.md "etcd").
        table_kwargs["warnings"] = tuple(self.warnings)
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


# ---------------------------------------------------------------- compiling


def _codecs(
    commands: tuple[CommandSpec, ...], options: JsonOptions, schema: Schema, max_body: int
) -> dict[str, CommandCodec]:
    json_codec = JsonCodec()
    raw_codec = RawCodec()
    codecs: dict[str, CommandCodec] = {}
    # One set per `json` options: a message type's converters are built once
    # (a writer is compiled code), however many commands use it.
    converters: dict[JsonOptions, Converters] = {}
    for command in commands:
        if command.codec == "json":
            codecs[command.name] = json_codec
        elif command.codec == "raw":
            codecs[command.name] = raw_codec
        else:
            response = command.push if command.push else command.response
            assert response is not None  # the loader required it
            json_options = command.json or options
            shared = converters.get(json_options)
            if shared is None:
                shared = converters[json_options] = Converters(json_options, schema.pool)
            codecs[command.name] = ProtobufCodec(
                command.name,
                schema.message_class(command.request) if command.request else None,
                schema.message_class(response),
                json_options,
                schema,
                # What one answer may expand to (docs/reference.md "Answers too
                # large to render").
                max_rendered=RENDER_FACTOR * max_body,
                converters=shared,
            )
    return codecs

"""The loaded table as immutable values (docs/configuration.md).

Owns: the attrs classes a loaded commands.yaml becomes, with normalised units
(seconds as float, bytes as int, rates per second) and their defaults.
Must not: parse YAML or text units (that is `loader.py`), or do I/O. A reload
builds a whole new `Table`; nothing here is ever mutated.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, ClassVar, Literal

import attrs

from tlvproxy.framing import HeaderLayout, default_layout

if TYPE_CHECKING:
    import re
    from collections.abc import Mapping
    from pathlib import Path

    from tlvproxy.config.keys import KeyExpr

Codec = Literal["protobuf", "json", "raw"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(slots=True)
class Address:
    """A TCP address; `str()` gives HOST:PORT ([v6]:PORT for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen(slots=True, kw_only=True)
class ListenSpec:
    """The listeners (docs/configuration.md "listen"): at least one of `http`
    and `https` is set; `https` needs the table's `tls`."""

    http: Address | None = Address("0.0.0.0", 8080)
    https: Address | None = None
    admin: Address | None = Address("127.0.0.1", 9180)


@attrs.frozen(slots=True, kw_only=True)
class CertificateSpec:
    """One certificate of `tls.certificates`: its chain and key files, and the
    SNI names it is served for (exact, or `*.example.com` for one label)."""

    cert: Path
    key: Path
    server_names: tuple[str, ...] = ()
    name: str = ""  # the `cert` path as written in the table: the metrics label


@attrs.frozen(slots=True, kw_only=True)
class TlsSpec:
    """The `tls` section (docs/configuration.md "tls"): the first certificate is
    the default one."""

    certificates: tuple[CertificateSpec, ...]
    min_version: Literal["1.2", "1.3"] = "1.2"


@attrs.frozen(slots=True, kw_only=True)
class ProtoSpec:
    paths: tuple[Path, ...] = ()
    files: tuple[str, ...] = ()


@attrs.frozen(slots=True, kw_only=True)
class NodeSpec:
    address: Address
    weight: int = 1


@attrs.frozen(slots=True, kw_only=True)
class HeartbeatSpec:
    command: int
    interval: float


@attrs.frozen(slots=True, kw_only=True)
class HealthSpec:
    unhealthy_after: int = 3
    healthy_after: int = 2


@attrs.frozen(slots=True, kw_only=True)
class UpstreamSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    # `discovery: {etcd: PREFIX}`: the nodes are the keys under PREFIX, followed
    # while the pool runs (docs/configuration.md "discovery"); `nodes` is empty.
    discovery: str | None = None
    balance: Literal["round_robin", "consistent_hash"] = "round_robin"
    hash_on: KeyExpr | None = None
    connections: int = 2
    connect_timeout: float = 1.0
    timeout: float = 3.0
    retries: int = 1
    heartbeat: HeartbeatSpec | None = None
    health: HealthSpec = HealthSpec()
    # Cap on requests in flight per pooled connection (backpressure on slow nodes).
    max_in_flight: int = 1024


@attrs.frozen(slots=True, kw_only=True)
class EtcdSpec:
    """The `etcd` section (docs/configuration.md "etcd"): where `discovery` reads."""

    endpoints: tuple[str, ...]


@attrs.frozen(slots=True, kw_only=True)
class EtcdOrigin:
    """Where a table kept in etcd was read: the endpoints, the prefix, and the
    revision of its last change (docs/operations.md "Running a fleet")."""

    endpoints: tuple[str, ...]
    prefix: str
    revision: int


@attrs.frozen(slots=True, kw_only=True)
class JsonOptions:
    field_names: Literal["proto", "camel"] = "proto"
    enums: Literal["name", "number"] = "name"
    emit_defaults: bool = True
    ignore_unknown_fields: bool = False


@attrs.frozen(slots=True, kw_only=True)
class HttpRouteSpec:
    method: str
    path: str


@attrs.frozen(slots=True, kw_only=True)
class JwtAuthSpec:
    """A `type: jwt` authenticator (docs/security.md "JWT")."""

    kind: ClassVar[str] = "jwt"
    name: str
    keys: str  # where the key set is: a file path (resolved) or an http(s) URL
    key_set: str | None = None  # a file's JWKS text, as read at load; None for a URL
    refresh: float = 600.0
    algorithms: tuple[str, ...] = ("RS256",)
    issuer: str | None = None
    audience: tuple[str, ...] = ()  # accepted `aud` values; empty: `aud` is not checked
    leeway: float = 0.0
    token_from: tuple[KeyExpr, ...] = ()

    @property
    def remote(self) -> bool:
        """True when the key set is fetched from a URL."""
        return self.key_set is None


@attrs.frozen(slots=True, kw_only=True)
class ApiKeyEntry:
    """One key of an `api_key` authenticator: its consumer name and other entries."""

    consumer: str
    sha256: str  # lower-case hex
    claims: Mapping[str, object] = attrs.field(factory=dict)


@attrs.frozen(slots=True, kw_only=True)
class ApiKeyAuthSpec:
    """A `type: api_key` authenticator (docs/security.md "API keys")."""

    kind: ClassVar[str] = "api_key"
    name: str
    source: KeyExpr  # header.NAME or query.NAME
    keys: tuple[ApiKeyEntry, ...]


@attrs.frozen(slots=True, kw_only=True)
class HmacAuthSpec:
    """A `type: hmac` authenticator (docs/security.md "Signed requests")."""

    kind: ClassVar[str] = "hmac"
    name: str
    # key id -> secret; never printed (repr) since tables are logged and shown.
    secrets: Mapping[str, bytes] = attrs.field(repr=False)
    clock_skew: float = 300.0


AuthSpec = JwtAuthSpec | ApiKeyAuthSpec | HmacAuthSpec
# A claim a command requires: its name and the values accepted.
ClaimValue = str | int | float | bool

# Percentages are kept in basis points: `percent: 12.5` is 1250 of 10000.
BASIS_POINTS = 10000


@attrs.frozen(slots=True, kw_only=True)
class SplitRule:
    """One rule of a command's `split` (docs/configuration.md "split"): when
    `key` matches, the request is sent as the command `to`. Exactly one of
    `tail`, `values` and `percent` is set."""

    key: KeyExpr
    to: str
    tail: frozenset[int] | None = None  # last decimal digits of the key
    values: frozenset[str] | None = None  # the key's values, as the key reads them
    percent: int | None = None  # basis points of the keys' stable hashes


@attrs.frozen(slots=True, kw_only=True)
class MirrorSpec:
    """A command's `mirror` (docs/configuration.md "mirror"): a copy of
    `percent` (basis points) of its requests goes to the command `to`."""

    to: str
    percent: int = BASIS_POINTS
    compare: bool = False
    log_values: bool = False  # the compare's log line shows the differing values too


@attrs.frozen(slots=True, kw_only=True)
class LastGoodSpec:
    """`fallback.last_good` (docs/configuration.md "fallback"): the last
    status-0 answer per value of `key`, kept `ttl` seconds, at most
    `max_entries` answers and `max_bytes` bytes per worker process."""

    key: KeyExpr
    ttl: float
    max_entries: int = 10000
    max_bytes: int = 64 * 1024 * 1024


@attrs.frozen(slots=True, kw_only=True)
class FallbackSpec:
    """A command's `fallback` (docs/configuration.md "fallback"): a `last_good`
    answer when one is fresh, else the static `body` when one is given."""

    # The static body as the frame body of the command's response, encoded
    # once at load; None: no static body.
    body: bytes | None = None
    last_good: LastGoodSpec | None = None


@attrs.frozen(slots=True, kw_only=True)
class TrafficSpec:
    """What a command does with its traffic besides sending it: `split`,
    `mirror` and `fallback` (docs/configuration.md "split, mirror, fallback")."""

    split: tuple[SplitRule, ...] = ()
    mirror: MirrorSpec | None = None
    fallback: FallbackSpec | None = None


@attrs.frozen(slots=True, kw_only=True)
class CommandSpec:
    """One row of `commands`. A push command has `push` set and no http/upstream."""

    name: str
    command: int
    upstream: str | None = None
    codec: Codec = "protobuf"
    request: str | None = None
    response: str | None = None
    push: str | None = None  # the push message; "" for a json/raw push (`push: true`)
    http: HttpRouteSpec | None = None
    uid: KeyExpr | None = None
    fields: Mapping[str, KeyExpr] = attrs.field(factory=dict)
    timeout: float | None = None
    idempotent: bool = False
    json: JsonOptions | None = None
    auth: str | None = None  # the authenticator's name; None: public
    claims: Mapping[str, tuple[ClaimValue, ...]] = attrs.field(factory=dict)
    # Key expressions whose values become numbers (uid, integer fields): read
    # once per request and normalised (docs/configuration.md "Key expressions").
    numeric_keys: tuple[KeyExpr, ...] = ()
    # split, mirror, fallback; None for a command that has none of them, so
    # that its requests pay one attribute test for the feature.
    traffic: TrafficSpec | None = None


@attrs.frozen(slots=True, kw_only=True)
class WebSocketSpec:
    path: str = "/ws"
    upstream: str
    hash_on: KeyExpr | None = None
    uid: KeyExpr | None = None
    auth: str | None = None  # the handshake's authenticator; None: public
    allowed_origins: tuple[str, ...] | None = None  # None: any Origin
    mode: Literal["json", "binary"] = "json"
    max_message: int = 64 * 1024
    idle_timeout: float = 120.0


@attrs.frozen(slots=True, kw_only=True)
class SessionsSpec:
    """Push sessions over plain HTTP, SSE and long polling (docs/push-sessions.md)."""

    path: str = "/v1/sessions"
    upstream: str
    hash_on: KeyExpr | None = None
    uid: KeyExpr | None = None
    auth: str | None = None  # the authenticator every request of a session needs; None: public
    idle_timeout: float = 60.0  # closed after this long with no stream, poll or send
    poll_timeout: float = 25.0  # the longest a long poll waits
    max_buffered: int = 256  # pushes kept per session for resuming
    # Bytes of pushes all the sessions of one worker keep; past it the oldest go.
    max_buffered_per_worker: int = 256 * 1024 * 1024


@attrs.frozen(slots=True, kw_only=True)
class Limits:
    max_header_bytes: int = 16 * 1024
    max_request_body: int = 1024 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    # Per worker (docs/configuration.md "limits"): client connections, and
    # those of one client address, beyond which a connection is refused 503.
    max_connections: int = 10000
    max_connections_per_ip: int = 256


@attrs.frozen(slots=True, kw_only=True)
class RateLimitRule:
    name: str
    commands: tuple[str, ...] | None  # None: every command
    key: KeyExpr
    rate: float  # requests per second
    burst: int = 0
    # Where the buckets live (docs/configuration.md "Where the buckets live"):
    # shared by this gateway's workers, or by every gateway on `Table.redis`.
    store: Literal["local", "redis"] = "local"
    on_store_error: Literal["allow", "deny"] = "allow"


@attrs.frozen(slots=True, kw_only=True)
class RedisSpec:
    """The Redis of `store: redis` rate limits (docs/configuration.md "redis")."""

    # May hold a password: never printed (repr), since tables are logged and shown.
    url: str = attrs.field(repr=False)


WafLocation = Literal["path", "query", "body", "headers"]


@attrs.frozen(slots=True, kw_only=True)
class WafRule:
    name: str
    locations: frozenset[WafLocation]
    pattern: re.Pattern[str]
    action: Literal["deny", "log"] = "deny"


@attrs.frozen(slots=True, kw_only=True)
class CorsSpec:
    """Cross-origin REST calls from browser pages (docs/configuration.md "cors")."""

    origins: tuple[str, ...]  # exact origins; ("*",) for any page (never with credentials)
    methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE")
    headers: tuple[str, ...] = ("authorization", "content-type", "x-request-id")
    expose_headers: tuple[str, ...] = ("x-request-id", "retry-after", "www-authenticate")
    credentials: bool = False
    max_age: float = 600.0


@attrs.frozen(slots=True, kw_only=True)
class Readiness:
    """When /readyz says the gateway is ready (docs/operations.md "Readiness")."""

    require_healthy_upstreams: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Table:
    """A whole table as configuration: plain values, nothing built from them.

    What the loader builds from it (the compiled schema, a codec per command,
    the router, the TLS certificates) is a `CompiledTable`'s (compiled.py).
    `version` is a digest of the table file and the files it read (.proto
    files, key sets, certificates).
    """

    source: Path | None = None
    version: str = ""
    listen: ListenSpec = ListenSpec()
    tls: TlsSpec | None = None
    admin_token: str | None = None
    workers: int = 1
    http_parser: Literal["auto", "h11", "httptools"] = "auto"
    trusted_proxies: tuple[Network, ...] = ()
    shutdown_timeout: float = 30.0
    readiness: Readiness = Readiness()
    cors: CorsSpec | None = None
    proto: ProtoSpec = ProtoSpec()
    framing: HeaderLayout = attrs.field(factory=default_layout)
    upstreams: Mapping[str, UpstreamSpec] = attrs.field(factory=dict)
    commands: tuple[CommandSpec, ...] = ()
    json: JsonOptions = JsonOptions()
    status_map: Mapping[int, int] = attrs.field(factory=dict)
    envelope: bool = False
    websocket: WebSocketSpec | None = None
    sessions: SessionsSpec | None = None
    limits: Limits = Limits()
    rate_limits: tuple[RateLimitRule, ...] = ()
    redis: RedisSpec | None = None
    waf: tuple[WafRule, ...] = ()
    auth: Mapping[str, AuthSpec] = attrs.field(factory=dict)
    default_auth: str | None = None
    demo: bool = False  # serve the web IM demo page at /demo/
    etcd: EtcdSpec | None = None
    # Set for a table read from etcd, by whoever read it (the loader reads files).
    origin: EtcdOrigin | None = None

    # What `check` warns about: lines like problems, for a table that loads.
    warnings: tuple[str, ...] = ()

    commands_by_name: Mapping[str, CommandSpec] = attrs.field(init=False, repr=False)
    # By (upstream, word): a command word is unique per upstream; a push
    # command, which has no upstream, is under (None, word).
    commands_by_word: Mapping[tuple[str | None, int], CommandSpec] = attrs.field(
        init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        _set = object.__setattr__
        _set(self, "commands_by_name", {c.name: c for c in self.commands})
        _set(self, "commands_by_word", {(c.upstream, c.command): c for c in self.commands})

    def command_at(self, upstream: str, number: int) -> CommandSpec | None:
        """The command a frame of word `number` on a connection to `upstream` is:
        a command of that upstream, else a push command; None when neither
        (docs/configuration.md "commands")."""
        found = self.commands_by_word.get((upstream, number))
        return found if found is not None else self.commands_by_word.get((None, number))

    def find_command(
        self, name_or_number: str | int, upstream: str | None = None
    ) -> CommandSpec | None:
        """A command by name, or by number (an int, or a numeric string like
        "0x1001" or "4097"). A number is looked up among the commands of
        `upstream` (and the pushes) when given; else it must be the word of one
        command only (`commands_with_word`)."""
        if isinstance(name_or_number, int) and not isinstance(name_or_number, bool):
            number = name_or_number
        elif isinstance(name_or_number, str):
            found = self.commands_by_name.get(name_or_number)
            if found is not None:
                return found
            try:
                number = int(name_or_number, 0)
            except ValueError:
                return None
        else:
            return None
        if upstream is not None:
            return self.command_at(upstream, number)
        same = self.commands_with_word(number)
        return same[0] if len(same) == 1 else None

    def commands_with_word(self, number: int) -> list[CommandSpec]:
        """Every command whose word is `number`, whatever its upstream."""
        return [c for c in self.commands if c.command == number]

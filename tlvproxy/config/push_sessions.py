"""Reading the table's `sessions` section: push sessions over SSE and long
polling (docs/configuration.md "sessions", docs/push-sessions.md).

Owns: what each key of `sessions` accepts, and its cross-references: the
upstream it names, its authenticator, and the paths it claims (no command
route and no WebSocket endpoint may sit at or under `sessions.path`, where
they would never be reached).
Must not: stop at the first problem (problems are recorded on the
`NodeReader`, as every section reader does), or import trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tlvproxy.config import auth, nodes, sections
from tlvproxy.config.model import SessionsSpec
from tlvproxy.config.nodes import Invalid
from tlvproxy.routing import parse_template

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tlvproxy.config.model import AuthSpec, CommandSpec, UpstreamSpec, WebSocketSpec
    from tlvproxy.config.nodes import Node, NodeReader

    Warn = Callable[[Node, str, str], None]

_KEYS: Final = (
    "path",
    "upstream",
    "hash_on",
    "uid",
    "auth",
    "idle_timeout",
    "poll_timeout",
    "max_buffered",
    "max_buffered_per_worker",
)
# The largest `max_buffered`: pushes kept per session for resuming.
MAX_BUFFERED: Final = 65536
# What a rate limit's `commands` call the creation of a push session
# (docs/configuration.md "rate_limits"); no command may be named so.
CREATE_COMMAND: Final = "sessions.create"


def _sessions_path(value: Any) -> str:
    path = nodes.text(value)
    segments = parse_template(path)  # raises InvalidTemplate (a ValueError) saying why
    if not segments:
        raise Invalid(
            "the sessions path cannot be /: give it a segment of its own, like /v1/sessions"
        )
    if any(not isinstance(segment, str) for segment in segments):
        raise Invalid(f"the sessions path cannot have parameters, got {path!r}")
    if path.endswith("/"):
        raise Invalid(f"the sessions path cannot end with '/', got {path!r}")
    return path


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def read_sessions(
    r: NodeReader,
    node: Node | None,
    *,
    upstreams: Mapping[str, UpstreamSpec],
    commands: tuple[CommandSpec, ...],
    websocket: WebSocketSpec | None,
    authenticators: dict[str, AuthSpec],
    warn: Warn,
) -> SessionsSpec | None:
    """The `sessions` section, or None when it is absent or unusable (recorded)."""
    if node is None:
        return None
    found = r.mapping(node, "sessions", _KEYS, ("upstream",))
    if found is None or "upstream" not in found:
        return None
    default = SessionsSpec(upstream="")
    path = r.get(found, "path", "sessions", _sessions_path, default.path)
    where = found.get("path", node)
    upstream = r.get(found, "upstream", "sessions", nodes.text, "")
    if upstream and upstream not in upstreams:
        known = ", ".join(upstreams) or "none"
        r.error(
            found["upstream"],
            "sessions.upstream",
            f"undefined upstream {upstream!r} (defined: {known})",
        )
    for command in commands:
        route = command.http
        if route is not None and _under(route.path, path):
            r.error(
                where,
                "sessions.path",
                f"{path} would hide the route {route.method} {route.path} of command "
                f"{command.name!r}: the sessions path and everything under it are "
                "the sessions' own",
            )
    if websocket is not None and _under(websocket.path, path):
        r.error(
            where,
            "sessions.path",
            f"{path} would hide the WebSocket endpoint {websocket.path}",
        )
    session_auth = None
    if "auth" in found:
        _, session_auth = auth.reference(r, found["auth"], "sessions.auth", authenticators)
    uid = r.get(found, "uid", "sessions", sections.key_expr, None)
    if session_auth is not None and uid is not None and uid.source != "auth":
        warn(
            found["uid"],
            "sessions.uid",
            f"the session's uid comes from {uid}, which the client writes, although "
            "the session is authenticated; use auth.sub (or auth.claim.NAME)",
        )
    return SessionsSpec(
        path=path,
        upstream=upstream,
        hash_on=r.get(found, "hash_on", "sessions", sections.key_expr, None),
        uid=uid,
        auth=session_auth,
        idle_timeout=r.get(
            found, "idle_timeout", "sessions", sections.positive_duration, default.idle_timeout
        ),
        poll_timeout=r.get(
            found, "poll_timeout", "sessions", sections.positive_duration, default.poll_timeout
        ),
        max_buffered=r.get(
            found, "max_buffered", "sessions", nodes.integer(1, MAX_BUFFERED), default.max_buffered
        ),
        max_buffered_per_worker=r.get(
            found,
            "max_buffered_per_worker",
            "sessions",
            sections.positive_size,
            default.max_buffered_per_worker,
        ),
    )

"""Reading the table's `websocket` section: the WebSocket endpoint
(docs/configuration.md "websocket", docs/websocket.md).

Owns: what each key of `websocket` accepts, and its cross-references: the
upstream it names, its authenticator, and its path, which no command's GET
route may also claim. `check` warns of a session uid the client writes
although the handshake is authenticated.
Must not: stop at the first problem (problems are recorded on the
`NodeReader`, as every section reader does), or import trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from tlvproxy.config import auth, nodes, sections
from tlvproxy.config.model import WebSocketSpec
from tlvproxy.config.nodes import Invalid, suggest
from tlvproxy.routing import template_params

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tlvproxy.config.model import AuthSpec, CommandSpec, UpstreamSpec
    from tlvproxy.config.nodes import Node, NodeReader

    Warn = Callable[[Node, str, str], None]


def _ws_path(value: Any) -> str:
    path = nodes.text(value)
    if template_params(path):
        raise Invalid(f"the websocket path cannot have parameters, got {path!r}")
    return path


def read_websocket(
    r: NodeReader,
    node: Node | None,
    *,
    upstreams: Mapping[str, UpstreamSpec],
    commands: tuple[CommandSpec, ...],
    authenticators: dict[str, AuthSpec],
    warn: Warn,
) -> WebSocketSpec | None:
    """The `websocket` section, or None when it is absent or unusable (recorded)."""
    if node is None:
        return None
    keys = (
        "path",
        "upstream",
        "hash_on",
        "uid",
        "auth",
        "allowed_origins",
        "mode",
        "max_message",
        "idle_timeout",
    )
    found = r.mapping(node, "websocket", keys, ("upstream",))
    if found is None or "upstream" not in found:
        return None
    path = r.get(found, "path", "websocket", _ws_path, "/ws")
    upstream = r.get(found, "upstream", "websocket", nodes.text, "")
    if upstream and upstream not in upstreams:
        known = ", ".join(upstreams) or "none"
        r.error(
            found["upstream"],
            "websocket.upstream",
            f"undefined upstream {upstream!r} (defined: {known})" + suggest(upstream, upstreams),
        )
    for command in commands:
        route = command.http
        if route is not None and route.path == path and route.method == "GET":
            r.error(
                found.get("path", node),
                "websocket.path",
                f"{path} is also the GET route of command {command.name!r}",
            )
    default = WebSocketSpec(upstream=upstream)
    session_auth = None
    if "auth" in found:
        _, session_auth = auth.reference(r, found["auth"], "websocket.auth", authenticators)
    uid = r.get(found, "uid", "websocket", sections.key_expr, None)
    mode: Literal["json", "binary"] = r.get(
        found, "mode", "websocket", nodes.choice("json", "binary"), "json"
    )
    if session_auth is not None and uid is not None and uid.source != "auth":
        warn(
            found["uid"],
            "websocket.uid",
            f"the session's uid comes from {uid}, which the client writes, although "
            "the handshake is authenticated; use auth.sub (or auth.claim.NAME)",
        )
    elif session_auth is not None and uid is None and mode == "binary":
        warn(
            node,
            "websocket.uid",
            "without it, the uid of each binary frame is the client's own, although the "
            "handshake is authenticated; set uid: auth.sub (or auth.claim.NAME)",
        )
    allowed_origins = None
    if "allowed_origins" in found:
        allowed_origins = auth.origins(r, found["allowed_origins"], "websocket.allowed_origins")
    return WebSocketSpec(
        path=path,
        upstream=upstream,
        hash_on=r.get(found, "hash_on", "websocket", sections.key_expr, None),
        uid=uid,
        auth=session_auth,
        allowed_origins=allowed_origins,
        mode=mode,
        max_message=r.get(
            found, "max_message", "websocket", sections.positive_size, default.max_message
        ),
        idle_timeout=r.get(
            found, "idle_timeout", "websocket", sections.positive_duration, default.idle_timeout
        ),
    )

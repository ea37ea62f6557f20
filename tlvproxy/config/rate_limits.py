"""Reading the `rate_limits` rules and the `redis` section their `store: redis`
buckets live in (docs/configuration.md "rate_limits", "redis").

Owns: what each key of a rule and of `redis` accepts, and a rule's
cross-references: the commands it names (or the creation of push sessions,
CREATE_COMMAND, when the table has a `sessions` section), and `store: redis`
needing the `redis` section. A Redis URL is checked for a form the client can
use as it is, and an error never repeats its password.
Must not: connect to Redis (the stores do, tlvproxy/stores/), or stop at the
first problem: every problem is recorded on the `NodeReader`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import SplitResult, urlsplit

from tlvproxy.config import nodes, sections
from tlvproxy.config.model import RateLimitRule, RedisSpec
from tlvproxy.config.nodes import Invalid, join, suggest
from tlvproxy.config.push_sessions import CREATE_COMMAND
from tlvproxy.units import parse_rate

if TYPE_CHECKING:
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.config.nodes import Node, NodeReader


def read_rate_limits(
    r: NodeReader,
    node: Node | None,
    commands: tuple[CommandSpec, ...],
    redis: RedisSpec | None,
    *,
    sessions: bool,
) -> tuple[RateLimitRule, ...]:
    """The `rate_limits` rules; `sessions`: whether the table has a `sessions`
    section, whose creation a rule may limit as CREATE_COMMAND."""
    if node is None:
        return ()
    known = {c.name for c in commands}
    names: set[str] = set()
    result: list[RateLimitRule] = []
    for i, item in enumerate(r.sequence(node, "rate_limits") or []):
        path = join("rate_limits", i)
        keys = ("name", "commands", "key", "rate", "burst", "store", "on_store_error")
        found = r.mapping(item, path, keys, ("name", "key", "rate"))
        if found is None:
            continue
        name = r.get(found, "name", path, nodes.text, "")
        if name in names:
            r.error(found["name"], join(path, "name"), f"duplicate rule name {name!r}")
        names.add(name)
        selected: tuple[str, ...] | None = None
        if "commands" in found:
            cpath = join(path, "commands")
            selected = ()
            items = r.sequence(found["commands"], cpath)
            if items == []:
                r.error(found["commands"], cpath, "name at least one command, or omit it for all")
            for j, cnode in enumerate(items or []):
                command = r.value(cnode, join(cpath, j), nodes.text, None)
                if command is None:
                    continue
                if command == CREATE_COMMAND:
                    if not sessions:
                        r.error(
                            cnode,
                            join(cpath, j),
                            f"{CREATE_COMMAND} limits the creation of push sessions, "
                            "but the table has no sessions section",
                        )
                elif command not in known:
                    r.error(
                        cnode,
                        join(cpath, j),
                        f"unknown command {command!r}" + suggest(command, known),
                    )
                selected += (command,)
        store: Literal["local", "redis"] = r.get(
            found, "store", path, nodes.choice("local", "redis"), "local"
        )
        if store == "redis" and redis is None:
            r.error(
                found["store"],
                join(path, "store"),
                "store: redis needs the top-level `redis: {url: ...}` section",
            )
        on_error: Literal["allow", "deny"] = r.get(
            found, "on_store_error", path, nodes.choice("allow", "deny"), "allow"
        )
        key = r.get(found, "key", path, sections.key_expr, None)
        rate = r.get(found, "rate", path, parse_rate, None)
        if key is None or rate is None:
            continue
        result.append(
            RateLimitRule(
                name=name,
                commands=selected,
                key=key,
                rate=rate,
                burst=r.get(found, "burst", path, nodes.integer(0), 0),
                store=store,
                on_store_error=on_error,
            )
        )
    return tuple(result)


def read_redis(r: NodeReader, node: Node | None) -> RedisSpec | None:
    """The `redis` section, or None when it is absent or unusable (recorded)."""
    if node is None:
        return None
    found = r.mapping(node, "redis", ("url",), ("url",))
    url = r.get(found, "url", "redis", _redis_url, None)
    return None if url is None else RedisSpec(url=url)


_REDIS_FORMS = "redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or unix:///PATH"


def _redis_url(value: Any) -> str:
    """A Redis URL the client can use as it is (docs/configuration.md "redis").

    Raises Invalid naming the accepted forms; the message never repeats a password.
    """
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a URL like {_REDIS_FORMS}, got {value!r}")
    try:
        parsed = urlsplit(value)
        port = parsed.port
    except ValueError as exc:
        raise Invalid(f"not a valid URL ({exc}); expected {_REDIS_FORMS}") from None
    shown = _without_password(value, parsed)
    if parsed.query or parsed.fragment:
        raise Invalid(f"{shown}: a query or fragment is not accepted; expected {_REDIS_FORMS}")
    if parsed.scheme == "unix":
        if not parsed.path.startswith("/") or parsed.netloc:
            raise Invalid(f"{shown}: expected unix:///ABSOLUTE/PATH of the socket")
        return value
    if parsed.scheme not in ("redis", "rediss"):
        what = f"unknown scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
        raise Invalid(f"{shown}: {what}; expected {_REDIS_FORMS}")
    if not parsed.hostname:
        raise Invalid(f"{shown}: the host is missing; expected {_REDIS_FORMS}")
    if port == 0:
        raise Invalid(f"{shown}: port 0 is not a port")
    database = parsed.path.lstrip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise Invalid(f"{shown}: the path must be a database number like /0, got {parsed.path!r}")
    return value


def _without_password(value: str, parsed: SplitResult) -> str:
    if parsed.password is None:
        return repr(value)
    host = parsed.netloc.rpartition("@")[2]
    user = parsed.username or ""
    return repr(parsed._replace(netloc=f"{user}:***@{host}").geturl())

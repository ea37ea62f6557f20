"""Reading the `auth` section, `default_auth` and `cors` (docs/configuration.md
"auth" and "cors"): who may call, and from which pages.

Owns: what each authenticator type accepts (`jwt`, `api_key`, `hmac`), reading
a `jwt` key file (and checking it parses) and `env.NAME` secrets, the claims a
command may require, and the origins of `allowed_origins` and `cors`.
Must not: verify anything or fetch a key set URL; `tlvproxy.auth` does that
with what is read here.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Final

from tlvproxy.config import nodes
from tlvproxy.config.jwks import ALGORITHMS, parse_key_set
from tlvproxy.config.keys import KeyExpr
from tlvproxy.config.model import (
    ApiKeyAuthSpec,
    ApiKeyEntry,
    CorsSpec,
    HmacAuthSpec,
    JwtAuthSpec,
)
from tlvproxy.config.nodes import Invalid, Node, NodeReader, join
from tlvproxy.config.sections import key_expr, positive_duration
from tlvproxy.units import parse_duration

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.model import AuthSpec, ClaimValue

NONE: Final = "none"  # the name of "no authenticator": a public command
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[^/?#\s]+")
_COMMON: Final = ("name", "type")
_KEYS: Final = {
    "jwt": (
        *_COMMON,
        "keys",
        "refresh",
        "algorithms",
        "issuer",
        "audience",
        "leeway",
        "token_from",
    ),
    "api_key": (*_COMMON, "header", "query", "keys"),
    "hmac": (*_COMMON, "secrets", "clock_skew"),
}
_DEFAULT_TOKEN_FROM: Final = (KeyExpr("header", "authorization"),)


def read_auth(r: NodeReader, node: Node | None, base: Path) -> dict[str, AuthSpec]:
    """The authenticators by name; problems are recorded on `r`."""
    if node is None:
        return {}
    result: dict[str, AuthSpec] = {}
    for i, item in enumerate(r.sequence(node, "auth") or []):
        path = join("auth", i)
        head = r.mapping(item, path, None, _COMMON)
        if head is None or "name" not in head or "type" not in head:
            continue
        name = r.get(head, "name", path, _name, "")
        kind = r.get(head, "type", path, nodes.choice(*_KEYS), "")
        if not name or not kind:
            continue
        found = head
        for key, value in found.items():
            if key not in _KEYS[kind]:
                allowed = ", ".join(_KEYS[kind])
                r.error(
                    value,
                    join(path, key),
                    f"unknown key for a {kind} authenticator (expected one of: {allowed})",
                )
        if name in result:
            r.error(head["name"], join(path, "name"), f"duplicate authenticator name {name!r}")
            continue
        spec: AuthSpec | None
        if kind == "jwt":
            spec = _jwt(r, found, path, name, base)
        elif kind == "api_key":
            spec = _api_key(r, item, found, path, name)
        else:
            spec = _hmac(r, found, path, name)
        if spec is not None:
            result[name] = spec
    return result


def reference(
    r: NodeReader, node: Node, path: str, known: dict[str, AuthSpec]
) -> tuple[bool, str | None]:
    """An authenticator reference (`auth:`, `default_auth:`): (valid, name or None for none)."""
    name = r.value(node, path, nodes.text, "")
    if not name:
        return False, None
    if name == NONE:
        return True, None
    if name not in known:
        defined = ", ".join(known) or "none"
        r.error(node, path, f"undefined authenticator {name!r} (defined in auth: {defined})")
        return False, None
    return True, name


def read_claims(r: NodeReader, node: Node, path: str) -> dict[str, tuple[ClaimValue, ...]]:
    """A command's `claims`: each a value or a list of values, any of which is accepted."""
    result: dict[str, tuple[ClaimValue, ...]] = {}
    for name, value in (r.mapping(node, path) or {}).items():
        where = join(path, name)
        items = r.sequence(value, where) if value.tag.endswith(":seq") else [value]
        accepted: list[ClaimValue] = []
        for j, item in enumerate(items or []):
            claim = r.value(item, join(where, j) if len(items or []) > 1 else where, _claim, None)
            if claim is not None:
                accepted.append(claim)
        if not accepted:
            r.error(value, where, "name at least one accepted value")
        result[name] = tuple(accepted)
    return result


def origins(r: NodeReader, node: Node, path: str) -> tuple[str, ...]:
    """`allowed_origins`: exact `scheme://host[:port]` values, as browsers send them."""
    result: list[str] = []
    for j, item in enumerate(r.sequence(node, path) or []):
        origin = r.value(item, join(path, j), _origin, None)
        if origin is not None:
            result.append(origin)
    return tuple(result)


_CORS_KEYS: Final = ("origins", "methods", "headers", "expose_headers", "credentials", "max_age")
_CORS_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 5.1)


def read_cors(r: NodeReader, node: Node | None) -> CorsSpec | None:
    """`cors`: None (off) when absent or null."""
    if node is None or node.tag.endswith(":null"):
        return None
    found = r.mapping(node, "cors", _CORS_KEYS, ("origins",))
    if found is None or "origins" not in found:
        return None
    default = CorsSpec(origins=())
    listed = r.sequence(found["origins"], "cors.origins") or []
    anyone = len(listed) == 1 and r.value(listed[0], "cors.origins[0]", lambda v: v, None) == "*"
    cors_origins = ("*",) if anyone else origins(r, found["origins"], "cors.origins")
    credentials = r.get(found, "credentials", "cors", nodes.boolean, False)
    if anyone and credentials:
        r.error(
            found["credentials"],
            "cors.credentials",
            'browsers refuse credentials with origins ["*"]: list the origins',
        )
    return CorsSpec(
        origins=cors_origins,
        methods=_names(r, found.get("methods"), "cors.methods", _cors_method, default.methods),
        headers=_names(r, found.get("headers"), "cors.headers", _header_name, default.headers),
        expose_headers=_names(
            r,
            found.get("expose_headers"),
            "cors.expose_headers",
            _header_name,
            default.expose_headers,
        ),
        credentials=credentials,
        max_age=r.get(found, "max_age", "cors", _leeway, default.max_age),
    )


def _names(
    r: NodeReader, node: Node | None, path: str, convert: Any, default: tuple[str, ...]
) -> tuple[str, ...]:
    if node is None:
        return default
    return tuple(
        name
        for j, item in enumerate(r.sequence(node, path) or [])
        if (name := r.value(item, join(path, j), convert, ""))
    )


def _cors_method(value: Any) -> str:
    if value not in _CORS_METHODS:
        raise Invalid(f"expected one of {', '.join(_CORS_METHODS)}; got {value!r}")
    return str(value)


def _header_name(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise Invalid(f"expected a header name, got {value!r}")
    return value.lower()


# ---------------------------------------------------------------- each type


def _jwt(
    r: NodeReader, found: dict[str, Node], path: str, name: str, base: Path
) -> JwtAuthSpec | None:
    if "keys" not in found:
        r.error(
            found.get("name") or next(iter(found.values())),
            join(path, "keys"),
            "required for a jwt authenticator",
        )
        return None
    algorithms = _algorithms(r, found.get("algorithms"), join(path, "algorithms"))
    location = r.value(found["keys"], join(path, "keys"), nodes.text, "")
    if not location or algorithms is None:
        return None
    key_set: str | None = None
    if not location.startswith(("http://", "https://")):
        try:
            file = r.file(base, location)
        except Invalid as exc:
            r.error(found["keys"], join(path, "keys"), str(exc))
            return None
        try:
            key_set = file.read_text("utf-8")
            parse_key_set(key_set, algorithms)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            r.error(found["keys"], join(path, "keys"), f"key set {str(file)!r}: {reason}")
            return None
        location = str(file)
    token_from: tuple[KeyExpr, ...] = _DEFAULT_TOKEN_FROM
    if "token_from" in found:
        where = join(path, "token_from")
        items = r.sequence(found["token_from"], where) or []
        token_from = tuple(
            key
            for j, item in enumerate(items)
            if (key := r.value(item, join(where, j), _token_place, None))
        )
        if not items:
            r.error(found["token_from"], where, "name at least one place to read the token from")
    return JwtAuthSpec(
        name=name,
        keys=location,
        key_set=key_set,
        refresh=r.get(found, "refresh", path, positive_duration, 600.0),
        algorithms=algorithms,
        issuer=r.get(found, "issuer", path, nodes.optional_text, None),
        audience=_audience(r, found.get("audience"), join(path, "audience")),
        leeway=r.get(found, "leeway", path, _leeway, 0.0),
        token_from=token_from,
    )


def _api_key(
    r: NodeReader, item: Node, found: dict[str, Node], path: str, name: str
) -> ApiKeyAuthSpec | None:
    if "header" in found and "query" in found:
        r.error(
            found["query"],
            join(path, "query"),
            "give the key's header or its query parameter, not both",
        )
    source = KeyExpr("header", "x-api-key")
    if "query" in found:
        source = KeyExpr("query", r.get(found, "query", path, nodes.text, "api_key"))
    elif "header" in found:
        source = KeyExpr("header", r.get(found, "header", path, nodes.text, "x-api-key").lower())
    if "keys" not in found:
        r.error(item, join(path, "keys"), "required for an api_key authenticator")
        return None
    entries: list[ApiKeyEntry] = []
    digests: set[str] = set()
    where = join(path, "keys")
    for consumer, node in (r.mapping(found["keys"], where) or {}).items():
        entry_path = join(where, consumer)
        fields = r.mapping(node, entry_path, None, ("sha256",))
        if fields is None or "sha256" not in fields:
            continue
        digest = r.get(fields, "sha256", entry_path, _sha256, "")
        if digest in digests:
            r.error(fields["sha256"], join(entry_path, "sha256"), "the same key is listed twice")
        digests.add(digest)
        claims = {
            key: r.value(value, join(entry_path, key), _claim, None)
            for key, value in fields.items()
            if key != "sha256"
        }
        if digest:
            entries.append(ApiKeyEntry(consumer=consumer, sha256=digest, claims=claims))
    return ApiKeyAuthSpec(name=name, source=source, keys=tuple(entries))


def _hmac(r: NodeReader, found: dict[str, Node], path: str, name: str) -> HmacAuthSpec | None:
    where = join(path, "secrets")
    if "secrets" not in found:
        r.error(found["name"], where, "required for an hmac authenticator")
        return None
    secrets: dict[str, bytes] = {}
    for key_id, node in (r.mapping(found["secrets"], where) or {}).items():
        secret = r.value(node, join(where, key_id), _secret, b"")
        if secret:
            secrets[key_id] = secret
    return HmacAuthSpec(
        name=name,
        secrets=secrets,
        clock_skew=r.get(found, "clock_skew", path, positive_duration, 300.0),
    )


# ---------------------------------------------------------------- converters


def _name(value: Any) -> str:
    name = nodes.text(value)
    if not _NAME.fullmatch(name) or name == NONE:
        raise Invalid(f"expected a name (letters, digits, _ . -; not {NONE!r}), got {name!r}")
    return name


def _algorithms(r: NodeReader, node: Node | None, path: str) -> tuple[str, ...] | None:
    if node is None:
        return ("RS256",)
    result: list[str] = []
    failed = False
    for j, item in enumerate(r.sequence(node, path) or []):
        algorithm = r.value(item, join(path, j), _algorithm, "")
        failed |= not algorithm
        result.append(algorithm)
    if not result and not failed:
        r.error(node, path, "name at least one algorithm")
    return None if failed or not result else tuple(result)


def _algorithm(value: Any) -> str:
    if value in ALGORITHMS:
        return str(value)
    if isinstance(value, str) and value.lower() == "none":
        raise Invalid("`none` is never accepted: a token must be signed")
    raise Invalid(f"expected one of {', '.join(ALGORITHMS)}; got {value!r}")


def _audience(r: NodeReader, node: Node | None, path: str) -> tuple[str, ...]:
    if node is None:
        return ()
    if node.tag.endswith(":seq"):
        return tuple(
            text
            for j, item in enumerate(r.sequence(node, path) or [])
            if (text := r.value(item, join(path, j), nodes.text, ""))
        )
    return (r.value(node, path, nodes.text, ""),)


def _leeway(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise Invalid(f"expected a duration of zero or more, got {value!r}")
    return seconds


def _token_place(value: Any) -> KeyExpr:
    key = key_expr(value)
    if key.source not in ("header", "query", "cookie"):
        raise Invalid(f"a token is read from header.NAME, query.NAME or cookie.NAME, not {value!r}")
    return key


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise Invalid(
            "expected the key's SHA-256 as 64 hex digits (e.g. `printf %s KEY | sha256sum`)"
        )
    return value.lower()


def _claim(value: Any) -> ClaimValue:
    if isinstance(value, str | int | float | bool):
        return value
    raise Invalid(f"expected a string, number or boolean, got {value!r}")


def _secret(value: Any) -> bytes:
    text = nodes.text(value)
    if text.startswith("env."):
        found = os.environ.get(text[4:])
        if not found:
            raise Invalid(f"the environment variable {text[4:]!r} is not set or empty")
        return found.encode()
    return text.encode()


def _origin(value: Any) -> str:
    # Scheme and host are case-insensitive, and browsers send them in lower case.
    text = nodes.text(value).lower()
    if not _ORIGIN.fullmatch(text):
        raise Invalid(
            f"expected an origin like https://web.example.com (scheme, host, optional port; "
            f"no path), got {value!r}"
        )
    return text

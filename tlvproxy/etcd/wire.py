"""etcd's v3 JSON gateway as values: requests built, answers read strictly.

Owns: the JSON shapes of `/v3/kv/range`, `/v3/kv/txn`, `/v3/watch` and
`/v3/lease/*` (base64 keys and values, int64 numbers as strings, fields left
out when they hold their zero value), and turning each answer into frozen
values, or `MalformedAnswer` saying what is wrong with it.
Must not: do I/O or import trio (`client.py` moves the bytes). Everything read
here came over the network from whoever can write to etcd: nothing is trusted
(a key, a value, a revision), every size is bounded by the caller's limits.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson

if TYPE_CHECKING:
    from collections.abc import Mapping

# An int64 of etcd (revisions, lease ids) fits here; anything above is a lie.
_MAX_INT64: Final = 2**63 - 1
# An int64 written as a string: an optional minus and ASCII digits, nothing else.
_INT64_TEXT: Final = re.compile(r"-?[0-9]{1,19}")


class MalformedAnswer(ValueError):
    """An answer of etcd that is not what the v3 API says it is."""


class EtcdRefused(Exception):
    """etcd answered the request with an error (`code` is its gRPC code)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# gRPC's OUT_OF_RANGE: the revision asked for has been compacted.
CODE_OUT_OF_RANGE: Final = 11


@attrs.frozen(slots=True)
class KeyValue:
    """One key as etcd keeps it; `value` is b"" for a deleted key in a watch
    event, and for one whose value was too large to keep (`oversize`, set by
    the watcher: the reader refuses that key)."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int = 0
    oversize: bool = False


@attrs.frozen(slots=True)
class RangeAnswer:
    """The keys of a range at `revision` (the store's revision when it was read)."""

    revision: int
    kvs: tuple[KeyValue, ...]
    more: bool


@attrs.frozen(slots=True)
class Event:
    """One change: `deleted`, or a put of `kv`."""

    kv: KeyValue
    deleted: bool


@attrs.frozen(slots=True)
class WatchAnswer:
    """One line of a watch stream.

    `events` (in revision order) when something changed; none for a progress
    notification or the `created` answer. `compact_revision` is set (and
    `canceled`) when the revision asked for has been compacted: the watcher
    must read the whole prefix again.
    """

    revision: int
    events: tuple[Event, ...] = ()
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""


# ---------------------------------------------------------------- requests


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, range_end) every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def range_request(
    prefix: bytes, *, revision: int = 0, limit: int = 0, keys_only: bool = False
) -> dict[str, Any]:
    request: dict[str, Any] = {"key": encode(prefix), "range_end": encode(prefix_end(prefix))}
    if revision:
        request["revision"] = str(revision)
    if limit:
        request["limit"] = str(limit)
    if keys_only:
        request["keys_only"] = True
    return request


def watch_request(prefix: bytes, start_revision: int) -> dict[str, Any]:
    return {
        "create_request": {
            "key": encode(prefix),
            "range_end": encode(prefix_end(prefix)),
            "start_revision": str(start_revision),
            # Sent by etcd on its own schedule while nothing changes; each one
            # tells the watch is alive (docs/operations.md "Watching etcd").
            "progress_notify": True,
        }
    }


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": encode(key), "value": encode(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def delete_op(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": encode(key)}}


def unchanged_since(prefix: bytes, revision: int) -> dict[str, Any]:
    """A txn compare: no key under `prefix` was written after `revision`."""
    return {
        "target": "MOD",
        "result": "LESS",
        "key": encode(prefix),
        "range_end": encode(prefix_end(prefix)),
        "mod_revision": str(revision + 1),
    }


def still_at(key: bytes, mod_revision: int) -> dict[str, Any]:
    """A txn compare: `key` exists, last written at `mod_revision`."""
    return {
        "target": "MOD",
        "result": "EQUAL",
        "key": encode(key),
        "mod_revision": str(mod_revision),
    }


# ---------------------------------------------------------------- answers


def parse_json(body: bytes) -> dict[str, Any]:
    """An answer's JSON object. Raises MalformedAnswer, or EtcdRefused for an
    error answer (`{"error": ..., "code": N}`)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedAnswer(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedAnswer(f"expected a JSON object, got {type(value).__name__}")
    error = value.get("error")
    if error is not None:
        if isinstance(error, dict):  # a watch stream's error line: {"error": {...}}
            message, code = error.get("message", error), error.get("grpc_code", 0)
        else:
            message, code = value.get("message", error), value.get("code", 0)
        raise EtcdRefused(str(message)[:500], code if isinstance(code, int) else 0)
    return value


def revision_of(answer: Mapping[str, Any]) -> int:
    """The store revision in an answer's header."""
    header = answer.get("header")
    if not isinstance(header, dict):
        raise MalformedAnswer("the answer has no header")
    return _int(header, "revision")


def parse_range(answer: Mapping[str, Any]) -> RangeAnswer:
    kvs = answer.get("kvs", [])
    if not isinstance(kvs, list):
        raise MalformedAnswer("kvs is not a list")
    more = answer.get("more", False)
    if not isinstance(more, bool):
        raise MalformedAnswer("more is not true or false")
    return RangeAnswer(
        revision=revision_of(answer), kvs=tuple(_kv(item) for item in kvs), more=more
    )


def parse_watch_line(line: bytes) -> WatchAnswer:
    """One line of `/v3/watch`. Raises MalformedAnswer or EtcdRefused."""
    outer = parse_json(line)
    result = outer.get("result")
    if not isinstance(result, dict):
        raise MalformedAnswer("a watch line without a result")
    events = result.get("events", [])
    if not isinstance(events, list):
        raise MalformedAnswer("events is not a list")
    parsed = []
    for event in events:
        if not isinstance(event, dict):
            raise MalformedAnswer("an event is not an object")
        kind = event.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise MalformedAnswer(f"unknown event type {str(kind)[:20]!r}")
        parsed.append(Event(kv=_kv(event.get("kv")), deleted=kind == "DELETE"))
    reason = result.get("cancel_reason", "")
    return WatchAnswer(
        revision=revision_of(result),
        events=tuple(parsed),
        created=result.get("created") is True,
        canceled=result.get("canceled") is True,
        compact_revision=_int(result, "compact_revision"),
        cancel_reason=reason[:500] if isinstance(reason, str) else "",
    )


def parse_txn(answer: Mapping[str, Any]) -> tuple[bool, int]:
    """(succeeded, revision) of a txn answer."""
    succeeded = answer.get("succeeded", False)
    if not isinstance(succeeded, bool):
        raise MalformedAnswer("succeeded is not true or false")
    return succeeded, revision_of(answer)


def parse_lease(answer: Mapping[str, Any]) -> tuple[int, int]:
    """(lease id, TTL in seconds) of a grant or keepalive answer; TTL 0: expired."""
    body = answer.get("result", answer)
    if not isinstance(body, dict):
        raise MalformedAnswer("a lease answer without a body")
    return _int(body, "ID"), _int(body, "TTL")


def _kv(item: Any) -> KeyValue:
    if not isinstance(item, dict):
        raise MalformedAnswer("a key-value is not an object")
    key = _bytes(item, "key")
    if not key:
        raise MalformedAnswer("a key-value without a key")
    return KeyValue(
        key=key,
        value=_bytes(item, "value"),
        mod_revision=_int(item, "mod_revision"),
        lease=_int(item, "lease"),
    )


def _bytes(item: Mapping[str, Any], name: str) -> bytes:
    text = item.get(name, "")
    if not isinstance(text, str):
        raise MalformedAnswer(f"{name} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedAnswer(f"{name} is not valid base64") from None


def _int(item: Mapping[str, Any], name: str) -> int:
    """An int64 field: a decimal string (or a JSON number), absent meaning 0."""
    value = item.get(name, 0)
    if isinstance(value, bool):
        raise MalformedAnswer(f"{name} is not a number")
    if isinstance(value, str):
        if _INT64_TEXT.fullmatch(value) is None:
            raise MalformedAnswer(f"{name} is not a number: {value[:30]!r}")
        value = int(value)
    if not isinstance(value, int) or not -_MAX_INT64 <= value <= _MAX_INT64:
        raise MalformedAnswer(f"{name} is not an int64")
    return value

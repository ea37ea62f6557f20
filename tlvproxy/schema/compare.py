"""Comparing two answers decoded field by field: a command's and its mirror's
(docs/configuration.md "mirror").

Owns: decoding both response bodies with their commands' codecs and naming
every field whose value differs, with its path (`nickname`, `tags[2]`,
`items[0].price`, `labels[*]`), and the values only for a caller that asks.
Must not: do I/O, import trio, count or log; `server/traffic.py` does, with
the `Comparison` returned here.

Decisions made here:
- Two protobuf answers are compared as messages: fields of the same name are
  compared, whatever the two message types; a field only one type has differs
  when it holds a value there. Repeated fields are compared element by element
  (`tags[3]` when one list is longer), maps key by key, in key order. A field
  left unset reads its default value, as the proto3 JSON mapping writes it,
  unless it has presence (a message, a oneof member, a proto3 `optional`): then unset
  differs from set to the default, as the JSON mapping tells them apart.
- Map keys are values (a user id, say): a path shows them as `[*]` unless the
  values are shown too, so that a log line of paths carries no user data.
- Any other pair (json, raw, or a protobuf answer against a json one) is
  compared as the JSON values the codecs decode: objects key by key, arrays
  element by element; a raw body is one value, `(body)`. An object key that
  does not read as a field name (`12345`, `a@b.c`) is a value too: `[*]`.
- Different statuses are one difference, `(status)`; equal statuses compare
  the bodies. Bodies equal byte for byte, read through one message type (or
  both json, or both raw), are the same without being decoded.
- At most `limit` paths are named; `more` counts the others.
- The walk is an explicit stack of cursors, one per message, object or list
  being compared, each yielding one comparison at a time, so that `step`
  stops after its budget whatever the size of one field; a map's keys are
  gathered a few per unit of budget, then taken in order off a heap.
"""

from __future__ import annotations

import base64
import json
import math
import re
from heapq import heapify, heappop
from itertools import chain
from typing import TYPE_CHECKING, Any, Final

import attrs
from google.protobuf.message import DecodeError, Message

from tlvproxy.errors import UpstreamProtocolError
from tlvproxy.schema.codec import ProtobufCodec

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from google.protobuf.descriptor import FieldDescriptor

    from tlvproxy.schema.codec import CommandCodec

MAX_PATHS: Final = 20
# How much of one value a path shown with its values carries.
MAX_SHOWN: Final = 100
STATUS_PATH: Final = "(status)"
BODY_PATH: Final = "(body)"
_ELIDED_KEY: Final = "[*]"
# Map keys gathered for one unit of a step's budget: gathering a key costs a
# small share of comparing a field.
_KEYS_PER_PAUSE: Final = 16
_PLAIN_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# One comparison to make: a path and both values, and whether they are known
# to differ already (a field or an element one side lacks).
_Item = tuple[str, Any, Any, bool]


@attrs.frozen(slots=True)
class Difference:
    """One field that differs: its path, and both values (as short text) when
    the comparison was asked to show them, else None."""

    path: str
    left: str | None = None
    right: str | None = None


@attrs.frozen(slots=True)
class Comparison:
    """The outcome of comparing two answers: the differing fields (empty: the
    same), and how many more differ beyond those named."""

    differences: tuple[Difference, ...]
    more: int = 0

    @property
    def same(self) -> bool:
        return not self.differences


class _Collector:
    """The differences found, deduplicated, up to `limit` named."""

    def __init__(self, limit: int, show: bool) -> None:
        self.limit = limit
        self.show = show
        self.found: dict[str, Difference] = {}
        self.more = 0

    def add(self, path: str, left: object, right: object) -> None:
        path = path or BODY_PATH
        if path in self.found:
            return
        if len(self.found) >= self.limit:
            self.more += 1
            return
        if self.show:
            self.found[path] = Difference(path, _shown(left), _shown(right))
        else:
            self.found[path] = Difference(path)

    def result(self) -> Comparison:
        return Comparison(tuple(self.found.values()), self.more)


class Comparer:
    """Two answers, each (its command's codec, status, body), compared a step
    at a time: `step` walks at most `budget` fields, elements or map keys and
    returns the `Comparison` once done, so that a caller can let others run
    between steps (a large answer is many fields: a million elements of one
    packed field fit in 1 MiB). No step reads ahead of its budget: a field's
    elements are taken one at a time when its turn comes. Building it
    decodes both bodies (for protobuf, a few milliseconds per MiB).

    Raises UpstreamProtocolError when a body does not decode with its codec.
    """

    __slots__ = ("_found", "_messages", "_show", "_stack", "spent")

    def __init__(
        self,
        left: tuple[CommandCodec, int, bytes],
        right: tuple[CommandCodec, int, bytes],
        *,
        show_values: bool = False,
        limit: int = MAX_PATHS,
    ) -> None:
        (left_codec, left_status, left_body), (right_codec, right_status, right_body) = left, right
        self._found = _Collector(limit, show_values)
        self._show = show_values
        self.spent = 0  # the budget the steps have used so far
        # The walk's cursors, innermost last: each yields the comparisons of
        # one message, object or list, one at a time, when its turn comes (or
        # None for a share of its own work done, such as gathering map keys).
        self._stack: list[Iterator[_Item | None]] = []
        self._messages = isinstance(left_codec, ProtobufCodec) and isinstance(
            right_codec, ProtobufCodec
        )
        if left_status != right_status:
            self._found.add(STATUS_PATH, left_status, right_status)
        elif left_body == right_body and _read_alike(left_codec, right_codec):
            pass  # the usual case once the services agree: nothing to decode
        elif isinstance(left_codec, ProtobufCodec) and isinstance(right_codec, ProtobufCodec):
            parsed = (_parse(left_codec, left_body), _parse(right_codec, right_body))
            self._stack.append(iter([("", *parsed, False)]))
        else:
            decoded = (
                left_codec.decode_response(left_body),
                right_codec.decode_response(right_body),
            )
            self._stack.append(iter([("", *decoded, False)]))

    def step(self, budget: int) -> Comparison | None:
        """Compare up to `budget` more fields or elements; the outcome once
        everything is compared, else None."""
        # An explicit stack of cursors, not recursion (the walk's depth is the
        # answer's), taken in document order: a message's fields, each before
        # the next. A cursor yields one comparison at a time, so a field of a
        # million elements costs nothing until its turn, then `budget` at a time.
        stack, found, show, messages = self._stack, self._found, self._show, self._messages
        start = budget
        while stack and budget > 0:
            try:
                item = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            budget -= 1
            if item is None:
                continue
            path, a, b, differs = item
            if differs:
                found.add(path, a, b)
            elif messages and isinstance(a, Message) and isinstance(b, Message):
                stack.append(_message_items(path, a, b, show))
            elif not messages and isinstance(a, dict) and isinstance(b, dict):
                stack.append(_member_items(path, a, b, show))
            elif not messages and isinstance(a, list) and isinstance(b, list):
                stack.append(_element_items(path, a, b))
            elif not _equal(a, b):
                found.add(path, a, b)
        self.spent += start - budget
        return None if stack else found.result()


def compare_answers(
    left: tuple[CommandCodec, int, bytes],
    right: tuple[CommandCodec, int, bytes],
    *,
    show_values: bool = False,
    limit: int = MAX_PATHS,
) -> Comparison:
    """Compare two answers, each (its command's codec, status, body), at once.

    Raises UpstreamProtocolError when a body does not decode with its codec.
    """
    comparer = Comparer(left, right, show_values=show_values, limit=limit)
    while (comparison := comparer.step(1 << 20)) is None:
        pass
    return comparison


def _read_alike(a: CommandCodec, b: CommandCodec) -> bool:
    """Whether the same body reads the same through both codecs: one message
    type, or both json, or both raw."""
    if isinstance(a, ProtobufCodec) and isinstance(b, ProtobufCodec):
        return a.response.DESCRIPTOR.full_name == b.response.DESCRIPTOR.full_name
    return type(a) is type(b) and not isinstance(a, ProtobufCodec)


def _parse(codec: ProtobufCodec, body: bytes) -> Message:
    try:
        return codec.response.FromString(body)
    except DecodeError as exc:
        raise UpstreamProtocolError(
            f"{codec.command}: the upstream's body is not a valid "
            f"{codec.response.DESCRIPTOR.full_name}: {exc}"
        ) from None


# ---------------------------------------------------------------- protobuf


def _message_items(path: str, a: Message, b: Message, show: bool) -> Iterator[_Item | None]:
    """The comparisons two messages' fields make, in field order, one at a time."""
    a_fields: Mapping[str, Any] = a.DESCRIPTOR.fields_by_name
    b_fields: Mapping[str, Any] = b.DESCRIPTOR.fields_by_name
    for name in [*a_fields, *(name for name in b_fields if name not in a_fields)]:
        field_path = f"{path}.{name}" if path else name
        fa, fb = a_fields.get(name), b_fields.get(name)
        va: Any = None if fa is None else _field_value(a, fa)
        vb: Any = None if fb is None else _field_value(b, fb)
        if fa is None or fb is None:
            # A field of one message type only: a difference when it holds something.
            present, value = (fa, va) if fb is None else (fb, vb)
            if present is not None and not _empty(present, value):
                yield (field_path, va, vb, True)
        elif _is_map(fa) != _is_map(fb):
            if not (_empty(fa, va) and _empty(fb, vb)):
                yield (field_path, va, vb, True)
        elif _is_map(fa):
            yield from _map_items(field_path, va, vb, show)
        elif fa.is_repeated and fb.is_repeated:
            for index in range(max(len(va), len(vb))):
                beyond = index >= len(va) or index >= len(vb)
                yield (f"{field_path}[{index}]", _item(va, index), _item(vb, index), beyond)
        else:
            yield (field_path, va, vb, False)


def _map_items(path: str, a: Any, b: Any, show: bool) -> Iterator[_Item | None]:
    """The comparisons two protobuf maps make, one per key, in key order (a
    protobuf map's order is not the wire's, nor stable). The keys are gathered
    a few at a time first (a None for each few: work done, nothing compared),
    then taken in order off a heap, one at a time, never all sorted at once."""
    keys: set[Any] = set()
    for count, key in enumerate(chain(a, b), 1):
        keys.add(key)
        if count % _KEYS_PER_PAUSE == 0:
            yield None
    ordered = list(keys)
    heapify(ordered)
    while ordered:
        key = heappop(ordered)
        item_path = f"{path}[{_key_text(key)}]" if show else path + _ELIDED_KEY
        # `get`, never `[key]`, which inserts a missing key into a protobuf map.
        yield (item_path, a.get(key), b.get(key), key not in a or key not in b)


def _field_value(message: Message, field: FieldDescriptor) -> Any:
    """The field's value: a list, a map, a message or a scalar; None for a
    field with presence (a message, a oneof member, a proto3 `optional`) that
    is unset, which the JSON mapping leaves out where it writes a default."""
    if field.has_presence and not message.HasField(field.name):
        return None
    return getattr(message, field.name)


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def _empty(field: FieldDescriptor, value: Any) -> bool:
    """Whether `field` holds nothing the JSON mapping would write: unset when
    it has presence, else its default (an empty list or map included)."""
    if field.has_presence or value is None:
        return value is None
    if field.is_repeated:
        return len(value) == 0
    return not value


def _item(values: Any, index: int) -> Any:
    return values[index] if index < len(values) else None


def _key_text(key: object) -> str:
    return _shown(key) or ""


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return (bool(a == b) and type(a) is type(b)) or _same_number(a, b)


def _same_number(a: Any, b: Any) -> bool:
    """An int and a float of the same value (int32 against double, say) are equal;
    a bool is no number here."""
    numbers = (int, float)
    return (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


# ---------------------------------------------------------------- JSON values


def _member_items(path: str, a: dict[str, Any], b: dict[str, Any], show: bool) -> Iterator[_Item]:
    """The comparisons two JSON objects' members make, in key order of `a`,
    then `b`, one at a time."""
    for key in a:
        yield (_member_path(path, key, show), a[key], b.get(key), key not in b)
    for key in b:
        if key not in a:
            yield (_member_path(path, key, show), None, b[key], True)


def _element_items(path: str, a: list[Any], b: list[Any]) -> Iterator[_Item]:
    """The comparisons two JSON arrays' elements make, in order, one at a time."""
    for index in range(max(len(a), len(b))):
        beyond = index >= len(a) or index >= len(b)
        yield (f"{path}[{index}]", _item(a, index), _item(b, index), beyond)


def _member_path(path: str, key: str, show: bool) -> str:
    """A JSON object member's path: `.name` for a key that reads as a field
    name, else the key in brackets, or `[*]` when values are not shown (a key
    like `12345` or `a@b.c` is more likely a value than a name)."""
    if _PLAIN_NAME.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key[:64])}]" if show else path + _ELIDED_KEY


# ---------------------------------------------------------------- shown values


def _shown(value: object) -> str | None:
    """A value as short text for a log line; None for an absent one."""
    if value is None:
        return None
    if isinstance(value, Message):
        text = "{" + value.DESCRIPTOR.full_name + "}"
    elif isinstance(value, bytes):
        text = base64.b64encode(value[:MAX_SHOWN]).decode("ascii")
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except ValueError:  # a circular value cannot come from a decoder; NaN is written
            text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."

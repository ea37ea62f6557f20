"""The least size of a decoded message's JSON form (docs/reference.md "Answers
too large to render").

Owns: per message type, under one set of `json` options, a function that gives
a lower bound on the bytes of the compact JSON the codec writes for a message,
read off the decoded message before any JSON is built. It reads the lengths of
repeated and map fields and multiplies them by the least size of an element,
so a body of half a million empty elements is known to be too large at the
cost of a `len()`; it walks into elements only of types that can hold
containers or messages themselves.
Must not: do I/O, render anything, or decide the bound (the codec does).

A lower bound, so that no answer is refused that would fit: string contents,
numbers' digits and fields that are set are counted at their least (or not
at all), which only makes the estimate smaller. Well-known types count as one
byte: their JSON forms are not amplified by their structure.

One exception, by design: each message in a repeated or map field counts as
at least `OBJECT_WEIGHT` bytes, whatever its JSON. Building the JSON value of
a message costs a Python dict (about 140 bytes for an empty one, with its
share of the list and the protobuf wrapper), so half a million empty messages
(`{}`, 1.5 MB of JSON from a 1 MiB body) would cost ~70 MiB to build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from google.protobuf.descriptor import FieldDescriptor

from tlvproxy.schema.protojson import WELL_KNOWN

if TYPE_CHECKING:
    from collections.abc import Callable

    from google.protobuf.descriptor import Descriptor
    from google.protobuf.message import Message

    from tlvproxy.config.model import JsonOptions

    # sizer(message, limit): a lower bound on the size of `message` as JSON; it
    # may stop counting once the bound is over `limit`.
    Sizer = Callable[[Message, int], int]

_T = FieldDescriptor
_INT64: Final = (_T.CPPTYPE_INT64, _T.CPPTYPE_UINT64)
# The least a message in a repeated or map field counts for (see above).
OBJECT_WEIGHT: Final = 64


def _least_scalar(field: FieldDescriptor) -> int:
    """The fewest bytes one value of a scalar field can render to."""
    cpp = field.cpp_type
    if cpp in _INT64:
        return 3  # "0": 64-bit integers are strings
    if cpp == _T.CPPTYPE_BOOL:
        return 4  # true
    if cpp == _T.CPPTYPE_STRING:
        return 2  # "" (bytes too, as base64)
    return 1  # a digit; an enum by number or by a name of one letter at least


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


class Sizers:
    """The sizers of one schema's message types under one set of `json` options;
    `object_weight` is the least each message in a repeated or map field counts
    for (0: the sizers bound the JSON's length alone)."""

    def __init__(self, options: JsonOptions, *, object_weight: int = OBJECT_WEIGHT) -> None:
        self._object_weight = object_weight
        self._emit_defaults = options.emit_defaults
        self._proto_names = options.field_names == "proto"
        self._least: dict[str, int] = {}
        self._sizers: dict[str, Sizer | None] = {}
        self._per_byte: dict[str, int] = {}

    def least(self, descriptor: Descriptor) -> int:
        """The fewest bytes any message of this type renders to."""
        name = descriptor.full_name
        size = self._least.get(name)
        if size is None:
            size = self._least[name] = self._compute_least(descriptor)
        return size

    def _compute_least(self, descriptor: Descriptor) -> int:
        if descriptor.full_name in WELL_KNOWN:
            return 1  # 0, "", null, ... (an Int32Value is a bare number)
        if not self._emit_defaults:
            return 2  # {}: only fields that are set are written
        # With emit_defaults every field without presence is written, at least
        # as its default (the fields with presence, messages included, may be absent).
        members = [
            self._key(field) + (2 if field.is_repeated else _least_scalar(field))
            for field in descriptor.fields
            if not field.has_presence
        ]
        return 2 + sum(members) + max(len(members) - 1, 0)

    def _element(self, descriptor: Descriptor) -> int:
        """The least a message of this type counts for in a repeated or map field."""
        return max(self.least(descriptor), self._object_weight)

    def _key(self, field: FieldDescriptor) -> int:
        """`"name":` as written: field names are ASCII identifiers."""
        return len(field.name if self._proto_names else field.json_name) + 3

    def per_byte(self, descriptor: Descriptor) -> int:
        """The most a sizer of this type counts per byte of body beyond the
        type's least: `sizer(message, limit) <= least + per_byte * len(body)`
        for any body, so that the codec need not run it on a small one.

        What the sizer adds comes with bytes of the body: an element of a
        repeated field takes a byte at least (a packed number), an element
        that is a message or a map entry two (a tag and a length), a message
        field that is set two, and each counts at most its least and a comma,
        plus the key and brackets of its field once. A message's own fields
        count in its own bytes, the same way: so the most over the types the
        body can hold is a bound for all of them.
        """
        known = self._per_byte
        name = descriptor.full_name
        if name in known:
            return known[name]
        emit = self._emit_defaults
        most = 1
        seen: set[str] = set()
        todo = [descriptor]
        while todo:
            current = todo.pop()
            if current.full_name in seen or current.full_name in WELL_KNOWN:
                continue
            seen.add(current.full_name)
            if current.full_name in known:
                # Already the most over every type that one can hold.
                most = max(most, known[current.full_name])
                continue
            for field in current.fields:
                shown = 0 if emit else self._key(field) + 2
                entry = field.message_type
                if _is_map(field):
                    assert entry is not None  # a map field
                    value = entry.fields_by_name["value"]
                    least = _least_scalar(value)
                    if value.message_type is not None:
                        least = self._element(value.message_type)
                        todo.append(value.message_type)
                    counted, taken = shown + 3 + least + 1, 2
                elif field.is_repeated and entry is None:
                    counted, taken = shown + _least_scalar(field) + 1, 1
                elif field.is_repeated:
                    assert entry is not None  # a repeated message field
                    counted, taken = shown + self._element(entry) + 1, 2
                    todo.append(entry)
                elif entry is not None:
                    counted, taken = self._key(field) + self.least(entry), 2
                    todo.append(entry)
                else:
                    continue
                most = max(most, -(-counted // taken))
        known[name] = most
        return most

    def sizer(self, descriptor: Descriptor) -> Sizer | None:
        """The sizer of this type; None when it has no repeated, map or message
        field, so that its JSON cannot outgrow its body by structure."""
        name = descriptor.full_name
        if name not in self._sizers:
            self._sizers[name] = None  # a recursive type finds itself through _lazy
            self._sizers[name] = self._build(descriptor)
        return self._sizers[name]

    def _lazy(self, descriptor: Descriptor) -> Sizer | None:
        """`sizer(descriptor)`, looked up on first use (recursive types)."""
        if not self._grows(descriptor):
            return None
        built: list[Sizer | None] = []

        def size(message: Message, limit: int) -> int:
            if not built:
                built.append(self.sizer(descriptor))
            sizer = built[0]
            return self.least(descriptor) if sizer is None else sizer(message, limit)

        return size

    @staticmethod
    def _grows(descriptor: Descriptor) -> bool:
        return descriptor.full_name not in WELL_KNOWN and any(
            field.is_repeated or field.message_type is not None for field in descriptor.fields
        )

    def _build(self, descriptor: Descriptor) -> Sizer | None:
        if not self._grows(descriptor):
            return None
        emit = self._emit_defaults
        # (attribute, is a map, least size of an element, added once when it is
        # not empty, the elements' sizer or None)
        containers: list[tuple[str, bool, int, int, Sizer | None]] = []
        # (attribute, added when it is set (its key), least size of the value,
        # its sizer or None)
        singles: list[tuple[str, int, int, Sizer | None]] = []
        for field in descriptor.fields:
            # Without emit_defaults a container is written only when it is not
            # empty: its key and brackets count then.
            shown = 0 if emit else self._key(field) + 2
            if _is_map(field):
                entry = field.message_type
                assert entry is not None  # a map field
                value = entry.fields_by_name["value"]
                least, sub = _least_scalar(value), None
                if value.message_type is not None:
                    least, sub = self._element(value.message_type), self._lazy(value.message_type)
                # "":V at least: a map's keys are strings in JSON.
                containers.append((field.name, True, 3 + least, shown, sub))
            elif field.is_repeated:
                entry = field.message_type
                if entry is None:
                    containers.append((field.name, False, _least_scalar(field), shown, None))
                else:
                    containers.append(
                        (field.name, False, self._element(entry), shown, self._lazy(entry))
                    )
            elif field.message_type is not None:
                entry = field.message_type
                singles.append((field.name, self._key(field), self.least(entry), self._lazy(entry)))
        least_here = self.least(descriptor)

        def size(message: Message, limit: int) -> int:
            total = least_here
            for attr, is_map, least, shown, sub in containers:
                values = getattr(message, attr)
                count = len(values)
                if not count:
                    continue
                # The elements at their least, and the commas between them.
                total += shown + count * (least + 1) - 1
                if total > limit:
                    return total
                if sub is not None:
                    # An element's own bound may be below its weight: the least
                    # counted already stands then.
                    for element in values.values() if is_map else values:
                        more = sub(element, limit) - least
                        if more > 0:
                            total += more
                            if total > limit:
                                return total
            for attr, shown, least, sub in singles:
                if message.HasField(attr):
                    total += shown + (least if sub is None else sub(getattr(message, attr), limit))
                    if total > limit:
                        return total
            return total

        return size

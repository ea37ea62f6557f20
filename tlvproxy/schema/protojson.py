"""The vocabulary shared by the protobuf <-> proto3 JSON converters
(docs/configuration.md "json"): the well-known types, integer ranges, the
reference writer (json_format), and `Fallback`, which a fast reader raises for
anything but the plain accepted case.

Owns: those constants and helpers. The converters themselves are to_json.py
(writers) and from_json.py (readers), put together per set of options by
convert.py.
Must not: do I/O or write error messages.
"""

from __future__ import annotations

import base64
import keyword
import re
from typing import TYPE_CHECKING, Any, Final, cast

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message import Message

    from tlvproxy.config.model import JsonOptions

    Writer = Callable[[Message], Any]
    Merge = Callable[[object, Message, int], None]
    Overlay = Callable[[Message, Mapping[str, str]], None]
    Step = Callable[[Message, dict[str, Any]], None]
    SetField = Callable[[Message, Any, int], None]
    SetText = Callable[[Message, str], None]
    Convert = Callable[[Any], Any]
    Function = Callable[..., Any]

# Same bound as json_format's max_recursion_depth: deeper bodies are refused
# rather than risking Python's recursion limit on recursive message types.
MAX_DEPTH: Final = 100

# Messages whose JSON form is not an object of their fields (proto3 JSON mapping).
WELL_KNOWN: Final = frozenset(
    "google.protobuf." + name
    for name in (
        "Any",
        "Duration",
        "FieldMask",
        "Timestamp",
        "Struct",
        "Value",
        "ListValue",
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
)

T = FieldDescriptor
INT_RANGES: Final = {
    T.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    T.CPPTYPE_UINT32: (0, 2**32 - 1),
    T.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    T.CPPTYPE_UINT64: (0, 2**64 - 1),
}
# The smallest magnitude that rounds to infinity as a float32 (halfway between
# the largest float32 and 2**128; ties go to the even 2**128). json_format prints
# the largest float32 as 3.4028235e+38, above it, and must read back.
FLOAT32_LIMIT: Final = float(2**128 - 2**103)
INTEGER_TEXT: Final = re.compile(r"-?[0-9]+")


# What ParseDict raises on bad input: json_format.Parse wraps any exception of
# ParseDict in ParseError, but ParseDict itself lets some through (a wrapper
# type given "x" raises ValueError from int(), a Struct given an integer of
# 400 digits OverflowError from float()).
PARSE_DICT_ERRORS: Final = (
    json_format.ParseError,
    ValueError,
    TypeError,
    AttributeError,
    OverflowError,
)


class Fallback(Exception):
    """The fast reader cannot vouch for this input; run the generic reader."""


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional. Raises ValueError."""
    padded = text + "=" * (-len(text) % 4)
    if "-" in text or "_" in text:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    return base64.b64decode(padded, validate=True)


def json_format_writer(options: JsonOptions, pool: DescriptorPool) -> Writer:
    """The reference writer: `json_format.MessageToDict` with the options' flags."""
    emit_defaults = options.emit_defaults
    proto_names = options.field_names == "proto"
    enum_numbers = options.enums == "number"

    def write(message: Message) -> Any:
        return json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=emit_defaults,
            preserving_proto_field_name=proto_names,
            use_integers_for_enums=enum_numbers,
            descriptor_pool=pool,
        )

    return write


def is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def is_real_oneof_member(field: FieldDescriptor) -> bool:
    # A proto3 `optional` field sits in a one-member synthetic oneof.
    oneof = field.containing_oneof
    return oneof is not None and not (len(oneof.fields) == 1 and oneof.name == f"_{field.name}")


def _plain_name(attr: str) -> bool:
    """Whether generated source may write `attr` as it is, after a dot."""
    return attr.isascii() and attr.isidentifier() and not keyword.iskeyword(attr)


class GeneratedSource:
    """The source of one generated converter function, as attrs and
    dataclasses generate `__init__`: a field's work is a few lines of one
    function, where a closure per field costs a call each.

    The source holds only what it makes itself: names, Python literals and
    field names that are plain ASCII identifiers; every other object is passed
    in its namespace, through `name` or `later`.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._namespace: dict[str, object] = {}

    def name(self, value: object) -> str:
        """A name the source can use for `value`."""
        name = f"_{len(self._namespace)}"
        self._namespace[name] = value
        return name

    def later(self, resolve: Callable[[], Function]) -> str:
        """A name for a function known only when it is first called (a nested
        type's converter, which may be this one's): that call resolves it and
        rebinds the name, so that later calls go straight to it."""
        namespace = self._namespace
        name = f"_{len(namespace)}"

        def first(*args: Any) -> Any:
            function = namespace[name] = resolve()
            return function(*args)

        namespace[name] = first
        return name

    @staticmethod
    def attribute(target: str, attr: str) -> str:
        """The expression reading field `attr` of `target`."""
        if _plain_name(attr):
            return f"{target}.{attr}"
        return f"getattr({target}, {attr!r})"

    @staticmethod
    def assignment(target: str, attr: str, value: str) -> str:
        """The statement setting field `attr` of `target` to `value`."""
        if _plain_name(attr):
            return f"{target}.{attr} = {value}"
        return f"setattr({target}, {attr!r}, {value})"

    def compile(self, signature: str, label: str) -> Function:
        """`def signature:` with the lines as its body (indented here)."""
        text = "\n".join([f"def {signature}:", *(f"    {line}" for line in self.lines)])
        # The namespace is the function's globals: `later` rebinds its names there.
        exec(compile(text, f"<tlvproxy {label}>", "exec"), self._namespace)
        name = signature.partition("(")[0]
        return cast("Function", self._namespace[name])

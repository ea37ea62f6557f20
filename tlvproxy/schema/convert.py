"""Protobuf <-> proto3 JSON converters specialised per message type
(docs/configuration.md "json"), for one set of `json` options.

Owns: `Converters`, the writers (to_json.py) and fast readers (from_json.py)
of one schema put together, built when a codec is made, so a request runs
functions generated per message type instead of walking the descriptors
(json_format costs ~35 us a round trip). The
codec's generic reader is the reference for the readers: one that meets
anything but the plain accepted case raises `Fallback`, and the codec runs
the generic reader over a fresh message, which then builds the message or
raises the BadRequest naming the field.
Must not: do I/O, write error messages, or decide what input is valid.

Well-known types (Timestamp, Struct, wrappers, ...) go through json_format for
that field, both ways. Converters for nested messages are built on first use and
then kept, so loading a table with deep message chains stays cheap and a
recursive message type needs no special case.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlvproxy.schema.from_json import Readers
from tlvproxy.schema.protojson import (
    INT_RANGES,
    PARSE_DICT_ERRORS,
    Fallback,
    json_format_writer,
)
from tlvproxy.schema.sizing import Sizers
from tlvproxy.schema.to_json import Writers

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor
    from google.protobuf.descriptor_pool import DescriptorPool

    from tlvproxy.config.model import JsonOptions
    from tlvproxy.schema.protojson import Merge, Overlay, Writer

__all__ = [
    "INT_RANGES",
    "PARSE_DICT_ERRORS",
    "Converters",
    "Fallback",
    "json_format_writer",
]


class Converters:
    """The writers, fast readers and sizers of one schema under one set of `json` options.

    `writer`, `reader` and `overlay` return the converter for a message type,
    building and keeping it (and, on first use, those of its nested types).
    """

    def __init__(self, options: JsonOptions, pool: DescriptorPool) -> None:
        self.options = options
        self._writers = Writers(options, pool)
        self._readers = Readers(options, pool)
        # What bounds an answer's JSON before it is written (sizing.py).
        self.sizers = Sizers(options)

    def writer(self, descriptor: Descriptor) -> Writer:
        """message -> its JSON value, as json_format.MessageToDict gives it."""
        return self._writers.writer(descriptor)

    def reader(self, descriptor: Descriptor) -> Merge:
        """merge(value, message, depth): merge a JSON value into `message`, a
        `descriptor` message at nesting `depth`. Raises Fallback."""
        return self._readers.reader(descriptor)

    def overlay(self, descriptor: Descriptor) -> Overlay:
        """overlay(message, values): set top-level fields from strings (query,
        path, `fields`), ignoring names that are not fields. Raises Fallback."""
        return self._readers.overlay(descriptor)

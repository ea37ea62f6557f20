"""A table and what is built from it when it loads (docs/configuration.md).

Owns: `CompiledTable`, the `Table` (plain values, model.py) with the compiled
schema, a codec per command, the router and the TLS certificates, which the
loader builds once per table and the servers only use. The model knows
neither routing nor codecs; this module is where the two meet.
Must not: parse YAML or do I/O: the loader does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from tlvproxy.config.model import Table

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.certificates import ServerCertificates
    from tlvproxy.routing import Router
    from tlvproxy.schema.codec import CommandCodec
    from tlvproxy.schema.protos import Schema


@attrs.frozen(kw_only=True)
class CompiledTable(Table):
    """A loaded table: its configuration, and the schema, codecs, router and
    certificates built from it. A reload builds a new one; nothing is mutated."""

    schema: Schema
    codecs: Mapping[str, CommandCodec]
    router: Router
    # The `tls` certificates, read from their files when the table is loaded.
    certificates: ServerCertificates | None = attrs.field(default=None, eq=False)

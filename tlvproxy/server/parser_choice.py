"""Which request parser a connection gets (docs/configuration.md "http_parser").

Owns: what `http_parser: auto` means, and making a parser of the chosen kind.
It imports the two parsers; they import parsers.py, the events and limits they
share, and never this module.
Must not: parse anything itself.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tlvproxy.server.parsers import ParserName, RequestParser


def resolve_parser_name(name: Literal["auto", "h11", "httptools"]) -> ParserName:
    """The parser `http_parser: NAME` means: auto is httptools when importable."""
    if name != "auto":
        return name
    return "httptools" if importable_httptools() else "h11"


def importable_httptools() -> bool:
    """True when the httptools package can be imported."""
    return importlib.util.find_spec("httptools") is not None


def new_parser(name: ParserName, *, max_header_bytes: int, max_body: int) -> RequestParser:
    """A fresh parser for one connection, enforcing the given limits."""
    if name == "httptools":
        # Imported when chosen: httptools is optional (docs/configuration.md).
        from tlvproxy.server.httptools_parser import HttptoolsParser

        return HttptoolsParser(max_header_bytes=max_header_bytes, max_body=max_body)
    from tlvproxy.server.h11_parser import H11Parser

    return H11Parser(max_header_bytes=max_header_bytes, max_body=max_body)

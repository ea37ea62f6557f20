"""The chunked request body decoder that both request parsers share.

Owns: the chunked transfer coding of a request body (docs/reference.md
"Limits"): chunk-size lines with their extensions, chunk data, the trailer
section, the limits on each, and the body itself, joined into one buffer as it
arrives. Sharing it is what makes h11 and httptools accept and refuse the same
chunked bodies.
Must not: import trio, do I/O or keep a list of pieces: a body in one-byte
chunks must cost what the same body with Content-Length costs.

Grammar (RFC 9112 7.1, without its optional whitespace): a chunk-size line is
1 to 16 hex digits, then any number of `;name` or `;name=value` extensions
(token names; token or quoted-string values), then CRLF, and at most
`MAX_CHUNK_LINE` bytes in all. Chunk data is followed by CRLF. The last chunk
(size 0) is followed by trailer fields, which are checked like header lines and
dropped, and a blank line; the trailer section counts against
`max_header_bytes`. Bare CR or LF anywhere, and a folded trailer line, are
malformed.
"""

from __future__ import annotations

import re

from tlvproxy.errors import BadRequest, HeadersTooLarge, PayloadTooLarge

# The longest chunk-size line, extensions and CRLF included.
MAX_CHUNK_LINE = 4096

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*\r\n"
)
# A header or trailer line: no whitespace before the colon, no control
# character but HTAB in the value, CRLF only.
FIELD_LINE = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n"
_FIELD_LINE = re.compile(FIELD_LINE)

# Chunk data shorter than this is copied through a slice; longer, through a
# memoryview, which saves the intermediate copy.
_SMALL = 1024

# Where the decoder is.
_SIZE = 0  # expecting a chunk-size line
_DATA = 1  # inside a chunk's data
_DATA_END = 2  # expecting the CRLF after a chunk's data
_TRAILER = 3  # expecting a trailer line or the blank line that ends the body
_DONE = 4


def _line_too_long() -> BadRequest:
    return BadRequest(f"malformed HTTP request: a chunk-size line is over {MAX_CHUNK_LINE} bytes")


class ChunkedBody:
    """Decodes one chunked body from the bytes of a connection.

    `consume(data, start)` decodes what it can from `data[start:]` and returns
    the offset of the first byte it did not use: the end of the body once `done`,
    else the start of an incomplete line, which the caller keeps and hands back
    with more bytes after it. The body so far is `body`.
    Errors: BadRequest (malformed), PayloadTooLarge (a chunk that would take the
    body over `max_body`, refused as soon as its size line is read),
    HeadersTooLarge (a trailer section over `max_trailer_bytes`).
    """

    __slots__ = ("_left", "_max_body", "_max_trailer_bytes", "_state", "_trailer_bytes", "body")

    def __init__(self, *, max_body: int, max_trailer_bytes: int) -> None:
        self.body = bytearray()
        self._max_body = max_body
        self._max_trailer_bytes = max_trailer_bytes
        self._state = _SIZE
        self._left = 0  # data bytes of the current chunk still to come
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        """True once the blank line after the last chunk has been read."""
        return self._state == _DONE

    def consume(self, data: bytes, start: int) -> int:
        """Decode from `data[start:]`; the offset of the first byte not used."""
        body = self.body
        max_body = self._max_body
        state = self._state
        end = len(data)
        pos = start
        view = None  # made for the first large piece of data, to copy it once
        try:
            while pos < end:
                if state == _SIZE:
                    match = _CHUNK_LINE.match(data, pos)
                    if match is None:
                        # Not a whole valid line: malformed, too long, or not all here.
                        if data.find(b"\n", pos, pos + MAX_CHUNK_LINE) >= 0:
                            raise BadRequest("malformed HTTP request: invalid chunk-size line")
                        if end - pos >= MAX_CHUNK_LINE:
                            raise _line_too_long()
                        break
                    line_end = match.end()
                    if line_end - pos > MAX_CHUNK_LINE:
                        raise _line_too_long()
                    size = int(match[1], 16)
                    if not size:
                        state = _TRAILER
                        pos = line_end
                        continue
                    if len(body) + size > max_body:
                        raise PayloadTooLarge(f"the request body is over {max_body} bytes")
                    data_end = line_end + size
                    if data_end + 2 <= end and size < _SMALL:
                        # The whole chunk is here (the common case for small
                        # chunks): one step, not three.
                        if data[data_end] != 13 or data[data_end + 1] != 10:
                            raise BadRequest("malformed HTTP request: chunk data not ended by CRLF")
                        body += data[line_end:data_end]
                        pos = data_end + 2
                        continue
                    pos = line_end
                    state = _DATA
                    self._left = size
                elif state == _DATA:
                    take = min(self._left, end - pos)
                    if take < _SMALL:
                        body += data[pos : pos + take]
                    else:
                        if view is None:
                            view = memoryview(data)
                        body += view[pos : pos + take]
                    pos += take
                    self._left -= take
                    if self._left:
                        break
                    state = _DATA_END
                elif state == _DATA_END:
                    if end - pos < 2:
                        if data[pos] != 13:  # the CR of the CRLF
                            raise BadRequest("malformed HTTP request: chunk data not ended by CRLF")
                        break
                    if not data.startswith(b"\r\n", pos):
                        raise BadRequest("malformed HTTP request: chunk data not ended by CRLF")
                    pos += 2
                    state = _SIZE
                elif state == _TRAILER:
                    budget = self._max_trailer_bytes - self._trailer_bytes
                    found = data.find(b"\n", pos, pos + budget)
                    if found < 0:
                        if end - pos >= budget:
                            raise HeadersTooLarge(
                                f"the request trailers are over {self._max_trailer_bytes} bytes"
                            )
                        break
                    line_end = found + 1
                    self._trailer_bytes += line_end - pos
                    if line_end - pos == 2 and data[pos] == 13:
                        state = _DONE
                        pos = line_end
                        break
                    if _FIELD_LINE.fullmatch(data, pos, line_end) is None:
                        raise BadRequest("malformed HTTP request: invalid trailer line")
                    pos = line_end
                else:
                    break
        finally:
            self._state = state
        return pos

"""`tlvproxy call`: one request frame to one upstream node, its reply decoded
(docs/protocol.md "The default header").

Owns: turning ADDRESS, COMMAND and JSON into a frame with the table's codec, the
round trip on a single `Connection`, and the JSON printed for the reply.
Must not: balance, retry or keep connections: it talks to exactly the node named.

COMMAND is a name or number from the table (`table.find_command`); a number
that commands of several upstreams share must be given as a name. A number that
the table does not list is still sent: its body is the JSON text as given, and its
reply body is printed as JSON if it parses, else as a base64 string. Deadlines: the
command's `timeout`, else its upstream's, else 3 s; connecting within the upstream's
`connect_timeout`, else 1 s.

Exit status: 0 for a reply with status 0, 1 for a reply with another status,
2 for bad arguments or table, 3 when no reply came (refused, lost, timeout,
malformed frame).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import sys
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from tlvproxy.config.model import Address
from tlvproxy.errors import BadRequest, GatewayError, UpstreamTimeout
from tlvproxy.metrics import Metrics
from tlvproxy.schema.codec import JSON_CONTENT_TYPE
from tlvproxy.upstream.connection import Connection, SendFailed

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.framing import Frame

DEFAULT_TIMEOUT: Final = 3.0
DEFAULT_CONNECT_TIMEOUT: Final = 1.0
EXIT_OK: Final = 0
EXIT_STATUS: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3


def parse_address(text: str) -> Address:
    """HOST:PORT or [V6]:PORT. Raises ValueError saying what is expected."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"write an IPv6 address as [HOST]:PORT, got {text!r}")
    return Address(host, int(port))


@attrs.frozen(kw_only=True)
class CallRequest:
    """What `tlvproxy call` sends: the command (if the table lists it) and the frame."""

    spec: CommandSpec | None
    command: int
    body: bytes
    timeout: float
    connect_timeout: float


def build_request(table: CompiledTable, command: str, json_text: str | None) -> CallRequest:
    """The request for COMMAND and JSON. Raises BadRequest naming what is wrong."""
    spec = table.find_command(command)
    if spec is None:
        try:
            number = int(command, 0)
        except ValueError:
            raise BadRequest(
                f"unknown command {command!r}: neither a name in the table nor a number"
            ) from None
        same = table.commands_with_word(number)
        if len(same) > 1:
            # A word is unique per upstream only (docs/configuration.md "commands").
            named = ", ".join(f"{c.name} (upstream {c.upstream})" for c in same)
            raise BadRequest(f"command {command} is the word of {named}: name one of them")
        if not 0 <= number <= table.framing.field_max("command"):
            raise BadRequest(f"command {command} does not fit the header's command field")
        body = b"" if json_text is None else json_text.encode()
        return CallRequest(
            spec=None,
            command=number,
            body=body,
            timeout=DEFAULT_TIMEOUT,
            connect_timeout=DEFAULT_CONNECT_TIMEOUT,
        )
    if spec.push is not None:
        raise BadRequest(f"{spec.name!r} is a push command: the upstream sends it, not us")
    try:
        value = None if json_text is None else json.loads(json_text)
    except ValueError as exc:
        raise BadRequest(f"the JSON argument is not valid JSON: {exc}") from None
    codec = table.codecs[spec.name]
    body = codec.encode_value({} if value is None and spec.codec == "protobuf" else value)
    upstream = table.upstreams.get(spec.upstream or "")
    timeout = spec.timeout or (upstream.timeout if upstream else DEFAULT_TIMEOUT)
    connect_timeout = upstream.connect_timeout if upstream else DEFAULT_CONNECT_TIMEOUT
    return CallRequest(
        spec=spec, command=spec.command, body=body, timeout=timeout, connect_timeout=connect_timeout
    )


async def call_node(
    table: CompiledTable, address: Address, request: CallRequest, *, uid: int = 0
) -> Frame:
    """Send `request` to `address` on a fresh connection; the response frame.

    Raises UpstreamUnavailable (refused, lost), UpstreamTimeout, UpstreamProtocolError.
    """
    stream: trio.SocketStream | None = None
    with trio.move_on_after(request.connect_timeout):
        try:
            stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise SendFailed(f"{address}: connect failed: {exc.strerror or exc}") from None
    if stream is None:
        raise SendFailed(f"{address}: no connection within {request.connect_timeout:g} s")
    conn = Connection(stream, table.framing, Metrics(), node=str(address), max_in_flight=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            with trio.move_on_after(request.timeout):
                return await conn.request(request.command, request.body, uid)
            raise UpstreamTimeout(f"{address}: no answer within {request.timeout:g} s")
        finally:
            conn.close(SendFailed(f"{address}: the call is over"))


def render_reply(table: CompiledTable, request: CallRequest, frame: Frame) -> dict[str, Any]:
    """The JSON printed for a reply: command, status and the decoded body, which
    for a status-0 reply is the JSON a REST caller gets (defaults included, as
    the table's `json` options say)."""
    body: Any
    if request.spec is not None:
        codec = table.codecs[request.spec.name]
        try:
            if frame.status == 0 and codec.content_type == JSON_CONTENT_TYPE:
                body = json.loads(codec.response_json(frame.body))
            else:
                body = codec.decode_response(frame.body) if frame.body else None
        except GatewayError as exc:
            return {
                "command": request.spec.name,
                "status": frame.status,
                "error": exc.message,
                "body_base64": base64.b64encode(frame.body).decode("ascii"),
            }
        return {"command": request.spec.name, "status": frame.status, "body": body}
    try:
        body = json.loads(frame.body) if frame.body else None
    except ValueError:
        body = base64.b64encode(frame.body).decode("ascii")
    return {"command": f"0x{frame.command:04x}", "status": frame.status, "body": body}


def run_call(
    address_text: str, command: str, json_text: str | None, table_path: Path, *, uid: int = 0
) -> int:
    """The whole `tlvproxy call`: prints the reply as JSON; returns the exit status."""
    from tlvproxy.config.loader import TableError, load_table

    try:
        address = parse_address(address_text)
    except ValueError as exc:
        print(f"tlvproxy call: ADDRESS: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        table = load_table(table_path)
    except TableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    try:
        request = build_request(table, command, json_text)
    except BadRequest as exc:
        print(f"tlvproxy call: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    layout = table.framing
    if uid and not (layout.has("uid") and 0 <= uid <= layout.field_max("uid")):
        print(f"tlvproxy call: --uid {uid} does not fit the header's uid field", file=sys.stderr)
        return EXIT_USAGE
    try:
        frame = trio.run(partial(call_node, table, address, request, uid=uid))
    except GatewayError as exc:
        print(f"tlvproxy call: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(render_reply(table, request, frame), ensure_ascii=False))
    return EXIT_OK if frame.status == 0 else EXIT_STATUS

"""The route listing `tlvproxy check` prints (docs/configuration.md): one row
per command, the traffic rules, the WebSocket endpoint and the push sessions'.

Owns: the shape of that listing.
Must not: read or check a table: it lists one the loader has loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlvproxy.config import traffic

if TYPE_CHECKING:
    from tlvproxy.config.model import Table


def route_lines(table: Table) -> list[str]:
    """The `tlvproxy check` listing: one row per command (REST routes, WebSocket-only
    commands and pushes), then the WebSocket endpoint and the push sessions'."""
    header = ("NAME", "COMMAND", "METHOD", "PATH", "UPSTREAM", "TYPES")
    rows: list[tuple[str, ...]] = [header]
    for command in table.commands:
        if command.push is not None:
            method, path, upstream = "PUSH", "-", "-"
            types = f"-> {command.push or command.codec}"
        else:
            method = command.http.method if command.http else "-"
            path = command.http.path if command.http else "(websocket only)"
            upstream = command.upstream or "-"
            if command.codec == "protobuf":
                types = f"{command.request} -> {command.response}"
            else:
                types = f"{command.codec} -> {command.codec}"
        rows.append((command.name, f"0x{command.command:04x}", method, path, upstream, types))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    ]
    lines.extend(
        f"{command.name}: {traffic.describe(command.traffic)}"
        for command in table.commands
        if command.traffic is not None
    )
    ws = table.websocket
    if ws is not None:
        extras = [f"{ws.mode} mode"]
        if ws.hash_on is not None:
            extras.append(f"hash_on {ws.hash_on}")
        if ws.uid is not None:
            extras.append(f"uid {ws.uid}")
        lines.append(f"websocket: {ws.path} -> upstream {ws.upstream} ({', '.join(extras)})")
    sessions = table.sessions
    if sessions is not None:
        lines.append(
            f"sessions: {sessions.path} -> upstream {sessions.upstream} (SSE and long polling)"
        )
    lines.append(f"{len(table.commands)} commands, table version {table.version}")
    return lines

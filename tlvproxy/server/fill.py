"""What a REST request fills from its key expressions (docs/configuration.md
"Key expressions"): the `fields` values, the numbers read once, the uid.

Owns: reading those values of one request for its command, and the errors
a missing or malformed one answers (400, 403).
Must not: build the frame or know which command the frame is sent as: the
command whose route was called decides what is filled, whatever a split
sends (docs/configuration.md "split").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlvproxy.config.keys import parse_number
from tlvproxy.errors import BadRequest, Forbidden

if TYPE_CHECKING:
    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.server.view import RequestContext


def field_values(command: CommandSpec, context: RequestContext) -> dict[str, str]:
    """The `fields` values present. A field the identity fills must be filled:
    otherwise the caller's own value in the body would stand in for it."""
    values: dict[str, str] = {}
    for field, key in command.fields.items():
        value = key.evaluate(context)
        if value is not None:
            values[field] = value
        elif key.source == "auth":
            raise Forbidden(
                f"the caller's identity has no {key}, which this command's {field} needs"
            )
    return values


def read_numbers(command: CommandSpec, context: RequestContext) -> None:
    """Read the values that fill a number once, normalised, so that every later
    reader (uid, fields, rate-limit keys, hashing) sees the same number
    (docs/configuration.md "Key expressions")."""
    numbers: dict[KeyExpr, str] = {}
    for key in command.numeric_keys:
        text = key.evaluate(context)
        if text:
            try:
                numbers[key] = str(parse_number(key, text))
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
    context.numbers = numbers


def uid_of(command: CommandSpec, context: RequestContext) -> int:
    """The header's uid: the command's `uid` key, read as a number by `read_numbers`."""
    key = command.uid
    if key is None:
        return 0
    text = key.evaluate(context)
    if not text:
        if key.source == "auth":
            raise Forbidden(f"the caller's identity has no {key}, which this command's uid needs")
        return 0
    uid = int(text)
    if uid < 0 or uid > 0xFFFFFFFF:
        raise BadRequest(f"{command.uid}: user id {uid} is out of range (0 to 4294967295)")
    return uid

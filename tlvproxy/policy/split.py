"""Which command a request is sent as, by its command's `split` rules
(docs/configuration.md "split").

Owns: matching a rule against its key's value (`tail`, `values`, `percent`),
the rules' order (the first that matches wins), and the stable hash behind
`percent`, which gives one key the same answer in every worker, every gateway
and after every restart.
Must not: import trio, count, know where a request goes next (the servers
send it), or read a key any other way than `tlvproxy.config.keys.rule_value`,
which REST and WebSocket share.

The stable hash is the first 8 bytes of the BLAKE2b digest of the key's UTF-8
text, read as a big-endian number, modulo 10,000: a key falls in the first
P% when that number is below P x 100. It never uses Python's `hash()`, which
each process seeds at random. The rules hash the key alone, not the command or
the rule, so the same user is in the first 10% of every command split on the
same key, and raising 10 to 20 keeps those users and adds others.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import TYPE_CHECKING, Final

from tlvproxy.config.keys import rule_value
from tlvproxy.config.model import BASIS_POINTS

if TYPE_CHECKING:
    from collections.abc import Container, Sequence

    from tlvproxy.config.keys import KeyExpr, RequestView
    from tlvproxy.config.model import SplitRule

_DIGITS: Final = "0123456789"


def bucket(value: str) -> int:
    """The key's place among 10,000 buckets (0 to 9999), the same in every process."""
    digest = blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BASIS_POINTS


def matches(rule: SplitRule, value: str | None) -> bool:
    """Whether `rule` takes a request whose key reads `value` (None: absent
    or empty, which no rule takes)."""
    if value is None:
        return False
    if rule.tail is not None:
        last = value[-1:]
        return last != "" and last in _DIGITS and int(last) in rule.tail
    if rule.values is not None:
        return value in rule.values
    assert rule.percent is not None  # the loader sets exactly one of the three
    return bucket(value) < rule.percent


def first_match(
    rules: Sequence[SplitRule], view: RequestView, numeric: Container[KeyExpr]
) -> int | None:
    """The index of the first rule of `rules` that takes the request `view` of
    a command whose keys that fill a number are `numeric`, or None when none
    does. Each key reads as `rule_value` reads it: an empty value is absent."""
    for index, rule in enumerate(rules):
        if matches(rule, rule_value(rule.key, view, numeric)):
            return index
    return None

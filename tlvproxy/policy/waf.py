"""The WAF: a table's regex rules -> which rules match a request or message.

Owns: what the rules see of a REST request or a WebSocket text message (the
raw texts and, where decoding changes them, their decoded views: query names
and values percent-decoded, JSON strings unescaped), and scanning those texts
against the `waf` rules. It re-exports `catastrophic_reason` (from
`regexes.py`), the check `tlvproxy check` uses to refuse a pattern whose
backtracking is obviously exponential.
Must not: answer, log or count. The caller turns a `deny` match into 403
`forbidden` (close 1008 on WebSocket) and a `log` match into a log line.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote_plus

import attrs

from tlvproxy.errors import Forbidden
from tlvproxy.policy.regexes import catastrophic_reason, required_literals

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tlvproxy.config.model import WafLocation, WafRule
    from tlvproxy.policy.regexes import RequiredLiteral, Requirement

__all__ = ["Waf", "WafMatch", "catastrophic_reason"]

# Where a REST request is scanned, in this order (a rule is reported once, at the
# first location that matches). `in` in docs/configuration.md "waf".
_REQUEST_LOCATIONS: tuple[WafLocation, ...] = ("path", "query", "body", "headers")
# The characters CPython's case-insensitive matching equates with an ASCII letter
# although str.lower() does not (re._compiler's equivalences; checked by a test
# over every code point): folded before looking for a rule's required literals.
_FOLD_TO_ASCII = (("\u0130", "i"), ("\u0131", "i"), ("\u017f", "s"), ("\u212a", "k"))
# A JSON string from its opening quote: the group is its content, escapes and
# all. Possessive, and the closing quote optional (an unterminated string runs
# to the end), so it matches wherever a quote is: `findall` reads each
# character once, whatever the text (no retry from every quote of `"\"\"\"...`).
_JSON_STRING = re.compile(r'"([^"\\]*+(?:\\.[^"\\]*+)*+)"?', re.DOTALL)
# A JSON escape (group 1), or the lone backslash of an escape JSON refuses:
# splitting on it and joining the parts keeps the first and drops the backslash
# of the others (`\x` -> `x`, `\u12` -> `u12`), all in C.
_ESCAPE_OR_BACKSLASH = re.compile(r'(\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt]))|\\')
# JSON strings as the json module reads them, control characters allowed.
_JSON_TEXT = json.JSONDecoder(strict=False)
# The first bytes of a body JSON would read as UTF-16 or UTF-32 (json.detect_encoding):
# a byte-order mark, or a NUL in the first two bytes.
_WIDE_STARTS = (b"\x00", b"\xfe", b"\xff")


@attrs.frozen(slots=True)
class WafMatch:
    """A WAF rule matched: its name, its action and where it matched first.

    `location` is one of path, query, body, headers (a WebSocket text message is
    `body`).
    """

    rule: str
    action: Literal["deny", "log"]
    location: str

    def error(self) -> Forbidden:
        """The `forbidden` error for a `deny` match: 403, or close 1008 on a WebSocket
        (docs/configuration.md "waf")."""
        return Forbidden(f"refused by WAF rule {self.rule!r} (matched in the {self.location})")


@attrs.frozen(slots=True)
class _CompiledRule:
    index: int
    rule: WafRule
    requirements: tuple[Requirement, ...]


class Waf:
    """A table's `waf` rules, ready to scan requests and messages.

    What a rule sees (docs/configuration.md `waf`): the texts the request is
    made of as received, and, where decoding changes them, their decoded
    views, each a text of its own: every query name and value percent-decoded
    (`+` as a space), and every string (key or value) of a body or message
    read as JSON, unescaped. A view is built only when the raw text holds
    what decoding changes (`%` or `+` in the query, a backslash in a body),
    so the usual request costs a few substring searches more. Every byte of a
    body is scanned, and the decoded views are at most as long as the raw
    text: the cost is linear in the size of the request.

    Before a rule's regex runs, the literals it cannot match without (such as
    `union` and `select` in `(?i)union\\s+select`) are looked for with `str`'s
    substring search, over the raw texts and the views together, which is far
    cheaper than the regex engine; a text lacking one cannot match, so the
    verdict is exactly the regex's. The loader rejects patterns whose
    backtracking is obviously exponential (`catastrophic_reason`).
    """

    def __init__(self, rules: Sequence[WafRule]) -> None:
        # Deny rules first, so a caller that stops at the first match stops at a deny.
        ordered = sorted(enumerate(rules), key=lambda item: item[1].action != "deny")
        self._rules = tuple(
            _CompiledRule(index, rule, required_literals(rule.pattern)) for index, rule in ordered
        )
        self._by_location = {
            location: _LocationRules(tuple(c for c in self._rules if location in c.rule.locations))
            for location in _REQUEST_LOCATIONS
        }
        # The locations of a REST request that rules look at, in scan order;
        # with none, requests skip `inspect_request`.
        self._request_rules = tuple(
            (location, self._by_location[location])
            for location in _REQUEST_LOCATIONS
            if self._by_location[location].rules
        )
        self.inspects_requests = bool(self._request_rules)

    def inspect_request(
        self, *, path: str, query: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> list[WafMatch]:
        """Every rule matching this REST request, `deny` rules first, each once.

        `path` is the percent-decoded path, `query` the raw query string, `body`
        the raw body and `headers` (name, value) pairs whose values are scanned
        one by one. The query and body are also scanned decoded (`query_views`,
        `body_views`).
        """
        texts: list[tuple[_LocationRules, WafLocation, tuple[str, ...], str]] = []
        suspect = False
        for location, rules in self._request_rules:
            if location == "path":
                parts: tuple[str, ...] = (path,)
            elif location == "query":
                parts = query_views(query)
            elif location == "body":
                parts = body_views(body)
            else:
                parts = tuple([value for _, value in headers])
            joined = parts[0] if len(parts) == 1 else "\n".join(parts)
            if not joined and not rules.always:
                continue  # nothing to find: a rule with a literal needs it
            texts.append((rules, location, parts, joined))
            suspect = suspect or rules.may_match(joined)
        if not suspect:
            return []
        found: dict[int, str] = {}
        for rules, location, parts, joined in texts:
            rules.scan(location, parts, joined, found)
        return self._matches(found)

    def inspect_message(self, text: str) -> list[WafMatch]:
        """Every rule with `body` in its `in` matching a WebSocket text message.

        The whole message is scanned, and, like a body, each of its JSON strings
        unescaped when it holds a backslash (`message_views`).
        """
        rules = self._by_location["body"]
        if not rules.rules:
            return []
        found: dict[int, str] = {}
        parts = message_views(text)
        rules.scan("body", parts, text if len(parts) == 1 else "\n".join(parts), found)
        return self._matches(found)

    def _matches(self, found: dict[int, str]) -> list[WafMatch]:
        if not found:
            return []
        return [
            WafMatch(c.rule.name, c.rule.action, found[c.index])
            for c in self._rules
            if c.index in found
        ]


# ------------------------------------------------------------ what rules see


def query_views(query: str) -> tuple[str, ...]:
    """The raw query string, then each name and value that percent-decoding
    changes, decoded as the gateway reads them (`+` as a space, UTF-8, invalid
    bytes replaced; fields split at `&`, a name from its value at the first `=`)."""
    if "%" not in query and "+" not in query:
        return (query,)
    views = [query]
    for field in query.split("&"):
        if "%" in field or "+" in field:
            parts = field.split("=", 1)
            views.extend(unquote_plus(raw) for raw in parts if "%" in raw or "+" in raw)
    return tuple(views)


def body_views(body: bytes) -> tuple[str, ...]:
    """The body as text (UTF-8, invalid bytes replaced); the body as UTF-16 or
    UTF-32 when its first bytes say so, as a JSON parser reads it; then each
    JSON string of those that holds an escape, unescaped (`json_strings`)."""
    texts = [body.decode("utf-8", errors="replace")]
    if body[:1] in _WIDE_STARTS or body[1:2] == b"\x00":
        encoding = json.detect_encoding(body)
        if not encoding.startswith("utf-8"):
            texts.append(body.decode(encoding, errors="replace"))
    views = list(texts)
    for text in texts:
        if "\\" in text:
            views.extend(json_strings(text))
    return tuple(views)


def message_views(text: str) -> tuple[str, ...]:
    """A WebSocket text message, then each of its JSON strings that holds an
    escape, unescaped."""
    if "\\" not in text:
        return (text,)
    return (text, *json_strings(text))


def json_strings(text: str) -> list[str]:
    """Each string (object key or value) of `text` read as JSON that holds an
    escape, unescaped; strings without one are in `text` as they are.

    Strings are found from each opening quote to its closing one, so in JSON
    text exactly its strings are found (outside them JSON has no quote); in
    other text, whatever lies between quotes. An escape JSON refuses (`\\x`,
    `\\u12`) is read leniently, as the character after the backslash. Linear
    in `len(text)`: one regex pass finds the strings, one JSON parse decodes
    them all.
    """
    escaped = [content for content in _JSON_STRING.findall(text) if "\\" in content]
    if not escaped:
        return []
    array = '["' + '","'.join(escaped) + '"]'
    try:
        decoded: list[str] = _JSON_TEXT.decode(array)
    except ValueError:
        # Only valid escapes are left after this, so the array is valid JSON.
        lenient = "".join(filter(None, _ESCAPE_OR_BACKSLASH.split(array)))
        decoded = _JSON_TEXT.decode(lenient)
    return decoded


# A rule and the literal requirements it has left to check.
_Entry = tuple[_CompiledRule, tuple["Requirement", ...]]


class _LocationRules:
    """The rules of one location, and the index that finds a text's candidates."""

    def __init__(self, rules: tuple[_CompiledRule, ...]) -> None:
        self.rules = rules
        self.index = _AnchorIndex([(c, c.requirements) for c in rules])
        self.needs_fold = any(
            fold for c in rules for requirement in c.requirements for _, fold in requirement
        )
        # The index's anchor literals: a text holding none of them matches no
        # rule that has any, so the usual clean text costs a few substring
        # searches. Those behind the most rules first: when the text holds one,
        # the search stops there (a browser's User-Agent always holds the "("
        # of PHP rules). A literal without letters is the same folded or not,
        # so it is looked for in the text as it is.
        ranked = [literal for literal, _ in self.index.anchors().most_common()]
        self._plain_anchors = tuple(
            text for text, fold in ranked if not fold or not _has_letters(text)
        )
        self._folded_anchors = tuple(text for text, fold in ranked if fold and _has_letters(text))
        # Whether a rule has no literal to look for: it may match any text,
        # even an empty one.
        self.always = bool(self.index.always)

    def may_match(self, joined: str) -> bool:
        """False when no rule of this location can match `joined` (which holds
        every part of the text): it lacks every anchor literal."""
        if self.always:
            return True
        for anchor in self._plain_anchors:
            if anchor in joined:
                return True
        if self._folded_anchors:
            folded = _fold(joined)
            for anchor in self._folded_anchors:
                if anchor in folded:
                    return True
        return False

    def scan(self, location: str, parts: Sequence[str], joined: str, found: dict[int, str]) -> None:
        """Record in `found` each rule not yet found that matches one of `parts`.

        `joined` holds every part, so a literal missing from it is missing from each.
        """
        folded = _fold(joined) if self.needs_fold else ""
        for compiled, others in self.index.candidates(joined, folded):
            if compiled.index in found:
                continue
            if all(
                any(text in (folded if fold else joined) for text, fold in requirement)
                for requirement in others
            ):
                search = compiled.rule.pattern.search
                if any(search(part) is not None for part in parts):
                    found[compiled.index] = location


class _AnchorIndex:
    """Rules indexed under one literal requirement each, their anchor.

    Rules that share a requirement form a group under it: the PHP-call rules
    (`eval(`, `system(`, ...) all need "(", so one substring search rules the
    whole group out, and when "(" is there the group's own index, by each rule's
    next requirement, picks among them. A rule that shares nothing is listed
    under each literal of its most selective requirement. A text's candidates
    are the rules under the literals it holds, plus the rules with no required
    literal, each with the requirements it still has to meet.
    """

    def __init__(self, entries: Sequence[_Entry]) -> None:
        self.size = len(entries)
        self.always = tuple(entry for entry in entries if not entry[1])
        shared = Counter(frozenset(req) for _, reqs in entries for req in set(reqs))
        solo: dict[RequiredLiteral, list[_Entry]] = {}
        groups: dict[frozenset[RequiredLiteral], tuple[Requirement, list[_Entry]]] = {}
        for compiled, requirements in entries:
            if not requirements:
                continue
            common = max(requirements, key=lambda req: shared[frozenset(req)])
            rest = tuple(req for req in requirements if req is not common)
            if shared[frozenset(common)] > 1 and rest:
                groups.setdefault(frozenset(common), (common, []))[1].append((compiled, rest))
            else:
                for literal in requirements[0]:
                    solo.setdefault(literal, []).append((compiled, requirements[1:]))
        self.plain = tuple((text, tuple(e)) for (text, fold), e in solo.items() if not fold)
        self.folded = tuple((text, tuple(e)) for (text, fold), e in solo.items() if fold)
        self.groups = tuple((common, _AnchorIndex(group)) for common, group in groups.values())

    def anchors(self) -> Counter[RequiredLiteral]:
        """The literals looked up first, each with the number of rules behind it:
        a text holding none has no candidate but the rules without a literal."""
        found: Counter[RequiredLiteral] = Counter()
        for text, listed in self.plain:
            found[text, False] += len(listed)
        for text, listed in self.folded:
            found[text, True] += len(listed)
        for common, index in self.groups:
            for literal in common:
                found[literal] += index.size
        return found

    def candidates(self, joined: str, folded: str) -> list[_Entry]:
        """The rules `joined` (and `folded`, its `_fold`) may match."""
        found = [entry for text, listed in self.plain if text in joined for entry in listed]
        if self.folded:
            found.extend(e for text, listed in self.folded if text in folded for e in listed)
        for common, index in self.groups:
            if any(text in (folded if fold else joined) for text, fold in common):
                found.extend(index.candidates(joined, folded))
        found.extend(self.always)
        return found


def _has_letters(literal: str) -> bool:
    """Whether case-insensitive matching could see `literal` differently from
    its text: it is not ASCII, or holds an ASCII letter."""
    return not literal.isascii() or any(char.isalpha() for char in literal)


def _fold(text: str) -> str:
    """`text` case-folded so that an ASCII literal occurs in it wherever a
    case-insensitive regex could match that literal."""
    if not text.isascii():
        # A few substring searches: far cheaper than str.translate on long text.
        for char, ascii_letter in _FOLD_TO_ASCII:
            if char in text:
                text = text.replace(char, ascii_letter)
    return text.lower()

"""The WAF: a table's regex rules -> which rules match a request or message (SPEC 4.4).

Owns: scanning the decoded path, raw query, body and header values of a REST
request, or a WebSocket text message, against the `waf` rules. It re-exports
`catastrophic_reason` (from `regexes.py`), the check `tlvproxy check` uses to
refuse a pattern whose backtracking is obviously exponential.
Must not: answer, log or count. The caller turns a `deny` match into 403
`forbidden` (close 1008 on WebSocket) and a `log` match into a log line.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Literal

import attrs

from tlvproxy.errors import Forbidden
from tlvproxy.policy.regexes import catastrophic_reason, required_literals

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tlvproxy.config.model import WafLocation, WafRule
    from tlvproxy.policy.regexes import RequiredLiteral, Requirement

__all__ = ["Waf", "WafMatch", "catastrophic_reason"]

# Where a REST request is scanned, in this order (a rule is reported once, at the
# first location that matches). SPEC 3 `waf[].in`.
_REQUEST_LOCATIONS: tuple[WafLocation, ...] = ("path", "query", "body", "headers")
# The characters CPython's case-insensitive matching equates with an ASCII letter
# although str.lower() does not (re._compiler's equivalences; checked by a test
# over every code point): folded before looking for a rule's required literals.
_FOLD_TO_ASCII = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


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
        """The `forbidden` error for a `deny` match (SPEC 4.2: 403; close 1008 on WS)."""
        return Forbidden(f"refused by WAF rule {self.rule!r} (matched in the {self.location})")


@attrs.frozen(slots=True)
class _CompiledRule:
    index: int
    rule: WafRule
    requirements: tuple[Requirement, ...]


class Waf:
    """A table's `waf` rules, ready to scan requests and messages.

    Before a rule's regex runs, the literals it cannot match without (such as
    `union` and `select` in `(?i)union\\s+select`) are looked for with `str`'s
    substring search, which is far cheaper than the regex engine; a text lacking
    one cannot match, so the verdict is exactly the regex's.

    Bodies: at most `max_scan_bytes` of a body or message are scanned, its first
    and last `max_scan_bytes // 2` bytes when it is longer. This bounds the time a
    large body costs (with 50 rules and the default 64 KiB, about 2 ms per
    maximal body: benchmarks/bench_policy.py); a probe buried in the middle of a
    body longer than `max_scan_bytes` is not seen. The loader rejects patterns
    whose backtracking is obviously exponential (`catastrophic_reason`).
    """

    def __init__(self, rules: Sequence[WafRule], *, max_scan_bytes: int = 64 * 1024) -> None:
        """Raises ValueError if `max_scan_bytes` is below 2."""
        if max_scan_bytes < 2:
            raise ValueError(f"max_scan_bytes must be >= 2, got {max_scan_bytes}")
        self.max_scan_bytes = max_scan_bytes
        # Deny rules first, so a caller that stops at the first match stops at a deny.
        ordered = sorted(enumerate(rules), key=lambda item: item[1].action != "deny")
        self._rules = tuple(
            _CompiledRule(index, rule, required_literals(rule.pattern)) for index, rule in ordered
        )
        self._by_location = {
            location: _LocationRules(tuple(c for c in self._rules if location in c.rule.locations))
            for location in _REQUEST_LOCATIONS
        }
        # False when no rule looks at REST requests: they skip `inspect_request`.
        self.inspects_requests = any(lr.rules for lr in self._by_location.values())
        # Every location's anchor literals together: a request whose text holds
        # none of them matches no rule that has any, so the usual clean request
        # costs one pass over its text instead of one per location.
        # Those behind the most rules first: when the text holds one, the search
        # stops there (a browser's User-Agent always holds the "(" of PHP rules).
        anchors: Counter[RequiredLiteral] = Counter()
        for location_rules in self._by_location.values():
            anchors.update(location_rules.index.anchors())
        ranked = [literal for literal, _ in anchors.most_common()]
        self._plain_anchors = tuple(text for text, fold in ranked if not fold)
        self._folded_anchors = tuple(text for text, fold in ranked if fold)
        self._has_always = any(lr.index.always for lr in self._by_location.values())

    def inspect_request(
        self, *, path: str, query: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> list[WafMatch]:
        """Every rule matching this REST request, `deny` rules first, each once.

        `path` is the decoded path, `query` the raw query string, `body` the raw
        body (decoded as UTF-8, invalid bytes replaced, within `max_scan_bytes`)
        and `headers` (name, value) pairs whose values are scanned one by one.
        """
        by_location = self._by_location
        texts: list[tuple[WafLocation, tuple[str, ...]]] = []
        if by_location["path"].rules:
            texts.append(("path", (path,)))
        if by_location["query"].rules:
            texts.append(("query", (query,)))
        if by_location["body"].rules:
            texts.append(("body", self._body_parts(body)))
        if by_location["headers"].rules and headers:
            texts.append(("headers", tuple(value for _, value in headers)))
        if not texts:
            return []
        if not self._has_always and not self._holds_an_anchor(
            "\n".join(part for _, parts in texts for part in parts)
        ):
            return []
        found: dict[int, str] = {}
        for location, parts in texts:
            by_location[location].scan(location, parts, "\n".join(parts), found)
        return self._matches(found)

    def _holds_an_anchor(self, text: str) -> bool:
        for anchor in self._plain_anchors:
            if anchor in text:
                return True
        if self._folded_anchors:
            folded = _fold(text)
            for anchor in self._folded_anchors:
                if anchor in folded:
                    return True
        return False

    def inspect_message(self, text: str) -> list[WafMatch]:
        """Every rule with `body` in its `in` matching a WebSocket text message.

        Like a body, at most `max_scan_bytes` characters of it are scanned.
        """
        rules = self._by_location["body"]
        if not rules.rules:
            return []
        found: dict[int, str] = {}
        limit = self.max_scan_bytes
        parts = (text,) if len(text) <= limit else (text[: limit // 2], text[-(limit // 2) :])
        rules.scan("body", parts, "\n".join(parts), found)
        return self._matches(found)

    def _body_parts(self, body: bytes) -> tuple[str, ...]:
        limit = self.max_scan_bytes
        if len(body) <= limit:
            return (body.decode("utf-8", errors="replace"),)
        half = limit // 2
        return (
            body[:half].decode("utf-8", errors="replace"),
            body[-half:].decode("utf-8", errors="replace"),
        )

    def _matches(self, found: dict[int, str]) -> list[WafMatch]:
        if not found:
            return []
        return [
            WafMatch(c.rule.name, c.rule.action, found[c.index])
            for c in self._rules
            if c.index in found
        ]


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


def _fold(text: str) -> str:
    """`text` case-folded so that an ASCII literal occurs in it wherever a
    case-insensitive regex could match that literal."""
    if text.isascii():
        return text.lower()
    return text.translate(_FOLD_TO_ASCII).lower()

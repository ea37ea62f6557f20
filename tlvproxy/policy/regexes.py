"""What the regex engine will do with a pattern, read from its parse tree.

Owns: `catastrophic_reason` (is the pattern's backtracking obviously
exponential?) and `required_literals` (which literals can it not match
without?), both from CPython's own regex parser.
Must not: compile or run patterns against input; the WAF does that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import re

# re._parser and re._constants are CPython's own regex parser (sre_parse), typed
# nowhere usable: typeshed only stubs the deprecated `sre_parse` names, and node
# payloads are untyped unions. Everything read from them is Any and stays inside
# the analysis below.
_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

_IGNORECASE = 2  # re.IGNORECASE, as sre flags store it
_DOTALL = 16  # re.DOTALL
# Code points every analysis considers besides the pattern's own literals: enough to
# tell \d, \w, \s, `.` and common classes apart.
_BASE_ALPHABET = (
    *(chr(i) for i in range(256)),
    *"\u0100\u017f\u0391\u0416\u05d0\u0660\u2028\u3000\u4e2d\U0001f600",
)
_CATEGORY_TESTS = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_NOT_DIGIT": lambda ch: not ch.isdecimal(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda ch: not ch.isspace(),
    "CATEGORY_WORD": lambda ch: ch.isalnum() or ch == "_",
    "CATEGORY_NOT_WORD": lambda ch: not (ch.isalnum() or ch == "_"),
    "CATEGORY_LINEBREAK": lambda ch: ch == "\n",
    "CATEGORY_NOT_LINEBREAK": lambda ch: ch != "\n",
}
# At most this many required literals are checked per rule; the longest first.
_MAX_REQUIREMENTS = 4

# A literal a pattern cannot match without: (text, whether compared case-folded).
RequiredLiteral = tuple[str, bool]
# Any one of these literals must occur in the text.
Requirement = tuple[RequiredLiteral, ...]


def required_literals(pattern: re.Pattern[str]) -> tuple[Requirement, ...]:
    """Literals `pattern` cannot match without, most selective first (may be none)."""
    try:
        parsed = _parser.parse(pattern.pattern, pattern.flags)
    except (_c.error, RecursionError, ValueError):
        return ()
    found = _literal_requirements(parsed.data, parsed.state.flags)
    found.sort(key=lambda req: min(len(text) for text, _ in req), reverse=True)
    return tuple(found[:_MAX_REQUIREMENTS])


def _literal_requirements(seq: Any, flags: int) -> list[Requirement]:
    """The requirements of a sequence: its runs of literals and those of the parts
    it must match (groups, repeats of at least one, branches whose every
    alternative has one)."""
    found: list[Requirement] = []
    fold = bool(flags & _IGNORECASE)
    run: list[str] = []

    def flush() -> None:
        if run:
            found.append((("".join(run).lower() if fold else "".join(run), fold),))
            run.clear()

    for op, av in seq:
        if op is _c.LITERAL and not (fold and av >= 128):
            run.append(chr(av))
            continue
        flush()
        if op is _c.SUBPATTERN:
            found.extend(_literal_requirements(av[3].data, (flags | av[1]) & ~av[2]))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT) and av[0] >= 1:
            found.extend(_literal_requirements(av[2].data, flags))
        elif op is _c.ATOMIC_GROUP:
            found.extend(_literal_requirements(av.data, flags))
        elif op is _c.BRANCH:
            any_of: list[RequiredLiteral] = []
            for alt in av[1]:
                alt_found = _literal_requirements(alt.data, flags)
                if not alt_found:
                    any_of = []
                    break
                any_of.extend(max(alt_found, key=lambda req: min(len(t) for t, _ in req)))
            if any_of:
                found.append(tuple(dict.fromkeys(any_of)))
    flush()
    return found


def catastrophic_reason(pattern: str) -> str | None:
    """Why `pattern` obviously backtracks exponentially, or None if nothing obvious.

    Flags, inside a backtracking repeat that can run more than once (`+`, `*`,
    `{20}`, lazy or greedy):
    - another repeat with a choice of length (`+`, `*`, `{1,9}`) whose characters
      can also be matched by what follows it in the same or the next iteration:
      `(a+)+`, `(a*)*`, `(.*a){20}`, `(x+x+)+y`, `(\\w+\\s?)*$`;
    - an alternation with identical branches (`(a|a)*`, which the parser keeps
      as two empty branches) or two single-character branches that overlap
      (`(.|\\s)*`).

    Not flagged, because they cannot be re-split by backtracking: possessive
    repeats (`a++`, `(a+)++`), atomic groups (`(?>a+)+`), fixed counts (`(a{2})+`),
    and repeats whose characters cannot run into what follows, as in
    `(\\d+\\.){3}` or `([a-z]+\\.)+`.

    Limits: this is a cheap structural check, not a proof. Character sets are
    compared on a sample alphabet (Latin-1, a few other scripts and the pattern's
    own literals), and only the first character of a repeated body counts, so it
    flags the obvious cases (the ones seen in ReDoS reports) but not every
    exponential pattern (`(a|ab)*(ab)*c`-style ambiguity across several characters,
    or back-references, go through). Polynomial backtracking (`a*a*a*b`) is not
    flagged. A pattern that does not compile yields None: compiling reports it.

    Returns the reason as a sentence naming the offending construct.
    """
    try:
        parsed = _parser.parse(pattern)
    except (ValueError, TypeError, OverflowError, RecursionError, _c.error):
        return None
    analysis = _Analysis(parsed)
    return analysis.scan(parsed.data, after=0, in_loop=False, flags=parsed.state.flags)


class _Analysis:
    """One pattern's walk; character sets are bit masks over `alphabet`."""

    def __init__(self, parsed: Any) -> None:
        literals: set[str] = set()
        _collect_literals(parsed.data, literals)
        self.alphabet = tuple(dict.fromkeys((*_BASE_ALPHABET, *sorted(literals))))
        self.everything = (1 << len(self.alphabet)) - 1

    def _mask(self, test: Any) -> int:
        mask = 0
        for i, ch in enumerate(self.alphabet):
            if test(ch):
                mask |= 1 << i
        return mask

    def _char_mask(self, op: Any, av: Any, flags: int) -> int:
        """The characters one single-character node (LITERAL, ANY, IN, ...) accepts."""
        fold = bool(flags & _IGNORECASE)
        if op is _c.LITERAL or op is _c.NOT_LITERAL:
            lit = _same_char(chr(av), fold)
            mask = self._mask(lit)
            return mask if op is _c.LITERAL else self.everything & ~mask
        if op is _c.ANY:
            if flags & _DOTALL:
                return self.everything
            return self._mask(lambda ch: ch != "\n")
        if op is _c.IN:
            return self._in_mask(av, fold)
        return self.everything

    def _in_mask(self, items: Any, fold: bool) -> int:
        negate = False
        mask = 0
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                mask |= self._mask(_same_char(chr(av), fold))
            elif op is _c.RANGE:
                mask |= self._mask(_in_range(chr(av[0]), chr(av[1]), fold))
            elif op is _c.CATEGORY:
                mask |= self._mask(_CATEGORY_TESTS.get(str(av), lambda _ch: True))
            else:
                mask = self.everything
        return self.everything & ~mask if negate else mask

    def first(self, seq: Any, flags: int) -> tuple[int, bool]:
        """(characters a match of `seq` can start with, whether it can match empty)."""
        mask = 0
        for op, av in seq:
            item_mask, nullable = self._first_item(op, av, flags)
            mask |= item_mask
            if not nullable:
                return mask, False
        return mask, True

    def _first_item(self, op: Any, av: Any, flags: int) -> tuple[int, bool]:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            return self._char_mask(op, av, flags), False
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            mask, nullable = self.first(av[2].data, flags)
            return mask, nullable or av[0] == 0
        if op is _c.SUBPATTERN:
            return self.first(av[3].data, (flags | av[1]) & ~av[2])
        if op is _c.ATOMIC_GROUP:
            return self.first(av.data, flags)
        if op is _c.BRANCH:
            mask, nullable = 0, False
            for alt in av[1]:
                alt_mask, alt_nullable = self.first(alt.data, flags)
                mask |= alt_mask
                nullable = nullable or alt_nullable
            return mask, nullable
        if op is _c.GROUPREF_EXISTS:
            yes_mask, yes_nullable = self.first(av[1].data, flags)
            if av[2] is None:
                return yes_mask, True
            no_mask, no_nullable = self.first(av[2].data, flags)
            return yes_mask | no_mask, yes_nullable or no_nullable
        if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            return 0, True  # zero width
        return self.everything, True  # GROUPREF and anything unknown: could be anything

    def scan(self, seq: Any, *, after: int, in_loop: bool, flags: int) -> str | None:
        """Walk `seq` right to left; `after` is what may follow it inside the loop.

        `in_loop` says an enclosing backtracking repeat may run again, so a choice
        of split here multiplies with every other iteration's.
        """
        items = list(seq)
        for index in range(len(items) - 1, -1, -1):
            op, av = items[index]
            reason = self._scan_item(op, av, after, in_loop, flags, False)
            if reason is not None:
                return reason
            item_mask, nullable = self._first_item(op, av, flags)
            after = item_mask | (after if nullable else 0)
        return None

    def _scan_item(
        self, op: Any, av: Any, after: int, in_loop: bool, flags: int, possessive: bool
    ) -> str | None:
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            low, high, body = av
            backtracks = op is not _c.POSSESSIVE_REPEAT and not possessive
            body_first, _ = self.first(body.data, flags)
            if in_loop and backtracks and high > 1 and low != high and body_first & after:
                return (
                    "nested repetition: a repeated group holds a repeat whose characters can "
                    "also match what follows it, so backtracking tries exponentially many "
                    "splits (use a possessive quantifier or an atomic group, or make the "
                    "parts exclusive)"
                )
            if not backtracks:
                # Nothing outside can re-split it; only its own inside may backtrack.
                return self.scan(body.data, after=0, in_loop=False, flags=flags)
            if high > 1:
                return self.scan(
                    body.data,
                    after=body_first | (after if in_loop else 0),
                    in_loop=True,
                    flags=flags,
                )
            return self.scan(body.data, after=after, in_loop=in_loop, flags=flags)
        if op is _c.SUBPATTERN:
            scoped = (flags | av[1]) & ~av[2]
            return self.scan(av[3].data, after=after, in_loop=in_loop, flags=scoped)
        if op is _c.ATOMIC_GROUP:
            return self._scan_atomic(av.data, flags)
        if op is _c.BRANCH:
            return self._scan_branch(av[1], after, in_loop, flags)
        if op is _c.GROUPREF_EXISTS:
            for alt in (av[1], av[2]):
                if alt is not None:
                    reason = self.scan(alt.data, after=after, in_loop=in_loop, flags=flags)
                    if reason is not None:
                        return reason
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            return self.scan(av[1].data, after=0, in_loop=False, flags=flags)
        return None

    def _scan_atomic(self, seq: Any, flags: int) -> str | None:
        # An atomic group commits to its first match: nothing outside can make it
        # backtrack, and a repeat at its very end is never given back (possessive).
        items = list(seq)
        after = 0
        for index in range(len(items) - 1, -1, -1):
            op, av = items[index]
            reason = self._scan_item(op, av, after, False, flags, index == len(items) - 1)
            if reason is not None:
                return reason
            item_mask, nullable = self._first_item(op, av, flags)
            after = item_mask | (after if nullable else 0)
        return None

    def _scan_branch(self, alts: Any, after: int, in_loop: bool, flags: int) -> str | None:
        if in_loop:
            seen: list[tuple[object, ...]] = []
            singles: list[int] = []
            for alt in alts:
                shape = _shape(alt.data)
                if shape in seen:
                    return (
                        "repeated alternation with identical branches: every iteration "
                        "can match two ways, so backtracking is exponential"
                    )
                seen.append(shape)
                if len(alt.data) == 1 and alt.data[0][0] in (_c.LITERAL, _c.ANY, _c.IN):
                    mask = self._char_mask(alt.data[0][0], alt.data[0][1], flags)
                    if any(mask & other for other in singles):
                        return (
                            "repeated alternation of overlapping single characters (like "
                            "`(.|\\s)*`): every iteration can match two ways, so backtracking "
                            "is exponential (use one character class)"
                        )
                    singles.append(mask)
        for alt in alts:
            reason = self.scan(alt.data, after=after, in_loop=in_loop, flags=flags)
            if reason is not None:
                return reason
        return None


def _same_char(lit: str, fold: bool) -> Any:
    if not fold:
        return lambda ch: ch == lit
    low = lit.lower()
    return lambda ch: ch.lower() == low


def _in_range(lo: str, hi: str, fold: bool) -> Any:
    if not fold:
        return lambda ch: lo <= ch <= hi
    return lambda ch: lo <= ch <= hi or lo <= ch.lower() <= hi or lo <= ch.upper() <= hi


def _collect_literals(seq: Any, out: set[str]) -> None:
    for op, av in seq:
        if op in (_c.LITERAL, _c.NOT_LITERAL):
            out.add(chr(av))
        elif op is _c.IN:
            for in_op, in_av in av:
                if in_op is _c.LITERAL:
                    out.add(chr(in_av))
                elif in_op is _c.RANGE:
                    out.update((chr(in_av[0]), chr(in_av[1])))
        for child in _children(op, av):
            _collect_literals(child.data, out)


def _children(op: Any, av: Any) -> list[Any]:
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        return [av[2]]
    if op is _c.SUBPATTERN:
        return [av[3]]
    if op is _c.ATOMIC_GROUP:
        return [av]
    if op is _c.BRANCH:
        return list(av[1])
    if op is _c.GROUPREF_EXISTS:
        return [alt for alt in (av[1], av[2]) if alt is not None]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    return []


def _shape(seq: Any) -> tuple[object, ...]:
    """A comparable form of a parsed sequence (sub-patterns compare by identity)."""
    return tuple(
        (str(op), _scalars(op, av), tuple(_shape(child.data) for child in _children(op, av)))
        for op, av in seq
    )


def _scalars(op: Any, av: Any) -> object:
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        return (av[0], av[1])
    if op is _c.SUBPATTERN:
        return (av[1], av[2])
    if op in (_c.ASSERT, _c.ASSERT_NOT, _c.GROUPREF_EXISTS):
        return av[0]
    if op in (_c.ATOMIC_GROUP, _c.BRANCH):
        return None
    return repr(av)

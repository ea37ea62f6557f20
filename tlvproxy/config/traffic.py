"""Reading a command's `split`, `mirror` and `fallback` (docs/configuration.md
"split, mirror, fallback").

Owns: the keys of the three sections, what they become (`TrafficSpec`), and
their cross-references: each `to` names another request command of the same
codec whose request message has the fields the command fills; a fallback
`body` fits the command's response message (encoded once, here); `last_good`
only on an idempotent command.
Must not: look at anything but the commands it is given and the schema, or
stop at the first problem: each one is recorded on the `NodeReader` with its
place, and the section is left out of the table.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

from tlvproxy.config import nodes
from tlvproxy.config.keys import KeyExpr, parse_number
from tlvproxy.config.model import (
    BASIS_POINTS,
    FallbackSpec,
    LastGoodSpec,
    MirrorSpec,
    SplitRule,
    TrafficSpec,
)
from tlvproxy.config.nodes import Invalid, join, suggest
from tlvproxy.config.sections import key_expr, positive_duration, positive_size
from tlvproxy.errors import BadRequest
from tlvproxy.schema.codec import RENDER_FACTOR, JsonCodec, ProtobufCodec, RawCodec

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from tlvproxy.config.model import CommandSpec, JsonOptions
    from tlvproxy.config.nodes import Node, NodeReader
    from tlvproxy.schema.protos import Schema

KEYS: Final = ("split", "mirror", "fallback")
_RULE_KINDS: Final = ("tail", "values", "percent")
# A `last_good` with its defaults, which the key and ttl a table must give do not change.
_LAST_GOOD_DEFAULTS: Final = LastGoodSpec(key=KeyExpr("remote_addr"), ttl=1.0)


def percent(value: Any) -> int:
    """A share from 0 to 100 with at most two decimals, in basis points.

    Raises Invalid saying what is expected."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"expected a percentage from 0 to 100, got {value!r}")
    try:
        exact = Decimal(str(value)) * 100
    except InvalidOperation:
        raise Invalid(f"expected a percentage from 0 to 100, got {value!r}") from None
    if not exact.is_finite() or not 0 <= exact <= BASIS_POINTS:
        raise Invalid(f"expected a percentage from 0 to 100, got {value!r}")
    if exact != exact.to_integral_value():
        raise Invalid(f"a percentage has at most two decimals, got {value!r}")
    return int(exact)


class TrafficReader:
    """Reads the traffic sections of the commands of one table (`read`)."""

    def __init__(
        self,
        r: NodeReader,
        commands: Mapping[str, CommandSpec],
        schema: Schema | None,
        options: JsonOptions,
        max_body: int,
    ) -> None:
        self.r = r
        self.commands = commands
        self.schema = schema
        self.options = options
        self.max_body = max_body

    def read(
        self, command: CommandSpec, found: dict[str, Node], path: str, filled: Sequence[str]
    ) -> TrafficSpec | None:
        """The traffic rules among `found` (the command's keys), or None when it
        has none or any is wrong. `filled` names the request fields the command
        fills from its path and `fields`: a `to` command's request needs them."""
        if not any(key in found for key in KEYS):
            return None
        before = len(self.r.problems)
        split: tuple[SplitRule, ...] = ()
        mirror = fallback = None
        if "split" in found:
            split = self._split(found["split"], join(path, "split"), command, filled)
        if "mirror" in found:
            mirror = self._mirror(found["mirror"], join(path, "mirror"), command, filled)
        if "fallback" in found:
            fallback = self._fallback(found["fallback"], join(path, "fallback"), command)
        if len(self.r.problems) > before:
            return None
        return TrafficSpec(split=split, mirror=mirror, fallback=fallback)

    # ------------------------------------------------------------ split

    def _split(
        self, node: Node, path: str, command: CommandSpec, filled: Sequence[str]
    ) -> tuple[SplitRule, ...]:
        r = self.r
        items = r.sequence(node, path)
        if items == []:
            r.error(node, path, "give at least one rule, or leave split out")
        rules: list[SplitRule] = []
        for index, item in enumerate(items or []):
            rule_path = join(path, index)
            found = r.mapping(item, rule_path, ("key", *_RULE_KINDS, "to"), ("key", "to"))
            if found is None:
                continue
            kinds = [kind for kind in _RULE_KINDS if kind in found]
            if not kinds:
                r.error(item, rule_path, "give one of tail, values or percent")
            elif len(kinds) > 1:
                r.error(
                    found[kinds[1]],
                    join(rule_path, kinds[1]),
                    f"give one of tail, values or percent, not both {kinds[0]} and {kinds[1]}",
                )
            key = r.get(found, "key", rule_path, key_expr, None)
            to = None
            if "to" in found:
                to = self._target(found["to"], join(rule_path, "to"), command, filled)
            tail = values = share = None
            if "tail" in found:
                tail = self._tail(found["tail"], join(rule_path, "tail"))
            if "values" in found and key is not None:
                values = self._values(found["values"], join(rule_path, "values"), key, command)
            if "percent" in found:
                share = r.get(found, "percent", rule_path, percent, None)
            if key is None or to is None or len(kinds) != 1:
                continue
            if tail is None and values is None and share is None:
                continue
            rules.append(SplitRule(key=key, to=to, tail=tail, values=values, percent=share))
        return tuple(rules)

    def _tail(self, node: Node, path: str) -> frozenset[int] | None:
        items = self.r.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.r.error(node, path, "list at least one last digit (0 to 9)")
            return None
        digits = [
            self.r.value(item, join(path, j), nodes.integer(0, 9), None)
            for j, item in enumerate(items)
        ]
        if None in digits:
            return None
        return frozenset(d for d in digits if d is not None)

    def _values(
        self, node: Node, path: str, key: KeyExpr, command: CommandSpec
    ) -> frozenset[str] | None:
        """The values as the key reads them: a key that fills a number reads
        the number (docs/configuration.md "Numbers read once")."""
        items = self.r.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.r.error(node, path, "list at least one value")
            return None
        numeric = key in command.numeric_keys

        def convert(value: Any) -> str:
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise Invalid(f"expected a string or a whole number, got {value!r}")
            text = str(value)
            if numeric:
                try:
                    return str(parse_number(key, text))
                except ValueError:
                    raise Invalid(
                        f"{key} fills a number for this command, so it reads as a whole "
                        f"number; got {value!r}"
                    ) from None
            return text

        found = [self.r.value(item, join(path, j), convert, None) for j, item in enumerate(items)]
        if None in found:
            return None
        return frozenset(v for v in found if v is not None)

    # ------------------------------------------------------------ mirror

    def _mirror(
        self, node: Node, path: str, command: CommandSpec, filled: Sequence[str]
    ) -> MirrorSpec | None:
        r = self.r
        found = r.mapping(node, path, ("to", "percent", "compare", "log_values"), ("to",))
        if found is None or "to" not in found:
            return None
        to = self._target(found["to"], join(path, "to"), command, filled)
        share = r.get(found, "percent", path, percent, BASIS_POINTS)
        compare = r.get(found, "compare", path, nodes.boolean, False)
        log_values = r.get(found, "log_values", path, nodes.boolean, False)
        if log_values and not compare:
            r.error(found["log_values"], join(path, "log_values"), "needs compare: true")
        if to is None:
            return None
        return MirrorSpec(to=to, percent=share, compare=compare, log_values=log_values)

    # ------------------------------------------------------------ fallback

    def _fallback(self, node: Node, path: str, command: CommandSpec) -> FallbackSpec | None:
        r = self.r
        found = r.mapping(node, path, ("body", "last_good"))
        if found is None:
            return None
        if not found:
            r.error(node, path, "give body, last_good, or both")
            return None
        body = last_good = None
        if "body" in found:
            body = self._static(found["body"], join(path, "body"), command)
        if "last_good" in found:
            last_good = self._last_good(found["last_good"], join(path, "last_good"), command)
        if ("body" in found and body is None) or ("last_good" in found and last_good is None):
            return None
        return FallbackSpec(body=body, last_good=last_good)

    def _static(self, node: Node, path: str, command: CommandSpec) -> bytes | None:
        """The body as the frame body of the command's response."""
        try:
            value = self.r.document(node)
        except Invalid as exc:
            self.r.error(node, path, str(exc))
            return None
        try:
            if command.codec == "json":
                return JsonCodec().encode_response(value)
            if command.codec == "raw":
                return RawCodec().encode_value(value)
            schema = self.schema
            if schema is None or command.response is None:
                return None  # the schema's own problems are reported
            codec = ProtobufCodec(
                command.name,
                None,
                schema.message_class(command.response),
                command.json or self.options,
                schema,
                max_rendered=RENDER_FACTOR * self.max_body,
            )
            return codec.encode_response(value)
        except BadRequest as exc:
            what = command.response if command.codec == "protobuf" else f"a {command.codec} body"
            self.r.error(node, path, f"does not fit {what}: {exc.message}")
            return None

    def _last_good(self, node: Node, path: str, command: CommandSpec) -> LastGoodSpec | None:
        r = self.r
        keys = ("key", "ttl", "max_entries", "max_bytes")
        found = r.mapping(node, path, keys, ("key", "ttl"))
        if not command.idempotent:
            r.error(
                node,
                path,
                f"{command.name!r} is not idempotent: answering it with an earlier answer "
                "could hide that it was not done; set idempotent: true if repeating it "
                "changes nothing",
            )
        if found is None:
            return None
        key = r.get(found, "key", path, key_expr, None)
        ttl = r.get(found, "ttl", path, positive_duration, None)
        max_entries = r.get(
            found, "max_entries", path, nodes.integer(1), _LAST_GOOD_DEFAULTS.max_entries
        )
        max_bytes = r.get(found, "max_bytes", path, positive_size, _LAST_GOOD_DEFAULTS.max_bytes)
        if key is None or ttl is None:
            return None
        return LastGoodSpec(key=key, ttl=ttl, max_entries=max_entries, max_bytes=max_bytes)

    # ------------------------------------------------------------ `to`

    def _target(
        self, node: Node, path: str, command: CommandSpec, filled: Sequence[str]
    ) -> str | None:
        """The `to` command's name when it may take the command's requests."""
        r = self.r
        name = r.value(node, path, nodes.text, None)
        if name is None:
            return None
        target = self.commands.get(name)
        if target is None:
            r.error(node, path, f"unknown command {name!r}" + suggest(name, self.commands))
            return None
        problem = None
        if target is command:
            problem = "a command cannot send its own requests to itself"
        elif target.push is not None:
            problem = f"{name!r} is a push command: only the upstream sends it"
        elif target.codec != command.codec:
            problem = (
                f"{name!r} is a {target.codec} command and {command.name!r} a "
                f"{command.codec} one: the request is built from the same JSON, so the "
                "codecs must agree"
            )
        else:
            problem = self._missing_fields(command, target, filled)
        if problem is not None:
            r.error(node, path, problem)
            return None
        return name

    def _missing_fields(
        self, command: CommandSpec, target: CommandSpec, filled: Sequence[str]
    ) -> str | None:
        schema = self.schema
        if target.request is None or schema is None or not schema.has_message(target.request):
            return None
        fields = schema.descriptor(target.request).fields
        known = {f.name for f in fields} | {f.json_name for f in fields}
        missing = [name for name in filled if name not in known]
        if not missing:
            return None
        return (
            f"the request of {target.name!r} ({target.request}) has no field "
            f"{', '.join(map(repr, missing))}, which {command.name!r} fills from its "
            "path or `fields`"
        )


def describe(spec: TrafficSpec) -> str:
    """One line saying what `spec` does, for `tlvproxy check`."""
    parts = []
    if spec.split:
        rules = ", ".join(f"{rule.key} {_matching(rule)} -> {rule.to}" for rule in spec.split)
        parts.append(f"split {rules}")
    if spec.mirror is not None:
        mirror = spec.mirror
        compared = ", compared" if mirror.compare else ""
        parts.append(f"mirror {_shown_percent(mirror.percent)} -> {mirror.to}{compared}")
    if spec.fallback is not None:
        kinds = []
        last_good = spec.fallback.last_good
        if last_good is not None:
            kinds.append(f"last_good by {last_good.key} for {last_good.ttl:g} s")
        if spec.fallback.body is not None:
            kinds.append("static body")
        parts.append("fallback " + ", else ".join(kinds))
    return "; ".join(parts)


def _matching(rule: SplitRule) -> str:
    if rule.tail is not None:
        return f"tail {sorted(rule.tail)}"
    if rule.values is not None:
        return f"values {sorted(rule.values)}"
    assert rule.percent is not None
    return _shown_percent(rule.percent)


def _shown_percent(basis_points: int) -> str:
    return f"{basis_points / 100:g}%"

"""Split, mirror and fallback at run time, for REST requests and json-mode
WebSocket messages alike (docs/configuration.md "split, mirror, fallback").

Owns: for each command of the running table that has rules, where a request
goes (its split, counted once sent), the mirrored copies (the share drawn
per request, the copy's body, the bound of MAX_OUTSTANDING copies in flight
per worker, and `run()`, which works out their outcomes in steps; each copy
itself is a `server/mirror.py` MirrorCopy), and the fallback answers (the
static body, the `last_good` caches, which a reload keeps while the
command's `last_good` and the schema stay the same, and which is served);
and which upstream pools are in force, for the traffic of sessions that keep
an older table (docs/operations.md "Reload").
Must not: build request bodies from HTTP or WebSocket input or render answers
(`server/rest_traffic.py` and `server/ws_traffic.py` do), delay or change a
caller's answer for a copy, or retry a copy.

A copy is built and submitted after its caller's request is submitted, on
the pool in force of the mirror's `to` command's upstream (`Traffic.pool`: a
session keeps its table, not that table's pools), with that command's
deadline and without the retries of an idempotent command (like any request never
written, it may still go to another node when its connection could not take
it). It never holds the caller up: the caller's answer is written by whoever
completes it, and a copy's outcome (and, with `compare`, the decoding and
comparing of both answers) is worked out later by `run()`, in a task of its
own, once both answers are in, a few thousand fields between two
checkpoints. A copy takes one of the MAX_OUTSTANDING places only once its
body is built, and `run()` alone gives it back, after both answers came: the
pool's (exactly one per submission) and the caller's (`MirroredCall.settled`,
which every completion of a mirrored request calls once, whatever its
outcome). Beyond MAX_OUTSTANDING, copies are dropped and counted, not queued.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from tlvproxy.config.keys import rule_value
from tlvproxy.config.model import BASIS_POINTS
from tlvproxy.errors import GatewayError
from tlvproxy.metrics import MIRROR_OUTCOMES
from tlvproxy.policy.last_good import LastGood, answer_key
from tlvproxy.policy.split import first_match
from tlvproxy.server.mirror import MirrorCopy

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from prometheus_client import Counter

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import CommandSpec, LastGoodSpec
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.last_good import AnswerKey
    from tlvproxy.server.mirror import MirroredCall
    from tlvproxy.upstream.pool import Pool

log = logging.getLogger("tlvproxy.mirror")
_fallback_log = logging.getLogger("tlvproxy.fallback")
# What a server makes of a fallback's answer: a REST response, a WebSocket text.
Rendered = TypeVar("Rendered")

# Copies of one worker waiting for their answers (docs/configuration.md "mirror").
MAX_OUTSTANDING: Final = 1000
# Fields and elements compared (or copies counted) between two checkpoints
# of `Traffic.run`: about a millisecond's work.
COMPARE_STEP: Final = 2000
# The errors a fallback answers in the upstream's place (docs/configuration.md "fallback").
FALLBACK_CODES: Final = frozenset(
    {"upstream_unavailable", "upstream_timeout", "upstream_protocol_error"}
)


def timeout_of(command: CommandSpec, table: CompiledTable) -> float:
    """The deadline of a request sent as `command`: its own timeout, or its upstream's."""
    if command.timeout is not None:
        return command.timeout
    assert command.upstream is not None  # a request command always names one
    return table.upstreams[command.upstream].timeout


def reencode(table: CompiledTable, source: CommandSpec, target: CommandSpec, body: bytes) -> bytes:
    """The frame body `body` (a request of `source`) as a request of `target`:
    the same bytes when both take the same request, else decoded to its JSON
    value and encoded again. Raises BadRequest when `target` cannot take it."""
    if same_request(source, target):
        return body
    value = table.codecs[source.name].decode_request(body)
    return table.codecs[target.name].encode_value(value)


def same_request(a: CommandSpec, b: CommandSpec) -> bool:
    """Whether a request body of `a` is one of `b` as it is (same codec and,
    for protobuf, the same request message)."""
    return a.codec == b.codec and (a.codec != "protobuf" or a.request == b.request)


class Traffic:
    """The traffic rules of one worker: what outlives a table (the copies in
    flight and their bound, the `last_good` caches, the pools in force) and
    `run()`, which works out the copies' outcomes. `for_table` gives each new
    table its rules."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # The upstream pools of the latest table, by upstream name (`pool`).
        self._pools: Mapping[str, Pool] = {}
        # Copies reserved and not yet worked out, also shown as
        # tlvproxy_mirror_outstanding (docs/operations.md "Metrics").
        self.outstanding = 0
        self._outstanding_gauge = metrics.mirror_outstanding
        # The `last_good` caches by command name, with what they were made for.
        self._caches: dict[str, tuple[object, LastGood]] = {}
        self._done: list[MirrorCopy] = []
        self._wake = trio.Event()

    def for_table(
        self, table: CompiledTable, pools: Mapping[str, Pool]
    ) -> dict[str, CommandTraffic]:
        """The rules of every command of `table` that has some; `pools`, the
        table's, become the pools in force (`pool`). A `last_good` cache is
        carried over from the previous table when the command's `last_good`
        is the same, and so are the schema (its `.proto` files) and the
        response messages of the commands its answers come from; the others
        are dropped."""
        self._pools = pools
        caches: dict[str, tuple[object, LastGood]] = {}
        result: dict[str, CommandTraffic] = {}
        for command in table.commands:
            rules = command.traffic
            if rules is None:
                continue
            cache = None
            last_good = None if rules.fallback is None else rules.fallback.last_good
            if last_good is not None:
                made_for = _made_for(table, command, last_good)
                kept = self._caches.get(command.name)
                if kept is not None and kept[0] == made_for:
                    cache = kept[1]
                else:
                    cache = LastGood(
                        ttl=last_good.ttl,
                        max_entries=last_good.max_entries,
                        max_bytes=last_good.max_bytes,
                    )
                caches[command.name] = (made_for, cache)
            result[command.name] = CommandTraffic(self, table, command, cache)
        self._caches = caches
        return result

    def pool(self, upstream: str) -> Pool | None:
        """The pool in force of `upstream`: the latest table's, or None when
        that table has no such upstream. A session keeps the table it opened
        on, but a reload retires the pools of the upstreams it changes or
        removes (docs/operations.md "Reload"): what a session sends on a pool
        goes to this one (docs/push-sessions.md "Split, mirror, fallback")."""
        return self._pools.get(upstream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Work out the outcome of every copy whose answers are both in, forever."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            done, self._done = self._done, []
            # About COMPARE_STEP fields compared between two checkpoints, so
            # that other tasks (the callers' answers) run in between, whatever
            # the answers' size; each copy counts as one.
            left = COMPARE_STEP
            for copy in done:
                try:
                    comparer = copy.work_out()
                    while comparer is not None:
                        spent = comparer.spent
                        comparison = comparer.step(left)
                        left -= comparer.spent - spent
                        if comparison is not None:
                            copy.compared(comparison)
                            break
                        await trio.lowlevel.checkpoint()
                        left = COMPARE_STEP
                except Exception:  # a bug costs one copy's outcome, not the worker
                    log.exception("working out a mirrored copy's outcome failed")
                finally:
                    self._release()
                left -= 1
                if left <= 0:
                    await trio.lowlevel.checkpoint()
                    left = COMPARE_STEP

    def reserve(self) -> None:
        """A copy takes one of the MAX_OUTSTANDING places (`MirrorCopy` does,
        when it is made)."""
        self.outstanding += 1
        self._outstanding_gauge.inc()

    def _release(self) -> None:
        self.outstanding -= 1
        self._outstanding_gauge.dec()

    def finished(self, copy: MirrorCopy) -> None:
        """Both of `copy`'s answers are in: `run` works out its outcome and
        gives its place back."""
        self._done.append(copy)
        self._wake.set()


def _made_for(table: CompiledTable, command: CommandSpec, last_good: LastGoodSpec) -> object:
    """What a `last_good` cache's answers depend on: the spec; the schema their
    bodies are read with (its digest: a `.proto` change that keeps a
    message's name but renumbers or retypes its fields reads old bodies
    wrongly); and the codec and response message of each command they may
    come from (split targets too)."""
    rules = command.traffic
    assert rules is not None  # a command with last_good has rules
    sources = [command, *(table.commands_by_name[rule.to] for rule in rules.split)]
    schema = None if table.schema is None else table.schema.digest
    return (last_good, schema, [(c.name, c.codec, c.response) for c in sources])


class CommandTraffic:
    """The rules of one command of one table: `route` and `sent`,
    `mirror_after`, `remember`, `fallback`."""

    __slots__ = (
        "_cache",
        "_counts",
        "_fallback",
        "_fallback_counts",
        "_key",
        "_numeric",
        "_rules",
        "_split_counts",
        "_splits",
        "command",
        "mirror",
        "mirror_to",
        "owner",
        "table",
    )

    def __init__(
        self,
        owner: Traffic,
        table: CompiledTable,
        command: CommandSpec,
        cache: LastGood | None,
    ) -> None:
        rules = command.traffic
        assert rules is not None  # only commands with rules get one
        metrics = owner._metrics
        self.owner = owner
        self.table = table
        self.command = command
        self._rules = rules.split
        self._fallback = rules.fallback
        self.mirror = rules.mirror
        by_name = table.commands_by_name
        # Each rule's `to` command, and the counter of the requests sent as
        # each `to` (rules with one `to` share it).
        self._splits = [by_name[rule.to] for rule in rules.split]
        self._split_counts = {
            rule.to: metrics.split.labels(command.name, rule.to) for rule in rules.split
        }
        self.mirror_to: CommandSpec | None = None
        if rules.mirror is not None:
            self.mirror_to = by_name[rules.mirror.to]
        # Series only for what the command has: a mirror's outcomes, a fallback's kinds.
        outcomes = () if rules.mirror is None else MIRROR_OUTCOMES
        self._counts: dict[str, Counter] = {
            outcome: metrics.mirror.labels(command.name, outcome) for outcome in outcomes
        }
        kinds = () if rules.fallback is None else ("static", "last_good")
        self._fallback_counts = {
            kind: metrics.fallbacks.labels(command.name, kind) for kind in kinds
        }
        self._cache = cache
        # The keys that fill a number for the command, read as numbers by
        # the split and `last_good` alike (docs/configuration.md "split").
        self._numeric = frozenset(command.numeric_keys)
        # The key of `last_good`: None without one.
        self._key = None
        if rules.fallback is not None and rules.fallback.last_good is not None:
            self._key = rules.fallback.last_good.key

    def pool(self, upstream: str) -> Pool | None:
        """The pool in force of `upstream` (`Traffic.pool`), whichever table
        these rules are of."""
        return self.owner.pool(upstream)

    # ------------------------------------------------------------ split

    def route(self, view: RequestView) -> CommandSpec:
        """The command the request `view` is to be sent as: a split rule's
        `to`, or the command itself (docs/configuration.md "split")."""
        rules = self._rules
        if not rules:
            return self.command
        index = first_match(rules, view, self._numeric)
        return self.command if index is None else self._splits[index]

    def sent(self, sent: CommandSpec) -> None:
        """The request `route` chose `sent` for was submitted: a split counts
        it now, not a request refused before (a 400, a 403)."""
        if sent is not self.command:
            self._split_counts[sent.name].inc()

    # ------------------------------------------------------------ mirror

    def mirror_after(
        self,
        caller: MirroredCall,
        sent: CommandSpec,
        request_id: str,
        encode: Callable[[CommandSpec], bytes],
        uid: int,
        view: RequestView,
    ) -> None:
        """Send the mirror's copy of a request just submitted as `sent`, whose
        outcome `caller` will tell (or has told) the copy (docs/configuration.md
        "mirror"). No copy: no mirror, not this request's share, already sent as
        the mirror's `to` by a split, MAX_OUTSTANDING copies in flight (dropped,
        counted), or a body `to` refuses (`encode(to)` raised: failed, counted).
        The copy holds its place from here until `Traffic.run` works it out."""
        to, mirror = self.mirror_to, self.mirror
        if to is None or mirror is None or sent is to:
            return
        share = mirror.percent
        if share < BASIS_POINTS and random.randrange(BASIS_POINTS) >= share:
            return
        owner = self.owner
        if owner.outstanding >= MAX_OUTSTANDING:
            self.count("dropped")
            return
        try:
            body = encode(to)
        except GatewayError:
            self.count("failed")
            return
        copy = MirrorCopy(self, sent, request_id)
        caller.attach(copy)
        copy.send(body, uid, view, timeout_of(to, self.table))

    def count(self, outcome: str) -> None:
        """Count a copy's outcome (docs/configuration.md "mirror")."""
        self._counts[outcome].inc()

    # ------------------------------------------------------------ fallback

    def last_good_key(self, view: RequestView, uid: int, request: bytes) -> AnswerKey | None:
        """What an answer to the request `view`, sent as a frame of `uid` and
        body `request`, is kept and served under (docs/configuration.md
        "fallback"): None without `last_good`, or when its key is absent or empty."""
        key = self._key
        if key is None:
            return None
        value = rule_value(key, view, self._numeric)
        return None if value is None else answer_key(value, uid, request)

    def remember(self, key: AnswerKey | None, sent: CommandSpec, body: bytes) -> None:
        """Keep a status-0 answer of `sent` for `last_good` under `key`, the
        request's `last_good_key` (when it has one)."""
        cache = self._cache
        if cache is not None and key is not None:
            cache.keep(key, trio.current_time(), sent.name, body)

    def fallback(
        self,
        error: GatewayError,
        key: AnswerKey | None,
        render: Callable[[CommandSpec, bytes], Rendered],
    ) -> tuple[str, Rendered] | None:
        """What answers in the upstream's place after `error`: its kind
        (`last_good`, `static`) and what `render` made of the response body of
        the command it names, counted; or None when the error stands: not an
        error a fallback answers, or neither a fresh `last_good` answer for
        `key` (the request's `last_good_key`) nor a static body that renders.
        A kept answer that `render` refuses (raising GatewayError: too large
        for the table's limits now, say) gives way to the static body."""
        spec = self._fallback
        if spec is None or error.code not in FALLBACK_CODES:
            return None
        cache = self._cache
        if cache is not None and key is not None:
            kept = cache.fresh(key, trio.current_time())
            if kept is not None:
                command = self.table.commands_by_name.get(kept.command)
                if command is not None:  # else it left the table with a reload
                    rendered = self._render(render, "last_good", command, kept.body)
                    if rendered is not None:
                        return rendered
        if spec.body is not None:
            return self._render(render, "static", self.command, spec.body)
        return None

    def _render(
        self,
        render: Callable[[CommandSpec, bytes], Rendered],
        kind: str,
        command: CommandSpec,
        body: bytes,
    ) -> tuple[str, Rendered] | None:
        try:
            rendered = render(command, body)
        except GatewayError as failed:
            _fallback_log.warning(
                "a fallback answer did not render",
                extra={"command": self.command.name, "kind": kind, "error": failed.message},
            )
            return None
        self._fallback_counts[kind].inc()
        return kind, rendered

"""A mirrored copy of a request, from its submission to its outcome
(docs/configuration.md "mirror").

Owns: `MirrorCopy`, the copy on its way to the mirror's `to` command (the
pool's completion of it), which learns both answers and, once `Traffic.run`
takes it, counts its outcome or hands over the comparison to make and logs
the fields that differ; and `MirroredCall`, the caller's side of a copied
request, which tells the copy its caller's outcome exactly once, whether it
comes before the copy is made or after.
Must not: decide whether a request is copied, hold or give back a place
among the outstanding copies other than by `Traffic.reserve` (when a copy is
made) and `Traffic.finished` (when both answers are in), or retry a copy
(`server/traffic.py` decides all that).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from tlvproxy.errors import UpstreamProtocolError, UpstreamUnavailable
from tlvproxy.schema.compare import Comparer

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import CommandSpec, MirrorSpec
    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame
    from tlvproxy.schema.compare import Comparison
    from tlvproxy.upstream.pool import Pool

log = logging.getLogger("tlvproxy.mirror")


class Outstanding(Protocol):
    """The worker's count of copies against its bound (traffic.py's Traffic)."""

    def reserve(self) -> None: ...

    def finished(self, copy: MirrorCopy) -> None: ...


class CommandTraffic(Protocol):
    """What a copy needs of its command's rules (traffic.py's CommandTraffic,
    which imports this module: named here by what it does)."""

    @property
    def owner(self) -> Outstanding: ...

    @property
    def table(self) -> CompiledTable: ...

    @property
    def command(self) -> CommandSpec: ...

    @property
    def mirror(self) -> MirrorSpec | None: ...

    @property
    def mirror_to(self) -> CommandSpec | None: ...

    def pool(self, upstream: str) -> Pool | None: ...

    def count(self, outcome: str) -> None: ...


class MirroredCall:
    """The caller's side of a request that a mirror may copy: the base of the
    pool's or the session's completion of that request, which calls `settled`
    once, on every outcome. It passes the outcome to the copy, whether the
    copy is made before it comes or after (the pool may settle a request
    before `submit` returns, and the copy is made after `submit`)."""

    __slots__ = ("_answer", "_copy", "_settled")

    def __init__(self) -> None:
        self._copy: MirrorCopy | None = None
        self._settled = False
        self._answer: Frame | None = None

    def attach(self, copy: MirrorCopy) -> None:
        """`copy` learns this request's outcome: now if it came, else when it does."""
        if self._settled:
            copy.caller_settled(self._answer)
        else:
            self._copy = copy

    def settled(self, answer: Frame | None) -> None:
        """The request's outcome: its answer, or None when it got none."""
        self._settled = True
        self._answer = answer
        copy = self._copy
        if copy is not None:
            self._copy = None
            copy.caller_settled(answer)


class MirrorCopy:
    """One copy of a request on its way to the mirror's `to` command: the
    pool's `Completion`. It learns the caller's answer too (`caller_settled`),
    and once both are in, `Traffic.run` works out its outcome. Made, it holds
    one of the MAX_OUTSTANDING places, which `Traffic.run` gives back."""

    __slots__ = ("_pending", "primary", "reply", "request_id", "sent", "traffic")

    def __init__(self, traffic: CommandTraffic, sent: CommandSpec, request_id: str) -> None:
        self.traffic = traffic
        self.sent = sent  # what the caller's request was sent as
        self.request_id = request_id
        self.primary: Frame | None = None  # the caller's answer; None: it failed
        self.reply: Frame | None = None  # the copy's answer; None: it failed
        self._pending = 2  # answers still to come: the caller's and the copy's
        traffic.owner.reserve()

    def send(self, body: bytes, uid: int, view: RequestView, timeout: float) -> None:
        """Submit the copy, `body` being a request of the mirror's `to` command,
        whose deadline is `timeout` from now, on the pool in force of its
        upstream. Whatever becomes of it, the copy's outcome comes (`on_reply`
        or `on_error`), now or later: its place is given back once the
        caller's is in too."""
        traffic = self.traffic
        to = traffic.mirror_to
        assert to is not None  # a copy exists only then
        assert to.upstream is not None  # the loader checked it
        pool = traffic.pool(to.upstream)
        if pool is None:
            # A reload removed the upstream; the caller's table still names it.
            self.on_error(UpstreamUnavailable(f"upstream {to.upstream!r} left the table"), None)
            return
        hash_on = pool.spec.hash_on
        pool.submit(
            self,
            to.command,
            body,
            uid=uid,
            key=None if hash_on is None else hash_on.evaluate(view),
            deadline=trio.current_time() + timeout,
        )

    def caller_settled(self, answer: Frame | None) -> None:
        """The caller's request's outcome: its answer, or None when it got none."""
        self.primary = answer
        self._arrived()

    # The pool's side (`Completion`).

    def on_reply(self, frame: Frame, node: str) -> None:
        self.reply = frame
        self._arrived()

    def on_error(self, error: GatewayError, node: str | None) -> None:
        self._arrived()

    def _arrived(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self.traffic.owner.finished(self)

    def work_out(self) -> Comparer | None:
        """Count the outcome, or, with `compare` and both answers in, return
        the comparison to make (`compared` takes its result)."""
        traffic = self.traffic
        mirror, to = traffic.mirror, traffic.mirror_to
        assert mirror is not None  # a copy exists only then
        assert to is not None
        reply, primary = self.reply, self.primary
        if reply is None:
            traffic.count("failed")
            return None
        if not mirror.compare:
            traffic.count("answered")
            return None
        if primary is None:
            traffic.count("failed")
            return None
        codecs = traffic.table.codecs
        try:
            return Comparer(
                (codecs[self.sent.name], primary.status, primary.body),
                (codecs[to.name], reply.status, reply.body),
                show_values=mirror.log_values,
            )
        except UpstreamProtocolError as exc:
            traffic.count("failed")
            log.debug(
                "a mirrored answer did not decode",
                extra={"command": traffic.command.name, "error": exc.message},
            )
            return None

    def compared(self, comparison: Comparison) -> None:
        """Count the comparison's outcome, and log the fields that differ."""
        traffic = self.traffic
        mirror, to = traffic.mirror, traffic.mirror_to
        assert mirror is not None  # a copy exists only then
        assert to is not None
        if comparison.same:
            traffic.count("same")
            return
        traffic.count("different")
        extra: dict[str, object] = {
            "command": self.sent.name,
            "to": to.name,
            "request_id": self.request_id,
            "paths": [difference.path for difference in comparison.differences],
            "more_paths": comparison.more,
        }
        if mirror.log_values:
            extra["values"] = {d.path: [d.left, d.right] for d in comparison.differences}
        log.info("mirrored answers differ", extra=extra)

"""Following every key under an etcd prefix (docs/operations.md "Watching etcd").

Owns: the keys of one prefix as last read, the revision they are complete up
to, and the watch that keeps them current: reconnects with capped exponential
backoff and jitter, resumes after the last revision applied, reads the whole
prefix again when that revision has been compacted, and probes a watch that
has been quiet for PROBE_INTERVAL so a half-dead one is torn down; and the
bounds on what it holds (keys, bytes of one value, bytes in all), since
whoever writes to etcd chooses what is read.
Must not: know what the keys mean (`tables.py` and `upstream/discovery.py`
do), or stop: while etcd cannot be reached it keeps trying, and the keys it
has stay as they were.

Never skipping an event (APISIX lost changes by resuming from the revision of
an answer's header): the resume point moves only to the revision of an event
applied, of a whole-prefix read, or of a progress notification, which etcd
sends only once every event up to it has been sent. The header of an answer
carrying events can be ahead of events still to come, so it is never used.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Final

import attrs
import trio

from tlvproxy.errors import first_of
from tlvproxy.etcd.client import EtcdUnavailable
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.etcd.client import EtcdClient
    from tlvproxy.etcd.wire import KeyValue, WatchAnswer

log = logging.getLogger("tlvproxy.etcd")

BACKOFF_MIN: Final = 0.2  # seconds before the first reconnect
BACKOFF_MAX: Final = 10.0
# A watch that has been quiet this long is checked by reading the prefix's keys
# (without values); a probe with no answer within PROBE_TIMEOUT, or one that
# finds a change the watch did not bring, tears the watch down.
PROBE_INTERVAL: Final = 10.0
PROBE_TIMEOUT: Final = 5.0
# A read of the whole prefix, or a probe, that gets no answer in this time fails.
READ_TIMEOUT: Final = 10.0
# A watch that etcd has not confirmed (its `created` answer) in this time fails.
OPEN_TIMEOUT: Final = 10.0
# Every timeout above moves the client to its next endpoint (`failed`).


class TooManyKeys(Exception):
    """The prefix holds more keys, or more bytes of values, than the watcher keeps."""


class _WatchDown(Exception):
    """The watch must be opened again; `str()` says why."""


_FAILURES: Final = (EtcdUnavailable, EtcdRefused, MalformedAnswer, TooManyKeys, _WatchDown)


class PrefixWatch:
    """The keys under `prefix` (bytes, ending in `/`), kept current by `run()`.

    `keys` is replaced, never changed in place, and `generation` counts the
    replacements; `wait_changed` waits for the next one.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        *,
        max_keys: int,
        max_value: int | None = None,
        max_total: int | None = None,
    ) -> None:
        """At most `max_keys` keys are kept; a value over `max_value` bytes is
        kept as an `oversize` key without its bytes (logged), and values
        adding up to more than `max_total` are refused like too many keys."""
        self._client = client
        self.prefix = prefix
        self._max_keys = max_keys
        self._max_value = max_value
        self._max_total = max_total
        self.keys: Mapping[bytes, KeyValue] = {}
        self.revision = 0  # every change up to this revision is in `keys`
        self.generation = 0
        self._changed = trio.Event()
        self._last_heard = 0.0
        self._backoff = BACKOFF_MIN
        self._down_since: float | None = None
        # Set when what the watch brings cannot be applied on top of `keys`
        # (the revision was compacted, an event pushed the prefix over
        # max_keys): the whole prefix is read again before watching.
        self._must_read = False
        self._random = random.Random()

    @property
    def shown(self) -> str:
        return self.prefix.decode("utf-8", errors="replace")

    async def read(self) -> None:
        """Read the whole prefix at the latest revision (a new generation when
        the keys differ). Raises EtcdUnavailable, EtcdRefused, MalformedAnswer,
        TooManyKeys; on a timeout, EtcdUnavailable."""
        endpoint = self._client.endpoint
        with trio.move_on_after(READ_TIMEOUT):
            answer = await self._client.range_prefix(self.prefix, limit=self._max_keys + 1)
            if answer.more or len(answer.kvs) > self._max_keys:
                raise TooManyKeys(f"more than {self._max_keys} keys under {self.shown}")
            keys = {kv.key: self._bounded(kv) for kv in answer.kvs}
            self._check_total(keys)
            self.revision = answer.revision
            self._replace(keys)
            return
        self._client.failed(endpoint)
        raise EtcdUnavailable(f"etcd at {endpoint} did not answer within {READ_TIMEOUT:g} s")

    async def wait_changed(self, generation: int) -> int:
        """Wait until `generation` is past; returns the current one."""
        while self.generation == generation:
            await self._changed.wait()
        return self.generation

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the prefix for ever, from `revision` + 1 (see the module doc).

        Reports started at once: the caller has read the prefix already."""
        task_status.started()
        while True:
            try:
                if self._must_read:
                    await self.read()
                    self._must_read = False
                await self._follow()
                # The prefix must be read again (a compaction): after the
                # backoff too, so a storm of them does not loop at once.
                failure: Exception | None = None
            except* _FAILURES as group:
                failure = first_of(group)
            except* Exception as group:
                # A bug, or an answer nobody foresaw: the watcher must not
                # end over it (the keys would stay as they are for ever).
                failure = first_of(group)
                log.error(
                    "the etcd watch failed unexpectedly; retrying",
                    extra={"prefix": self.shown, "revision": self.revision},
                    exc_info=failure,
                )
            await self._back_off(failure)

    async def _back_off(self, failure: Exception | None) -> None:
        """Log `failure` (the first of an outage as a warning), then wait the
        backoff, doubled for the next time."""
        if failure is not None and self._down_since is None:
            self._down_since = trio.current_time()
            log.warning(
                "the etcd watch is down; retrying, the keys read stay",
                extra={"prefix": self.shown, "revision": self.revision, "error": str(failure)},
            )
        elif failure is not None:
            log.debug("etcd watch retry failed", extra={"error": str(failure)})
        # Jitter over the upper half of the delay: gateways that lost etcd
        # together do not all come back at the same instant.
        await trio.sleep(self._backoff * (0.5 + self._random.random() / 2))
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    async def _follow(self) -> None:
        """One watch: returns when it must be opened again at once (after a
        compaction); raises when it failed (the exception says why)."""
        endpoint = self._client.endpoint
        # From the request to etcd's first answer (`created`): a member that
        # takes the connection and never answers must not hold the watch.
        with trio.move_on_after(OPEN_TIMEOUT) as opening:
            async with (
                self._client.watch(self.prefix, self.revision + 1) as answers,
                trio.open_nursery() as nursery,
            ):
                async for answer in answers:
                    self._last_heard = trio.current_time()
                    if opening.deadline != math.inf:
                        opening.deadline = math.inf
                        self._opened()
                        nursery.start_soon(self._probe_while_quiet)
                    if await self._apply(answer):
                        nursery.cancel_scope.cancel()
                        return
                raise _WatchDown("etcd ended the watch")
        self._client.failed(endpoint)
        raise _WatchDown(f"etcd at {endpoint} did not open the watch within {OPEN_TIMEOUT:g} s")

    def _opened(self) -> None:
        if self._down_since is not None:
            log.info(
                "the etcd watch is back", extra={"prefix": self.shown, "revision": self.revision}
            )
            self._down_since = None

    async def _apply(self, answer: WatchAnswer) -> bool:
        """Apply one answer; True when the watch must be opened again."""
        if answer.canceled:
            if answer.compact_revision:
                # Our revision is gone from etcd's history: read everything,
                # at a new revision, and watch from there.
                log.info(
                    "the etcd revision to resume from was compacted; reading the prefix again",
                    extra={"prefix": self.shown, "compact_revision": answer.compact_revision},
                )
                self._must_read = True
                return True
            raise _WatchDown(f"etcd canceled the watch: {answer.cancel_reason or 'no reason'}")
        if answer.created:
            return False  # its header revision says nothing about what was sent
        if not answer.events:
            # A progress notification: every event up to here has been sent.
            self.revision = max(self.revision, answer.revision)
            self._backoff = BACKOFF_MIN
            return False
        keys = dict(self.keys)
        for event in answer.events:
            if not event.kv.key.startswith(self.prefix):
                raise MalformedAnswer("a watch event for a key outside the prefix")
            # After what `keys` holds, and not after the answer's own header:
            # a bogus huge revision would make every later event look old.
            if not self.revision < event.kv.mod_revision <= answer.revision:
                raise MalformedAnswer(
                    f"a watch event at revision {event.kv.mod_revision}, not in "
                    f"({self.revision}, {answer.revision}]"
                )
            if event.deleted:
                keys.pop(event.kv.key, None)
            else:
                keys[event.kv.key] = self._bounded(event.kv)
        try:
            if len(keys) > self._max_keys:
                raise TooManyKeys(f"more than {self._max_keys} keys under {self.shown}")
            self._check_total(keys)
        except TooManyKeys:
            # Watching from the same revision would bring this event again:
            # read the prefix until it fits.
            self._must_read = True
            raise
        self.revision = max(self.revision, *(event.kv.mod_revision for event in answer.events))
        self._replace(keys)
        self._backoff = BACKOFF_MIN  # the watch works: the next failure starts afresh
        return False

    async def _probe_while_quiet(self) -> None:
        while True:
            await trio.sleep_until(self._last_heard + PROBE_INTERVAL)
            if trio.current_time() < self._last_heard + PROBE_INTERVAL:
                continue
            endpoint = self._client.endpoint
            with trio.move_on_after(PROBE_TIMEOUT):
                answer = await self._client.range_prefix(
                    self.prefix, limit=self._max_keys + 1, keys_only=True
                )
                seen = {kv.key: kv.mod_revision for kv in answer.kvs}
                if seen != {key: kv.mod_revision for key, kv in self.keys.items()}:
                    # etcd has what a quiet watch did not bring.
                    raise _WatchDown("the watch missed a change")
                self._last_heard = trio.current_time()
                self._backoff = BACKOFF_MIN
                continue
            self._client.failed(endpoint)
            raise _WatchDown(
                f"etcd at {endpoint} did not answer a probe within {PROBE_TIMEOUT:g} s"
            )

    def _bounded(self, kv: KeyValue) -> KeyValue:
        """`kv`, or, when its value is over `max_value`, the key without it."""
        if self._max_value is None or len(kv.value) <= self._max_value:
            return kv
        held = self.keys.get(kv.key)
        if held is None or held.mod_revision != kv.mod_revision:  # logged once per write
            log.warning(
                "a value under the etcd prefix is too large to keep; its key is refused",
                extra={
                    "key": kv.key[:200].decode("utf-8", "replace"),
                    "bytes": len(kv.value),
                    "max_bytes": self._max_value,
                },
            )
        return attrs.evolve(kv, value=b"", oversize=True)

    def _check_total(self, keys: Mapping[bytes, KeyValue]) -> None:
        if self._max_total is None:
            return
        if sum(len(kv.value) for kv in keys.values()) > self._max_total:
            raise TooManyKeys(f"more than {self._max_total} bytes of values under {self.shown}")

    def _replace(self, keys: dict[bytes, KeyValue]) -> None:
        if keys == self.keys:
            return
        self.keys = keys
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()

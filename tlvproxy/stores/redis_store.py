"""`store: redis`: buckets shared by every gateway using one Redis
(docs/configuration.md "Where the buckets live", "When the store cannot answer").

Owns: the Redis client of one `redis.url` (coredis, on trio through anyio), the
bucket script (the reference's arithmetic in Lua, one EVALSHA per check, on
Redis's own clock), the task that sends the checks of one scheduler pass as one
pipeline (up to _MAX_CONNECTIONS pipelines at once), the 50 ms answer budget of
each check, and the shape its replies must have.

A pipeline is never cancelled from outside: coredis would drop the pooled
connection it was using without freeing its place in the pool, and after a few
slow answers the client would have no connection left. The client's own
timeouts bound a pipeline; each check's budget is kept apart, by a task that
fails the checks still unanswered at their deadline (a late answer is then
dropped).
Must not: decide what a failed check means (the rule's `on_store_error` does,
in `limits.py`), or wait for Redis on a request's task: a check is submitted
and its `Waiter` resolved by this store's task.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

import anyio
import attrs
import coredis
import trio
from coredis.exceptions import NoScriptError, RedisError
from coredis.retry import NoRetryPolicy

from tlvproxy.stores.waiters import Failed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tlvproxy.stores.waiters import Answer, Waiter

log = logging.getLogger("tlvproxy.ratelimit")

# How long a check may wait for its verdict, from its submission
# (docs/configuration.md "When the store cannot answer").
ANSWER_BUDGET: Final = 0.05
# Checks sent in one pipeline at most; more wait for the next.
_MAX_BATCH = 512
# Connections the client may open, and pipelines in flight at once: each takes one.
_MAX_CONNECTIONS = 8
# Checks waiting for a pipeline at most: past it (Redis too slow for the
# request rate), a check fails at once rather than growing the queue.
_MAX_QUEUED = 16384
# The client's own bound on a connect and on a pipeline's answer (seconds).
# It also bounds how long a store tries, when it starts, to connect and load
# the script before it says it is ready: the first checks would otherwise
# spend their budget on that. Redis down or slow then delays a gateway's start
# by this much at most.
_CLIENT_TIMEOUT = 1.0

# The arithmetic of policy/ratelimit.py's ProcessBuckets.check, on every bucket of
# one request at once. KEYS: the buckets. ARGV[1]: the time in seconds, or ""
# for Redis's TIME (the gateway's choice: one clock for every gateway); then
# each bucket's rate per second and burst. A bucket is "LEVEL LAST" (%.17g:
# doubles round-trip exactly), kept until it has drained (a drained bucket
# admits exactly as an absent one). Returns {0} when every bucket counted the
# request, else {position of the first refusing bucket (from 1), retry-after}
# and nothing is written.
SCRIPT: Final = """
local now = tonumber(ARGV[1])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local epsilon = 1e-9
local levels = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local level = 1
  local stored = redis.call('GET', key)
  if stored then
    local held, last = string.match(stored, '^(%S+) (%S+)$')
    held = tonumber(held)
    last = tonumber(last)
    if held and last then
      local elapsed = now - last
      if elapsed > 0 then
        held = held - rate * elapsed
      end
      if held - burst > epsilon then
        local wait = (held - burst) / rate
        return {i, math.max(1, math.ceil(wait - epsilon))}
      end
      if held > 0 then
        level = held + 1
      end
    end
  end
  levels[i] = level
end
for i, key in ipairs(KEYS) do
  local ttl = math.max(1, math.ceil(levels[i] / tonumber(ARGV[2 * i])))
  redis.call('SET', key, string.format('%.17g %.17g', levels[i], now), 'EX', ttl)
end
return {0}
"""
# Redis names a script by its SHA-1.
_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()


@attrs.define(slots=True)
class _Check:
    keys: Sequence[bytes]
    args: Sequence[bytes]  # ARGV: the time (b"" for Redis's), then rate, burst per key
    waiter: Waiter
    deadline: float  # when it fails unless answered: ANSWER_BUDGET after its submission
    done: bool = False  # its waiter was resolved


class RedisBuckets:
    """The buckets in the Redis at `url`; `run` serves checks until cancelled.

    `submit` never waits: the check goes out with the others of its scheduler
    pass in one pipeline, and its waiter is resolved within ANSWER_BUDGET
    seconds, with Failed when Redis is down, slow or answers what the script
    cannot have. The client reconnects by itself on a later check.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._queue: deque[_Check] = deque()  # not sent yet
        self._outstanding: deque[_Check] = deque()  # not answered yet, oldest first
        self._wake = trio.Event()  # a check was queued
        self._arrived: trio.Event | None = None  # a check came while none was outstanding
        self._pipelines = trio.Semaphore(_MAX_CONNECTIONS)
        self._failing = False  # logged once per outage, not per check
        self._stopped = False

    def submit(self, keys: Sequence[bytes], args: Sequence[bytes], waiter: Waiter) -> None:
        """Check one request on the buckets `keys` (ARGV `args`, see SCRIPT)."""
        check = _Check(keys, args, waiter, trio.current_time() + ANSWER_BUDGET)
        if self._stopped:
            self._settle(check, Failed("the store stopped"))
            return
        if len(self._queue) >= _MAX_QUEUED:
            self._settle(check, Failed(f"{_MAX_QUEUED} checks already wait for Redis"))
            return
        if not self._outstanding and self._arrived is not None:
            self._arrived.set()
        self._outstanding.append(check)
        self._queue.append(check)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer checks until cancelled. Ready once connected with the script
        loaded, or after _CLIENT_TIMEOUT: a gateway starts while Redis is
        down, and its checks find Redis when it comes."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire)
                while True:
                    try:
                        async with self._client() as client:
                            if not started:
                                await self._prepare(client)
                                started = True
                                task_status.started()
                            await self._serve(client)
                    except Exception:
                        # A failure of the client's own tasks ends only this
                        # client: checks go on with a new one, and those it held
                        # fail at their deadline.
                        log.exception(
                            "the Redis client failed; starting a new one", extra=self._where()
                        )
                        if not started:
                            started = True
                            task_status.started()
        finally:
            # Stopped (the gateway exits, or a reload names another Redis): the
            # checks not answered hear once too, and later ones at once.
            self._stopped = True
            self._queue.clear()
            outstanding, self._outstanding = self._outstanding, deque()
            for check in outstanding:
                self._settle(check, Failed("the store stopped"))

    def _client(self) -> coredis.Redis[bytes]:
        return coredis.Redis.from_url(
            self.url,
            retry_policy=NoRetryPolicy(),  # the budget, not retries, bounds a check
            max_connections=_MAX_CONNECTIONS,
            connect_timeout=_CLIENT_TIMEOUT,
            stream_timeout=_CLIENT_TIMEOUT,
            # A password written %-escaped in the URL (docs/configuration.md "redis").
            decode_components=True,
            verify_version=False,
        )

    async def _serve(self, client: coredis.Redis[bytes]) -> None:
        """Send what is queued, one pipeline per batch, each in a task of its
        own, at most _MAX_CONNECTIONS at once."""
        async with trio.open_nursery() as pipelines:
            while True:
                while not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await self._pipelines.acquire()
                queue = self._queue
                batch: list[_Check] = []
                while queue and len(batch) < _MAX_BATCH:
                    check = queue.popleft()
                    if not check.done:  # failed at its deadline while it waited
                        batch.append(check)
                if batch:
                    pipelines.start_soon(self._answer, client, batch)
                else:
                    self._pipelines.release()

    async def _prepare(self, client: coredis.Redis[bytes]) -> None:
        try:
            await client.script_load(SCRIPT)
        except (RedisError, OSError, anyio.BrokenResourceError, TimeoutError) as exc:
            # Not an outage yet: the first check finds out, and says so.
            log.info("Redis is not there yet", extra={**self._where(), "reason": str(exc)})

    async def _answer(self, client: coredis.Redis[bytes], batch: list[_Check]) -> None:
        """Resolve the checks of `batch` that are still waiting with Redis's
        answers, or with Failed if the pipeline fails."""
        try:
            answers = await self._evaluate(client, batch)
        except (
            RedisError,
            OSError,
            TimeoutError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            answers = [Failed(f"{type(exc).__name__}: {exc}")] * len(batch)
        finally:
            self._pipelines.release()
        for check, answer in zip(batch, answers, strict=True):
            self._settle(check, answer)

    async def _expire(self) -> None:
        """Fail each check still unanswered at its deadline: the budget holds
        however slow Redis is, and its late answer is dropped."""
        outstanding = self._outstanding
        while True:
            while outstanding and outstanding[0].done:
                outstanding.popleft()
            if not outstanding:
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            deadline = outstanding[0].deadline
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            now = trio.current_time()
            expired = False
            while outstanding and (outstanding[0].done or outstanding[0].deadline <= now):
                check = outstanding.popleft()
                if not check.done:
                    expired = True
                    self._settle(check, Failed(f"no answer within {ANSWER_BUDGET * 1000:g} ms"))
            if expired:
                self._failed(f"no answer within {ANSWER_BUDGET * 1000:g} ms")

    @staticmethod
    def _settle(check: _Check, answer: Answer) -> None:
        """Resolve `check` with `answer`, unless it was already."""
        if check.done:
            return
        check.done = True
        try:
            check.waiter.resolve(answer)
        except Exception:
            # A waiter's bug costs its own request, never the other checks of the batch.
            log.exception("a rate-limit waiter failed")

    async def _evaluate(self, client: coredis.Redis[bytes], batch: list[_Check]) -> list[Answer]:
        replies = await _pipeline(client, batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted (or flushed its scripts): load the script once,
            # and send those checks again.
            await client.script_load(SCRIPT)
            again = await _pipeline(client, [batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        answers = [
            _answer(reply, len(check.keys)) for check, reply in zip(batch, replies, strict=True)
        ]
        failed = next((answer for answer in answers if isinstance(answer, Failed)), None)
        if failed is not None:
            self._failed(failed.reason)
        elif self._failing:
            self._failing = False
            log.warning("Redis answers rate-limit checks again", extra=self._where())
        return answers

    def _failed(self, reason: str) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "Redis cannot answer rate-limit checks; on_store_error decides",
                extra={**self._where(), "reason": reason},
            )

    def _where(self) -> dict[str, str]:
        # The URL may hold a password: the log names the host only.
        return {"redis": self.url.rpartition("@")[2]}


async def _pipeline(client: coredis.Redis[bytes], batch: Sequence[_Check]) -> list[object]:
    """One EVALSHA per check in one round trip; a reply is the script's result
    or the error Redis answered for that check."""
    async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
        for check in batch:
            pipe.evalsha(_SHA, check.keys, check.args)
    return list(pipe.results or ())


def _answer(reply: object, count: int) -> Answer:
    """The script's reply, checked: Redis is not trusted to answer only what
    the script can return."""
    if isinstance(reply, BaseException):
        return Failed(f"{type(reply).__name__}: {reply}")
    if isinstance(reply, list) and all(type(item) is int for item in reply):
        if reply == [0]:
            return None
        if len(reply) == 2 and 1 <= reply[0] <= count and reply[1] >= 1:
            return reply[0] - 1, reply[1]
    return Failed(f"unexpected reply {reply!r:.80}")

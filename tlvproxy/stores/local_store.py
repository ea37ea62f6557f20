"""`store: local`: the buckets every worker process of one gateway shares, in an
LMDB file (docs/configuration.md "Where the buckets live", "Capacity").

Owns: the LMDB environment in the gateway's runtime directory, checks made
together in one write transaction (every rule of a request is checked, and
counted or not, at once), the expiry of drained buckets, the bound on their
number, and the recovery of reader slots left by killed workers.
Must not: read a clock (the caller passes `now`, on a clock every process of
the box shares: `time.monotonic`), import trio, or outlive the gateway's run:
the state is ephemeral, and a new gateway starts from a new directory.

Why LMDB: a memory map that several processes open at once, one writer at a
time under a robust mutex (a writer killed with SIGKILL does not leave the lock
held), and transactions of a few microseconds without fsync (`sync=False,
metasync=False, writemap=True`: nothing here must survive a crash).

Why checks together: what a transaction costs is mostly its reads and writes
of buckets and the pages it takes from the other workers' caches, and the
requests of one scheduler pass mostly share their buckets (one caller, one
address). A batch reads each bucket once, applies every check to it in order,
as one transaction each would, and writes it once. Only the bound on buckets
(`max_keys`) is applied once per batch, after its checks, sparing every bucket
they used. A batch that admits every check, the usual one, is counted bucket by
bucket (each bucket's requests in a tight loop, which halves the work of ten
rules); one that refuses a check is made again one check after the other, as a
refusal takes its request back out of the buckets that counted it.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import lmdb

from tlvproxy.policy.ratelimit import EPSILON

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence
    from pathlib import Path

# The bound on buckets, and the map that holds them: a million buckets with the
# longest names (8-byte prefix, 64-byte value) took 108 MiB of the map inserted
# in order and 140 MiB in random order, so 512 MiB leaves room for LMDB's free
# pages. The file is sparse: only pages written take disk or memory
# (docs/configuration.md "Capacity").
MAX_KEYS: Final = 1_000_000
MAP_SIZE: Final = 512 * 1024 * 1024
# Every process may open read transactions (stat, tools); the default of 126
# slots is too few for many workers with threads.
_MAX_READERS = 1024
# How often a process frees the reader slots of processes that died (seconds).
_READER_CHECK_INTERVAL = 10.0
# Buckets examined by the expiry sweep per bucket added: more than one, so the
# map shrinks back once a crowd of keys goes quiet (as the reference does).
_SWEEP_BATCH = 4
# A bucket: its level, when it last admitted, and its rule's rate (to expire it
# without knowing the rule).
_BUCKET = struct.Struct("<ddd")

# A check's answer: None (every bucket counted), or the position in `buckets`
# of the first that refused and the seconds after which it would admit.
Verdict = tuple[int, int] | None
# One rule of a check: the prefix of its buckets' names (names.local_prefix),
# its rate per second and burst, and the position of its key's value
# (names.bounded) in the check's values; the bucket's name is prefix + value.
Step = tuple[bytes, float, float, int]
# One request's check: its rules' steps, its key values, and the time.
Check = tuple["Sequence[Step]", "Sequence[bytes]", float]
# A bucket while a batch is checked: [level, time of the last admission, rate],
# or None for one the store does not hold.
_Bucket = list[float] | None


class StoreError(Exception):
    """The store cannot answer (its map is full, its files are gone); the rule's
    `on_store_error` decides (docs/configuration.md "When the store cannot answer")."""


class LocalBuckets:
    """The LMDB environment of one gateway's buckets, opened once per process.

    Its one check, `check_batch`, is synchronous and takes microseconds per
    request; `local_batches.LocalChecks` gives it the checks of a scheduler
    pass at once.
    """

    def __init__(
        self, directory: Path, *, max_keys: int = MAX_KEYS, map_size: int = MAP_SIZE
    ) -> None:
        """Open (or create) the store in `directory`, shared with every process
        that opens the same directory. Raises StoreError when it cannot."""
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        try:
            self._env = lmdb.open(
                str(directory),
                map_size=map_size,
                max_dbs=1,
                max_readers=_MAX_READERS,
                sync=False,
                metasync=False,
                writemap=True,
                readahead=False,
                meminit=False,
            )
            self._db = self._env.open_db(b"buckets")
            # Slots of readers that died before this process started.
            self._env.reader_check()
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the rate-limit store in {directory}: {exc}") from None
        self._next_reader_check = -math.inf
        # Where this process's expiry sweep goes on: each process walks the
        # whole store in turn, from wherever it stopped.
        self._sweep_from = b""

    def __len__(self) -> int:
        """How many buckets the store holds now (every process's)."""
        with self._env.begin(db=self._db) as txn:
            entries: int = txn.stat(self._db)["entries"]
            return entries

    def close(self) -> None:
        self._env.close()

    def check_batch(self, checks: Sequence[Check]) -> list[Verdict]:
        """Make `checks` in order, in one transaction, and answer each: the
        same arithmetic as `policy.ratelimit.ProcessBuckets.check`, and the
        same answers as one transaction per check while the store holds fewer
        than `max_keys` buckets (past it, evictions come after the checks, not
        between them). For each check either every
        bucket counts the request and its answer is None, or none does and it
        is the first refusing step's position and retry-after. Raises
        StoreError when the store cannot answer (for any of them)."""
        if checks and checks[0][2] >= self._next_reader_check:
            self._next_reader_check = checks[0][2] + _READER_CHECK_INTERVAL
            self._free_readers()
        try:
            return self._check_all(checks)
        except lmdb.MapFullError:
            # The map is full despite MAX_KEYS (free pages held by a reader
            # that never ends): these checks fail, and the store starts afresh.
            self._empty()
            raise StoreError("the rate-limit store was full; every bucket starts afresh") from None
        except lmdb.Error as exc:
            raise StoreError(f"the rate-limit store failed: {exc}") from None

    def _check_all(self, checks: Sequence[Check]) -> list[Verdict]:
        # One write transaction: the checks and their counts are atomic across
        # processes. Every bucket is read once and written once, if counted in.
        with self._env.begin(write=True, db=self._db) as txn:
            get = txn.get
            counts = _count_every_check(get, checks)
            if counts is None:
                verdicts, counts = _check_one_by_one(get, checks)
            else:
                verdicts = [None] * len(checks)
            put = txn.put
            pack = _BUCKET.pack
            for name, bucket in counts.changed.items():
                put(name, pack(*bucket))
            if counts.added:
                # After the writes: the buckets just counted hold at least one
                # request, so the sweep keeps them, and over the bound it
                # evicts others.
                self._sweep(txn, checks[-1][2], _SWEEP_BATCH * counts.added, counts.used)
        return verdicts

    def _sweep(
        self, txn: lmdb.Transaction, now: float, limit: int, keep: Collection[bytes]
    ) -> None:
        """Examine up to `limit` buckets from where the last sweep stopped:
        delete those that have drained (a drained bucket admits exactly as an
        absent one), and while the store holds more than `max_keys`, any but
        `keep` (its key then starts afresh, so the bound errs on admitting)."""
        over = txn.stat(self._db)["entries"] - self.max_keys
        cursor = txn.cursor()
        found = cursor.set_range(self._sweep_from)
        wrapped = False
        examined = 0
        while examined < limit or over > 0:
            if not found:
                if wrapped:
                    break
                wrapped = True
                found = cursor.first()
                if not found:
                    break
            examined += 1
            name = cursor.key()
            level, last, rate = _BUCKET.unpack(cursor.value())
            if name in keep or (over <= 0 and level - rate * (now - last) > 0.0):
                found = cursor.next()
                continue
            over -= 1
            found = _delete(cursor)
        self._sweep_from = bytes(cursor.key()) if found else b""

    def _empty(self) -> None:
        """Delete every bucket: in a full map a delete may need pages it does not
        have, but dropping the whole table frees them all at once."""
        try:
            with self._env.begin(write=True) as txn:
                txn.drop(self._db, delete=False)
        except lmdb.Error as exc:
            raise StoreError(f"the rate-limit store is full and cannot be emptied: {exc}") from None

    def _free_readers(self) -> None:
        # A worker killed with SIGKILL inside a read transaction keeps its
        # reader slot, and with it the pages of its snapshot, until a process
        # notices that its pid is gone.
        try:
            self._env.reader_check()
        except lmdb.Error as exc:
            raise StoreError(f"the rate-limit store failed: {exc}") from None


class _Counts(NamedTuple):
    """What a batch's checks leave to write: each changed bucket's new state,
    the names of every bucket they used, and how many of those were absent."""

    changed: Mapping[bytes, Sequence[float]]
    used: Collection[bytes]
    added: int


def _count_every_check(
    get: Callable[[bytes], bytes | None], checks: Sequence[Check]
) -> _Counts | None:
    """The batch on the assumption that every check is admitted: each bucket's
    requests applied in the order of the checks, one bucket after the other.
    None as soon as one would refuse (or a rule's rate or burst changed within
    the batch, by a reload), and `_check_one_by_one` decides.

    When every check is admitted, no refusal puts anything back, so a bucket's
    state depends on its own requests alone: the same arithmetic in the same
    order gives the same floats as checking one request after the other."""
    # Consecutive checks of one kind (the same rules and key values: one
    # caller's requests, most of a batch) use the same buckets: gathered in
    # runs, so that their buckets are named once a run.
    runs: list[tuple[Sequence[Step], Sequence[bytes], list[float]]] = []
    for steps, values, now in checks:
        if runs and (run := runs[-1])[0] is steps and run[1] == values:
            run[2].append(now)
        else:
            runs.append((steps, values, [now]))
    # Each bucket's step, the times of the requests it counts in the order of
    # the checks, and the times of the last run that counted in it (while
    # that is the first run, the two are one list: the run's own).
    lines: dict[bytes, list[Any]] = {}
    for steps, values, times in runs:
        for step in steps:
            name = step[0] + values[step[3]]
            line = lines.get(name)
            if line is None:
                lines[name] = [step, times, times]
            elif line[2] is times or (
                (first := line[0]) is not step and (first[1] != step[1] or first[2] != step[2])
            ):
                # A bucket twice in one check, whose counts interleave; or a
                # rule whose rate or burst changed.
                return None
            else:
                counted = line[1]
                if counted is line[2]:
                    line[1] = counted + times
                else:
                    counted.extend(times)
                line[2] = times
    unpack = _BUCKET.unpack
    changed: dict[bytes, Sequence[float]] = {}
    added = 0
    for name, (step, counted, _) in lines.items():
        _, rate, burst, _ = step
        times = iter(counted)
        stored = get(name)
        if stored is None:
            # An absent bucket admits its first request.
            level, last = 1.0, next(times)
            added += 1
        else:
            level, last, _ = unpack(stored)
        for now in times:
            elapsed = now - last
            if elapsed > 0.0:
                level -= rate * elapsed
                last = now
            if level - burst > EPSILON:
                return None
            level = level + 1.0 if level > 0.0 else 1.0
        changed[name] = (level, last, rate)
    return _Counts(changed, lines.keys(), added)


def _check_one_by_one(
    get: Callable[[bytes], bytes | None], checks: Sequence[Check]
) -> tuple[list[Verdict], _Counts]:
    """The batch one check after the other, for one that some check refuses."""
    verdicts: list[Verdict] = []
    unpack = _BUCKET.unpack
    # Each bucket read once, into `held`; `found` keeps what was read.
    found: dict[bytes, _Bucket] = {}
    held: dict[bytes, _Bucket] = {}
    for steps, values, now in checks:
        # Each bucket counts the request as it admits it; a refusal puts back
        # what this check replaced.
        replaced: list[tuple[bytes, _Bucket]] = []
        verdict: Verdict = None
        for position, (prefix, rate, burst, key) in enumerate(steps):
            name = prefix + values[key]
            if name in held:
                bucket = held[name]
            else:
                stored = get(name)
                bucket = None if stored is None else list(unpack(stored))
                found[name] = held[name] = bucket
            replaced.append((name, bucket))
            if bucket is None:
                held[name] = [1.0, now, rate]
                continue
            level, last, _ = bucket
            elapsed = now - last
            if elapsed > 0.0:
                level -= rate * elapsed
            if level - burst > EPSILON:
                held.update(reversed(replaced))
                wait = (level - burst) / rate
                verdict = position, max(1, math.ceil(wait - EPSILON))
                break
            # A worker that read its clock before waiting for the write lock
            # may come after one that read it later: the bucket's time never
            # goes back, or its drain would count twice.
            held[name] = [level + 1.0 if level > 0.0 else 1.0, max(last, now), rate]
        verdicts.append(verdict)
    changed = {
        name: bucket
        for name, bucket in held.items()
        if bucket is not found[name] and bucket is not None
    }
    added = sum(found[name] is None for name in changed)
    return verdicts, _Counts(changed, held.keys(), added)


def _delete(cursor: lmdb.Cursor) -> bool:
    """Delete the cursor's bucket; True when the cursor then stands on the next.

    After deleting the last bucket `Cursor.delete` still says True, standing on
    nothing: its key is then empty, which no bucket's is (LMDB refuses empty keys).
    """
    cursor.delete()
    return bool(cursor.key())

"""`tlvproxy publish`: a checked table and its files into etcd, in one
transaction (docs/operations.md "Publishing a table").

Owns: reading what the prefix holds, and the one transaction that writes
`{prefix}/table` and `{prefix}/files/PATH` for every file the table names and
deletes every other key of the prefix, guarded by what was read: it holds
only if no key under the prefix was written after the revision read and every
key read is still there as it was. Two publishes racing cannot mix their
tables: the second one's guard fails, and it writes nothing.
Also: loading the keys it is about to write as a gateway does (`load_stored`,
confined to a directory of their own) before writing any: the CLI checked the
table in the publisher's tree, where a path a gateway refuses may resolve.
Must not: retry a failed guard: whoever publishes decides again on what is
there now.
"""

from __future__ import annotations

import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio

from tlvproxy.config.loader import TableError
from tlvproxy.config.stored import MAX_FILES, StoredTableError, load_stored, stored_from
from tlvproxy.etcd import wire
from tlvproxy.etcd.client import EtcdUnavailable, open_etcd
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.stored import StoredTable
    from tlvproxy.etcd.client import EtcdClient
    from tlvproxy.etcd.wire import KeyValue

# The whole publish, read and transaction, gets this long.
PUBLISH_TIMEOUT: Final = 30.0
# etcd 3.4's defaults for one transaction (`--max-txn-ops`, counted for its
# compares and its operations each; `--max-request-bytes`), below what a
# table may be (MAX_FILES files, MAX_TOTAL bytes): a publish over them is
# measured before it is sent, so etcd's refusal can name the flag to raise
# (docs/operations.md "Publishing a table"). etcd may have been started with
# higher limits: the transaction is sent all the same.
ETCD_MAX_TXN_OPS: Final = 128
ETCD_MAX_REQUEST_BYTES: Final = 1536 * 1024


class GuardFailed(Exception):
    """The prefix changed between the read and the transaction."""


def run_publish(config: Path, table: CompiledTable, endpoint: str, prefix: str) -> int:
    """Publish `table` (loaded from `config`) under `prefix`; the exit code.

    Prints what was written, or every reason nothing was, on stderr."""
    try:
        stored = stored_from(config, table, prefix)
    except StoredTableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s); nothing written to etcd", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{exc.filename}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # The keys about to be written, loaded as every gateway will load them:
    # written into a directory of their own and confined to it. A path that
    # only the publisher's tree resolves (absolute, `..`) is refused here,
    # and what is checked is exactly what is written, whatever changed in
    # the tree since it was read.
    try:
        with tempfile.TemporaryDirectory(prefix="tlvproxy-publish-") as scratch:
            load_stored(stored, Path(scratch) / "table", (endpoint,))
    except TableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(
            f"{len(exc.problems)} error(s) loading the table as the gateways will; "
            "nothing written to etcd",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"cannot check the table as the gateways will: {exc}", file=sys.stderr)
        return 1
    try:
        revision, deleted = trio.run(partial(publish, stored, endpoint))
    except (EtcdUnavailable, EtcdRefused, MalformedAnswer, GuardFailed) as exc:
        print(f"tlvproxy publish: {exc}; nothing written", file=sys.stderr)
        return 1
    for key in stored.entries():
        print(f"wrote {key.decode()}")
    for key in deleted:
        print(f"deleted {key.decode(errors='replace')}")
    print(f"published {prefix} at revision {revision}")
    return 0


@attrs.frozen
class Guard:
    """What a publish read under the prefix: its transaction holds only if
    this is still all there is."""

    head: bytes
    revision: int
    kvs: tuple[KeyValue, ...]


async def read_guard(client: EtcdClient, head: bytes) -> Guard:
    """The keys (not their values) under `head`, and when each was written."""
    found = await client.range_prefix(head, limit=MAX_FILES + 2, keys_only=True)
    if found.more:
        raise EtcdRefused(f"more than {MAX_FILES + 1} keys under {head.decode()}", 0)
    return Guard(head=head, revision=found.revision, kvs=found.kvs)


async def write_guarded(
    client: EtcdClient, stored: StoredTable, guard: Guard
) -> tuple[int, list[bytes]]:
    """The transaction: `stored`'s keys written, the other keys read deleted,
    if nothing changed since `guard` was read. The revision written at, and
    the keys deleted. Raises GuardFailed when something did."""
    keys = stored.entries()
    compare = [wire.unchanged_since(guard.head, guard.revision)]
    compare += [wire.still_at(kv.key, kv.mod_revision) for kv in guard.kvs]
    deleted = [kv.key for kv in guard.kvs if kv.key not in keys]
    success = [wire.put_op(key, value) for key, value in keys.items()]
    success += [wire.delete_op(key) for key in deleted]
    over = _over_etcd_defaults(len(compare), len(success), keys, [kv.key for kv in guard.kvs])
    try:
        succeeded, revision = await client.txn(compare, success)
    except EtcdRefused as exc:
        if over:
            raise EtcdRefused(f"{exc}: {'; '.join(over)}", exc.code) from None
        raise
    if not succeeded:
        raise GuardFailed(
            f"the keys under {guard.head.decode()} changed since they were read at revision "
            f"{guard.revision} (another publish?); publish again"
        )
    return revision, deleted


def _over_etcd_defaults(
    compares: int, operations: int, written: dict[bytes, bytes], read: list[bytes]
) -> list[str]:
    """What in a transaction is over etcd's default limits, with the flag
    that raises each; nothing when it is under both."""
    over = []
    ops = max(compares, operations)
    if ops > ETCD_MAX_TXN_OPS:
        over.append(
            f"the publish is one transaction of {ops} operations, over etcd's default "
            f"{ETCD_MAX_TXN_OPS}: start etcd with --max-txn-ops {max(1024, ops)}"
        )
    # The bytes etcd measures (its protobuf request), about: keys and values.
    size = sum(len(key) + len(value) for key, value in written.items()) + 2 * sum(map(len, read))
    if size > ETCD_MAX_REQUEST_BYTES * 0.9:
        over.append(
            f"the publish is one request of about {size} bytes, near or over etcd's default "
            f"{ETCD_MAX_REQUEST_BYTES}: start etcd with --max-request-bytes 33554432"
        )
    return over


async def publish(stored: StoredTable, endpoint: str) -> tuple[int, list[bytes]]:
    """Write `stored` to the etcd at `endpoint`, replacing whatever its prefix
    holds; the revision written at, and the keys deleted.

    Raises EtcdUnavailable (also when it takes over PUBLISH_TIMEOUT),
    EtcdRefused, MalformedAnswer, or GuardFailed when the prefix changed
    between the read and the transaction."""
    with trio.move_on_after(PUBLISH_TIMEOUT):
        async with open_etcd([endpoint]) as client:
            guard = await read_guard(client, f"{stored.prefix}/".encode())
            return await write_guarded(client, stored, guard)
    raise EtcdUnavailable(f"etcd at {endpoint} did not answer within {PUBLISH_TIMEOUT:g} s")

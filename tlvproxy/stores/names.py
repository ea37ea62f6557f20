"""The names of buckets in a shared store (docs/configuration.md "Capacity").

Owns: how a rule and a key value become a bucket's name in LMDB and in Redis,
and the bound on that name's length: key values come from the caller, so a
value longer than MAX_VALUE_BYTES is replaced by its digest.
Must not: read a store, or depend on anything local to one process or node: a
name is the same in every worker and on every gateway, or limits would not be
shared (docs/configuration.md "Where the buckets live").
"""

from __future__ import annotations

import hashlib

# A key value of up to this many UTF-8 bytes names its bucket as it is.
MAX_VALUE_BYTES = 64
# A longer value is named by this mark and the hex digest of its bytes. No UTF-8
# text holds the byte 0xFF, so a digest never names the bucket of a short value.
_DIGEST_MARK = b"\xff"
_REDIS_PREFIX = b"tlvproxy:rl:"


def bounded(value: str) -> bytes:
    """`value` as at most MAX_VALUE_BYTES bytes that name it alone (up to the
    collisions of a 128-bit digest)."""
    # surrogatepass: a query value decoded with surrogate escapes still has bytes.
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_VALUE_BYTES:
        return data
    return _DIGEST_MARK + hashlib.blake2b(data, digest_size=16).hexdigest().encode("ascii")


def local_prefix(rule: str) -> bytes:
    """The prefix of rule `rule`'s bucket names in LMDB: 8 bytes of a digest of
    its name, so every bucket name is short and the same length before its value."""
    return hashlib.blake2b(rule.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def redis_prefix(rule: str) -> bytes:
    """The prefix of rule `rule`'s keys in Redis: `tlvproxy:rl:RULE:`, readable in
    redis-cli. `%` and `:` in the name are escaped, so that no rule's prefix
    begins another's."""
    escaped = rule.replace("%", "%25").replace(":", "%3A")
    return _REDIS_PREFIX + escaped.encode("utf-8", "surrogatepass") + b":"

"""A `store: local` rate-limit store in a temporary directory, for tests that
build a runtime by hand."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tlvproxy.stores.local_store import LocalBuckets

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tlvproxy.stores.local_store import Verdict


@contextmanager
def local_buckets(**options: int) -> Iterator[LocalBuckets]:
    """A fresh LMDB store, closed and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tlvproxy-test-") as directory:
        buckets = LocalBuckets(Path(directory), **options)
        try:
            yield buckets
        finally:
            buckets.close()


def check_buckets(
    store: LocalBuckets, buckets: list[tuple[bytes, float, float]], now: float
) -> Verdict:
    """`store.check` on buckets named in full, each (name, rate, burst)."""
    return store.check([(name, rate, burst, 0) for name, rate, burst in buckets], [b""], now)

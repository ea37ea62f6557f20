"""The answers `fallback.last_good` keeps (SPEC 4.6): each for one request (its
key's value, uid and frame body), fresh for `ttl`, at most `max_entries`
answers and `max_bytes` bytes, the oldest going first."""

from __future__ import annotations

import hashlib

from tlvproxy.policy.last_good import (
    ENTRY_OVERHEAD,
    REQUEST_DIGEST_SIZE,
    AnswerKey,
    Kept,
    LastGood,
    answer_key,
)

# What each entry's key costs besides its value: the request's digest.
DIGEST = REQUEST_DIGEST_SIZE


def key(value: str) -> AnswerKey:
    """The key of a request of uid 0 and an empty body whose key reads `value`."""
    return answer_key(value, 0, b"")


def cache(ttl: float = 10.0, max_entries: int = 100, max_bytes: int = 1 << 20) -> LastGood:
    return LastGood(ttl=ttl, max_entries=max_entries, max_bytes=max_bytes)


def test_an_answer_is_fresh_for_ttl_then_gone() -> None:
    kept = cache(ttl=10.0)
    kept.keep(key("7"), 100.0, "get_profile", b"seven")
    assert kept.fresh(key("7"), 109.9) == Kept("get_profile", b"seven")
    assert kept.fresh(key("8"), 100.0) is None
    assert kept.fresh(key("7"), 110.0) is None
    assert len(kept) == 0
    assert kept.size == 0


def test_a_newer_answer_replaces_the_older_and_its_age() -> None:
    kept = cache(ttl=10.0)
    kept.keep(key("7"), 100.0, "get_profile", b"old")
    kept.keep(key("7"), 105.0, "get_profile_next", b"new")
    assert kept.fresh(key("7"), 114.0) == Kept("get_profile_next", b"new")
    assert len(kept) == 1
    assert kept.size == len("7") + DIGEST + len(b"new") + ENTRY_OVERHEAD


def test_max_entries_forgets_the_oldest() -> None:
    kept = cache(max_entries=3)
    for n in range(5):
        kept.keep(key(str(n)), float(n), "c", b"x")
    assert len(kept) == 3
    assert [kept.fresh(key(str(n)), 5.0) is not None for n in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_max_bytes_counts_keys_bodies_and_each_entry() -> None:
    entry = 1 + DIGEST + 100 + ENTRY_OVERHEAD
    kept = cache(max_bytes=3 * entry)
    for n in range(4):
        kept.keep(key(str(n)), float(n), "c", b"b" * 100)
    assert len(kept) == 3
    assert kept.size == 3 * entry
    assert kept.fresh(key("0"), 4.0) is None
    # A key kept again moves last: the oldest is now 2.
    kept.keep(key("1"), 5.0, "c", b"b" * 100)
    kept.keep(key("9"), 6.0, "c", b"b" * 100)
    assert kept.fresh(key("2"), 6.0) is None
    assert kept.fresh(key("1"), 6.0) is not None


def test_an_answer_too_big_alone_is_not_kept_and_forgets_the_older() -> None:
    kept = cache(max_bytes=1000)
    kept.keep(key("7"), 0.0, "c", b"small")
    kept.keep(key("7"), 1.0, "c", b"x" * 1000)
    assert kept.fresh(key("7"), 1.0) is None
    assert kept.size == 0


def test_many_tiny_answers_are_bounded_by_bytes_too() -> None:
    kept = cache(max_entries=10**9, max_bytes=100 * ENTRY_OVERHEAD)
    for n in range(10_000):
        kept.keep(key(f"k{n}"), float(n), "c", b"")
    assert kept.size <= 100 * ENTRY_OVERHEAD
    assert len(kept) < 100


def test_an_answer_is_kept_for_the_key_the_uid_and_the_request_body() -> None:
    kept = cache()
    kept.keep(answer_key("7", 1, b"\x08\x07"), 0.0, "c", b"seven")
    assert kept.fresh(answer_key("7", 1, b"\x08\x07"), 1.0) == Kept("c", b"seven")
    # Another uid, another body, another key value: not that request's answer.
    assert kept.fresh(answer_key("7", 2, b"\x08\x07"), 1.0) is None
    assert kept.fresh(answer_key("7", 1, b"\x08\x05"), 1.0) is None
    assert kept.fresh(answer_key("5", 1, b"\x08\x07"), 1.0) is None
    assert len(kept) == 1


def test_the_request_body_is_kept_as_its_blake2b_128_digest() -> None:
    body = b"x" * 100_000
    value, uid, digest = answer_key("7", 3, body)
    assert (value, uid) == ("7", 3)
    assert digest == hashlib.blake2b(body, digest_size=16).digest()
    kept = cache(max_bytes=1 << 20)
    kept.keep(answer_key("7", 3, body), 0.0, "c", b"")
    assert kept.size == 1 + 16 + ENTRY_OVERHEAD

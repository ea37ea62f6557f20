"""Micro-benchmark of the pure policy cost per request (issue 7, SPEC 4.4).

Times `RateLimiter.check` plus `Waf.inspect_request` for one typical REST request
with no rules, with 10 rate-limit rules, with 50 WAF rules, and with both; the
same 10 rules as a gateway of several workers keeps them (`store: local`, in
LMDB), one request per transaction and eight (what a worker's scheduler pass
holds under load); then
the WAF alone on larger bodies and on WebSocket messages. "regex on every text"
is the naive scan (every rule's regex on every location) for comparison with the
literal pre-check the WAF uses. Microseconds per call, printed through
benchmarks/harness. Run: `.venv/bin/python benchmarks/bench_policy.py`.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from harness.figures import Column, FigureTable, timings

from tlvproxy.config.keys import parse_key
from tlvproxy.config.model import RateLimitRule, WafRule
from tlvproxy.metrics import Metrics
from tlvproxy.policy.ratelimit import RateLimiter
from tlvproxy.policy.waf import Waf
from tlvproxy.stores.limits import RateLimits
from tlvproxy.stores.local_batches import LocalChecks
from tlvproxy.stores.local_store import LocalBuckets

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

ALL = frozenset({"path", "query", "body", "headers"})

# The demo's three rules plus common probe signatures, 50 in all.
_PATTERNS = [
    r"(?i)\b(eval|assert|base64_decode|system|passthru|shell_exec)\s*\(",
    r"(?i)union\s+select",
    r"\.\./",
    r"(?i)<script\b",
    r"(?i)javascript:",
    r"(?i)\bon(error|load|click|mouseover)\s*=",
    r"(?i)\bor\s+1\s*=\s*1\b",
    r"(?i)\bsleep\s*\(\s*\d+\s*\)",
    r"(?i)\bbenchmark\s*\(",
    r"(?i)information_schema",
    r"(?i)/etc/(passwd|shadow|hosts)",
    r"(?i)cmd\.exe",
    r"(?i)\bwget\s+http",
    r"(?i)\bcurl\s+-",
    r"(?i)<iframe\b",
    r"(?i)document\.cookie",
    r"(?i)\bdrop\s+table\b",
    r"(?i)\binsert\s+into\b",
    r"(?i)\bdelete\s+from\b",
    r"(?i)\bxp_cmdshell\b",
    r"(?i)\$\{jndi:",
    r"(?i)php://(input|filter)",
    r"(?i)\bproc_open\s*\(",
    r"(?i)\bpopen\s*\(",
    r"(?i)\bpcntl_exec\s*\(",
    r"(?i)\bpreg_replace\s*\(.*/e",
    r"(?i)\bcreate_function\s*\(",
    r"(?i)\binclude(_once)?\s*\(",
    r"(?i)\brequire(_once)?\s*\(",
    r"(?i)\bgzinflate\s*\(",
    r"(?i)\bstr_rot13\s*\(",
    r"(?i)\bfile_put_contents\s*\(",
    r"(?i)\bmove_uploaded_file\s*\(",
    r"(?i)\$_(GET|POST|REQUEST|COOKIE)\[",
    r"(?i)%00",
    r"(?i)\bload_file\s*\(",
    r"(?i)\binto\s+outfile\b",
    r"(?i)\bwaitfor\s+delay\b",
    r"(?i)\bpg_sleep\s*\(",
    r"(?i)\bchar\s*\(\s*\d+\s*(,\s*\d+\s*)+\)",
    r"(?i)<svg[^>]*\bon\w+\s*=",
    r"(?i)\bvbscript:",
    r"(?i)\bexpression\s*\(",
    r"(?i)\.(htaccess|htpasswd)\b",
    r"(?i)\bwp-config\.php\b",
    r"(?i)\.git/(config|HEAD)",
    r"(?i)\bnslookup\s+",
    r"(?i);\s*(ls|cat|id|uname)\b",
    r"(?i)\|\s*(sh|bash)\b",
    r"(?i)`[^`]*`",
]


@attrs.frozen
class _Request:
    remote_addr: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    identity: None = None  # no authenticator: the RequestView's identity and numbers
    numbers: None = None


def rate_rules() -> list[RateLimitRule]:
    keys = ["remote_addr", "header.x-user-id", "query.did", "cookie.sid", "query.uid"]
    return [
        RateLimitRule(
            name=f"limit_{i}",
            commands=None if i % 2 == 0 else ("send_message", "get_profile"),
            key=parse_key(keys[i % len(keys)]),
            rate=1000.0,
            burst=100,
        )
        for i in range(10)
    ]


def waf_rules() -> list[WafRule]:
    assert len(_PATTERNS) == 50
    return [
        WafRule(
            name=f"waf_{i}",
            locations=ALL,
            pattern=re.compile(p),
            action="deny" if i % 5 else "log",
        )
        for i, p in enumerate(_PATTERNS)
    ]


CHAT = "I'll evaluate the system tomorrow, see you at the union meeting! "
HEADERS = [
    ("host", "gateway.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate, br"),
    ("content-type", "application/json"),
    ("x-user-id", "42"),
    ("cookie", "sid=abcdef0123456789"),
    ("x-request-id", "5f0c6f3e-8a77-4d0e-9a1b-3c2d1e0f9a8b"),
]


def body_of(size: int) -> bytes:
    text = (CHAT * (size // len(CHAT) + 1))[: size - 30]
    return f'{{"to": 7, "text": "{text}"}}'.encode()


def per_call(fn: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Seconds per call of `fn`, the best of three runs of at least `min_seconds`."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds / 10:
            break
        n *= 4
    n = max(1, int(n * min_seconds / max(elapsed, 1e-9)))

    def run() -> None:
        for _ in range(n):
            fn()

    return min(timings(run, 3)) / n


def user_requests(users: int) -> list[_Request]:
    """One request view per user, each with its own address, user, device and session."""
    return [
        _Request(
            remote_addr=f"10.0.{i // 256 % 256}.{i % 256}",
            headers={"x-user-id": str(i), "cookie": f"sid=s{i}"},
            query={"did": f"d{i}", "uid": str(i)},
        )
        for i in range(users)
    ]


def policy_check(
    limiter: RateLimiter, waf: Waf, body: bytes, users: int = 10_000
) -> Callable[[], object]:
    requests = user_requests(users)
    state = {"i": 0, "now": 0.0}

    def one() -> object:
        i = state["i"] = (state["i"] + 1) % users
        state["now"] += 1e-5
        refusal = limiter.check("send_message", requests[i], state["now"])
        return refusal, waf.inspect_request(
            path="/v1/messages", query=f"did=d{i}&uid={i}", body=body, headers=HEADERS
        )

    return one


def stored_checks(
    limits: RateLimits, local: LocalChecks, together: int, users: int = 10_000
) -> Callable[[], object]:
    """`together` calls of `RateLimits.check` on the LMDB store, as the REST
    handler makes them in one scheduler pass, then the store's transaction
    after the pass; the users' requests come in turn."""
    requests = user_requests(users)
    state = {"i": 0}

    def batch() -> object:
        for _ in range(together):
            i = state["i"] = (state["i"] + 1) % users
            limits.check("send_message", requests[i])
        local.flush()
        return None

    return batch


def naive(rules: list[WafRule], body: bytes) -> Callable[[], object]:
    def one() -> object:
        texts = [
            "/v1/messages",
            "did=d1&uid=1",
            body.decode("utf-8", errors="replace"),
            *(v for _, v in HEADERS),
        ]
        return [r.name for r in rules if any(r.pattern.search(t) for t in texts)]

    return one


def main() -> None:
    body = body_of(200)
    us = [Column("us", ",.2f", 9)]
    request = FigureTable(
        "policy cost per REST request (200-byte JSON chat body, 8 headers)", "rules", 33, us
    )
    for name, limiter, waf in (
        ("no rules", RateLimiter([]), Waf([])),
        ("10 rate-limit rules", RateLimiter(rate_rules()), Waf([])),
        ("50 WAF rules", RateLimiter([]), Waf(waf_rules())),
        ("10 rate-limit + 50 WAF rules", RateLimiter(rate_rules()), Waf(waf_rules())),
    ):
        request.row(name, per_call(policy_check(limiter, waf, body)) * 1e6)
    with tempfile.TemporaryDirectory(prefix="tlvproxy-bench-") as directory:
        local = LocalChecks(LocalBuckets(Path(directory)))
        limits = RateLimits(rate_rules(), Metrics(), local=local)
        for together in (1, 8):
            stored = per_call(stored_checks(limits, local, together)) / together
            request.row(f"10 rate-limit rules, LMDB, {together} per transaction", stored * 1e6)
        local.buckets.close()
    request.row("50 WAF rules, regex on every text", per_call(naive(waf_rules(), body)) * 1e6)
    waf = Waf(waf_rules())
    alone = FigureTable("WAF alone (50 rules)", "input", 33, us)
    for size in (1024, 16 * 1024, 64 * 1024, 1024 * 1024):
        big = body_of(size)
        cost = per_call(
            lambda big=big: waf.inspect_request(path="/v1/echo", query="", body=big, headers=())
        )
        alone.row(f"{size // 1024} KiB body", cost * 1e6)
    message = '{"cmd": "send_message", "seq": 7, "body": {"to": 7, "text": "' + CHAT + '"}}'
    cost = per_call(lambda: waf.inspect_message(message))
    alone.row(f"WebSocket text message ({len(message)} chars)", cost * 1e6)


if __name__ == "__main__":
    main()

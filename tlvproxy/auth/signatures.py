"""The `hmac` authenticator: signed requests (docs/security.md "Signed requests").

Owns: parsing `Authorization: Signature keyId=..,algorithm=..,headers=..,signature=..`,
the signing string (`name: value` lines joined by `\\n`, `@request-target` being
the lower-case method, a space and the target as sent), the HMAC-SHA256 check,
the `Date` window (`clock_skew`), the body's `Digest: SHA-256=...`, and a
bounded cache of the signatures seen, which refuses a replay.
Must not: do I/O; the clock is the caller's `now`.

Rules the docs spell out: the signed headers must include `@request-target`
and `date`, and `digest` when the request has a body; a signature is
remembered until its `Date` is older than `clock_skew`, since after that the
window refuses it anyway. The cache holds at most `MAX_SEEN` signatures; when
that many are younger than the window, the oldest are forgotten first. It is
per worker process: with `workers: N` a replay sent to another worker is not
caught by this cache (the `Date` window still bounds it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Final

from tlvproxy.auth.identity import Identity, refuse

if TYPE_CHECKING:
    from tlvproxy.config.keys import RequestView
    from tlvproxy.config.model import HmacAuthSpec
    from tlvproxy.errors import Unauthorized

MAX_SEEN: Final = 100_000
MAX_AUTHORIZATION: Final = 4096
REQUIRED: Final = ("@request-target", "date")

_CHALLENGE: Final = 'Signature realm="tlvproxy", headers="@request-target date digest"'
_PARAM = re.compile(r'\s*([A-Za-z]+)="([^"]*)"\s*(?:,|$)')


class HmacAuthenticator:
    """Verifies signed requests for one `type: hmac` authenticator."""

    kind = "hmac"

    def __init__(self, spec: HmacAuthSpec, seen: dict[bytes, float] | None = None) -> None:
        """`seen`: the signatures an earlier authenticator of this name saw."""
        self.name = spec.name
        self._secrets = spec.secrets
        self._skew = spec.clock_skew
        self._identities = {
            kid: Identity(authenticator=spec.name, consumer=kid) for kid in spec.secrets
        }
        # signature -> when it may be forgotten (its Date leaves the window)
        self.seen: dict[bytes, float] = {} if seen is None else seen

    def authenticate(
        self, view: RequestView, method: str, target: str, body: bytes, now: float
    ) -> Identity:
        """The key id whose secret signed this request at Unix time `now`; raises Unauthorized."""
        header = view.headers.get("authorization")
        if header is None:
            raise refuse("a signed request is required", reason="missing", challenge=_CHALLENGE)
        params = _parse(header)
        key_id = params.get("keyid", "")
        secret = self._secrets.get(key_id)
        if secret is None:
            raise _fail("unknown_key", "the signature's keyId is not known")
        if params.get("algorithm", "hmac-sha256").lower() != "hmac-sha256":
            raise _fail("algorithm", "the signature's algorithm must be hmac-sha256")
        names = params.get("headers", "").lower().split()
        needed = (*REQUIRED, "digest") if body else REQUIRED
        if missing := [name for name in needed if name not in names]:
            raise _fail("malformed", f"the signature must cover {', '.join(missing)}")
        lines = []
        for name in names:
            if name == "@request-target":
                lines.append(f"@request-target: {method.lower()} {target}")
                continue
            value = view.headers.get(name)
            if value is None:
                raise _fail("malformed", f"the signed header {name[:40]!r} is missing")
            lines.append(f"{name}: {value}")
        try:
            given = base64.b64decode(params.get("signature", ""), validate=True)
        except binascii.Error:
            raise _fail("malformed", "the signature is not base64") from None
        expected = hmac.digest(
            secret, "\n".join(lines).encode("utf-8", "surrogateescape"), "sha256"
        )
        if not hmac.compare_digest(given, expected):
            raise _fail("signature", "the signature does not verify")
        signed_at = _date(view.headers.get("date", ""))
        if abs(now - signed_at) > self._skew:
            raise _fail(
                "skewed", f"the Date is more than {self._skew:g} s from the gateway's clock"
            )
        if body and not _digest_matches(view.headers.get("digest", ""), body):
            raise _fail("digest", "the Digest does not match the body")
        self._remember(given, signed_at + self._skew, now)
        return self._identities[key_id]

    def _remember(self, signature: bytes, until: float, now: float) -> None:
        seen = self.seen
        if signature in seen:
            raise _fail("replayed", "this signature was used already")
        if len(seen) >= MAX_SEEN:
            for old in [old for old, expiry in seen.items() if expiry < now]:
                del seen[old]
            while len(seen) >= MAX_SEEN:
                del seen[next(iter(seen))]
        seen[signature] = until


def _parse(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "signature" or len(header) > MAX_AUTHORIZATION:
        raise _fail("malformed", "the Authorization header is not a Signature")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise _fail("malformed", 'the Signature parameters are not name="value" pairs')
        params[match.group(1).lower()] = match.group(2)
        position = match.end()
    return params


def _date(text: str) -> float:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise _fail("malformed", "the Date header is not an HTTP date") from None
    if when.tzinfo is None:
        raise _fail("malformed", "the Date header has no time zone")
    return when.timestamp()


def _digest_matches(header: str, body: bytes) -> bool:
    expected = base64.b64encode(hashlib.sha256(body).digest()).decode()
    for part in header.split(","):
        algorithm, _, value = part.strip().partition("=")
        if algorithm.lower() == "sha-256":
            return hmac.compare_digest(value.encode(), expected.encode())
    return False


def _fail(reason: str, message: str) -> Unauthorized:
    return refuse(message, reason=reason, challenge=_CHALLENGE)

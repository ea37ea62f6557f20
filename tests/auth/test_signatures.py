"""The hmac authenticator: signed requests (docs/security.md "Signed requests")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from email.utils import formatdate

import pytest

from tlvproxy.auth.signatures import MAX_SEEN, HmacAuthenticator
from tlvproxy.config.model import HmacAuthSpec
from tlvproxy.errors import Unauthorized
from tlvproxy.server.view import RequestContext

SECRET = b"partner-secret"


def authenticator() -> HmacAuthenticator:
    return HmacAuthenticator(HmacAuthSpec(name="signed", secrets={"k1": SECRET}, clock_skew=300))


def signed(
    method: str = "POST",
    target: str = "/v1/echo?x=1",
    body: bytes = b'{"a": 1}',
    *,
    secret: bytes = SECRET,
    key_id: str = "k1",
    when: float | None = None,
    names: str = "@request-target date digest",
    digest_of: bytes | None = None,
) -> dict[str, str]:
    """The headers of a request signed as a partner would sign it."""
    headers = {"date": formatdate(time.time() if when is None else when, usegmt=True)}
    digest = hashlib.sha256(body if digest_of is None else digest_of).digest()
    headers["digest"] = "SHA-256=" + base64.b64encode(digest).decode()
    lines = []
    for name in names.split():
        if name == "@request-target":
            lines.append(f"@request-target: {method.lower()} {target}")
        else:
            lines.append(f"{name}: {headers[name]}")
    signature = base64.b64encode(hmac.digest(secret, "\n".join(lines).encode(), "sha256")).decode()
    headers["authorization"] = (
        f'Signature keyId="{key_id}",algorithm="hmac-sha256",headers="{names}",'
        f'signature="{signature}"'
    )
    return headers


def verify(
    auth: HmacAuthenticator,
    headers: dict[str, str],
    method: str = "POST",
    target: str = "/v1/echo?x=1",
    body: bytes = b'{"a": 1}',
    now: float | None = None,
):
    view = RequestContext(remote_addr="10.0.0.1", headers=list(headers.items()), query_string="")
    return auth.authenticate(view, method, target, body, time.time() if now is None else now)


def reason(auth: HmacAuthenticator, headers: dict[str, str], **request) -> str:
    with pytest.raises(Unauthorized) as caught:
        verify(auth, headers, **request)
    return caught.value.reason


def test_a_signed_request_names_its_key_id_as_consumer():
    identity = verify(authenticator(), signed())
    assert identity.consumer == "k1"
    assert identity.value("consumer") == "k1"
    assert identity.sub is None


def test_a_get_without_body_needs_no_digest():
    headers = signed("GET", "/v1/users/1/profile", b"", names="@request-target date")
    assert verify(authenticator(), headers, method="GET", target="/v1/users/1/profile", body=b"")


@pytest.mark.parametrize(
    ("headers", "request_options", "expected"),
    [
        (signed(secret=b"wrong"), {}, "signature"),
        (signed(key_id="k9"), {}, "unknown_key"),
        (signed(when=time.time() - 600), {}, "skewed"),
        (signed(when=time.time() + 600), {}, "skewed"),
        # The body changed after signing: the Digest no longer matches it.
        (signed(), {"body": b'{"a": 2}'}, "digest"),
        (signed(digest_of=b"other"), {}, "digest"),
        (signed(names="@request-target date"), {}, "malformed"),  # a body, no digest signed
        (signed(names="date digest"), {}, "malformed"),
        (signed(), {"target": "/v1/echo?x=2"}, "signature"),
        (signed(), {"method": "PUT"}, "signature"),
        ({}, {}, "missing"),
        ({"authorization": "Bearer abc"}, {}, "malformed"),
        ({"authorization": 'Signature keyId="k1",signature=bare'}, {}, "malformed"),
        ({**signed(), "date": "yesterday"}, {}, "signature"),
    ],
)
def test_bad_signatures_are_refused(headers, request_options, expected):
    assert reason(authenticator(), headers, **request_options) == expected


def test_an_unparsable_date_that_was_signed_is_malformed():
    headers = signed()
    auth = authenticator()
    headers["date"] = "not a date"
    # Re-sign with the bad date so the signature itself verifies.
    lines = [
        "@request-target: post /v1/echo?x=1",
        "date: not a date",
        f"digest: {headers['digest']}",
    ]
    signature = base64.b64encode(hmac.digest(SECRET, "\n".join(lines).encode(), "sha256"))
    headers["authorization"] = (
        'Signature keyId="k1",headers="@request-target date digest",'
        f'signature="{signature.decode()}"'
    )
    assert reason(auth, headers) == "malformed"


def test_a_replayed_signature_is_refused():
    auth = authenticator()
    headers = signed()
    verify(auth, headers)
    assert reason(auth, headers) == "replayed"


def test_a_reload_keeps_the_signatures_seen():
    # Found by the end-to-end tests: a reload emptied the replay cache.
    from tlvproxy.auth.authenticators import Authenticators
    from tlvproxy.metrics import Metrics

    def no_urls(spec):
        raise AssertionError(spec)

    spec = HmacAuthSpec(name="signed", secrets={"k1": SECRET}, clock_skew=300)
    before = Authenticators({"signed": spec}, Metrics(), no_urls)
    headers = signed()
    view = RequestContext(remote_addr="10.0.0.1", headers=list(headers.items()), query_string="")
    args = ("POST", "/v1/echo?x=1", b'{"a": 1}')
    before.authenticate("signed", view, *args, time.time())
    for changed in (spec, HmacAuthSpec(name="signed", secrets={"k1": SECRET}, clock_skew=200)):
        after = Authenticators({"signed": changed}, Metrics(), no_urls, before)
        with pytest.raises(Unauthorized) as caught:
            after.authenticate("signed", view, *args, time.time())
        assert caught.value.reason == "replayed"


def test_the_replay_cache_is_bounded_and_forgets_expired_signatures_first():
    auth = authenticator()
    now = time.time()
    auth.seen = {i.to_bytes(8, "big"): now - 1 for i in range(MAX_SEEN)}
    verify(auth, signed())
    assert len(auth.seen) == 1  # every expired one went


def test_a_full_cache_of_live_signatures_drops_the_oldest():
    auth = authenticator()
    now = time.time()
    auth.seen = {i.to_bytes(8, "big"): now + 100 for i in range(MAX_SEEN)}
    verify(auth, signed())
    assert len(auth.seen) == MAX_SEEN
    assert (0).to_bytes(8, "big") not in auth.seen

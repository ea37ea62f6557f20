"""TLS through the real `tlvproxy serve` process (SPEC 10, issue 21): https REST
and wss json mode with both parsers, SNI, certificates rotated by SIGHUP while a
wss session stays open, a broken certificate that fails the reload, old TLS
versions and plain HTTP refused and counted, the handshake under header_timeout,
https alone, two workers, curl, and the expiry metric.

Clients are real: the standard library's ssl (verifying the test CA's chain and
the served name), a wsproto client on an ssl socket, and curl.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from typing import TYPE_CHECKING, Any

import pytest

from tests.ops.procs import Processes, children, metric, rewrite, wait_for
from tests.ops.tls_helpers import (
    DAY,
    GW_ENTRY,
    IM_ENTRY,
    Certificates,
    HttpsConnection,
    TlsGateway,
    read_response,
    read_until_closed,
    request,
    start_gateway,
    tls_socket,
    unverified_context,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

PROFILE = "/v1/users/3/profile"
SEND = {"to_uid": 2, "text": "over tls"}
HEADER_TIMEOUT = 2.0  # the shared gateways' limits.header_timeout
FAILURES = "tlvproxy_tls_handshake_failures_total"
EXPIRY = "tlvproxy_tls_certificate_expiry_seconds"
REQUESTS = "tlvproxy_http_requests_total"
CURL = "/usr/bin/curl"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """The processes of the module's shared gateways."""
    started = Processes(tmp_path_factory.mktemp("tls"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module", params=["h11", "httptools"])
def main(
    request: pytest.FixtureRequest, shared: Processes, upstream: str, certificates: Certificates
) -> TlsGateway:
    """A gateway on http and https (gw the default, im by SNI) with each parser;
    shared by the tests that leave it as they found it."""
    return start_gateway(
        shared,
        upstream,
        certificates,
        http_parser=request.param,
        limits={"header_timeout": f"{HEADER_TIMEOUT:g}s"},
    )


def failures(gateway: TlsGateway, reason: str | None = None) -> float:
    values = gateway.metrics()
    return metric(values, FAILURES) if reason is None else metric(values, FAILURES, reason=reason)


def wait_counted(gateway: TlsGateway, reason: str, before: float, more: int = 1) -> None:
    wait_for(
        lambda: failures(gateway, reason) == before + more,
        f"{more} more handshake failure(s) counted as {reason}",
    )


def expiry(values: dict[str, float], name: str) -> float:
    """tlvproxy_tls_certificate_expiry_seconds of the certificate `name`."""
    return values[f'{EXPIRY}{{name="{name}"}}']


def fresh_uid() -> int:
    """A user id no other test's session has (the upstream is shared)."""
    return 100_000 + int(time.monotonic_ns() // 1000 % 800_000_000)


def error_code(body: bytes) -> str:
    value: dict[str, Any] = json.loads(body)
    assert set(value) == {"error"}, value
    code: str = value["error"]["code"]
    return code


# ---------------------------------------------------------------- https REST


def test_https_rest_verifies_the_chain_and_the_name(main: TlsGateway) -> None:
    profile = main.https("GET", PROFILE)
    assert profile.status == 200, profile
    assert profile.headers["content-type"] == "application/json"
    assert profile.json()["user_id"] == 3
    sent = main.https("POST", "/v1/messages", SEND, {"X-User-Id": "1"})
    assert sent.status == 200, sent
    assert set(sent.json()) == {"msg_id", "sent_at"}
    # The names the default certificate has, each verified by the client.
    for name in ("gw.example.com", "127.0.0.1"):
        assert main.https("GET", PROFILE, name=name).json()["user_id"] == 3
    # Plain HTTP is served next to it.
    assert main.call("GET", PROFILE).json()["user_id"] == 3


def test_a_name_the_served_certificate_lacks_fails_verification(main: TlsGateway) -> None:
    # a.b.im.example.com gets the default certificate (the wildcard is one
    # label), which does not name it: a verifying client refuses.
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        main.https("GET", PROFILE, name="a.b.im.example.com")
    # A client that does not trust the test CA refuses the chain.
    with (
        pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"),
        tls_socket(main.https_port, ssl.create_default_context(), "localhost"),
    ):
        pass


def test_keep_alive_serves_many_requests_on_one_connection(main: TlsGateway) -> None:
    connection = main.connection()
    try:
        first = request(connection, "GET", PROFILE)
        assert first.status == 200, first
        sock = connection.sock
        for n in range(6):
            if n % 2:
                answer = request(connection, "POST", "/v1/echo", {"n": n})
                assert answer.json() == {"n": n}
            else:
                answer = request(connection, "GET", f"/v1/users/{n + 1}/profile")
                assert answer.json()["user_id"] == n + 1
        # http.client opens a new socket when the server closed the old one.
        assert connection.sock is sock
    finally:
        connection.close()


def test_pipelined_requests_are_answered_in_order(main: TlsGateway) -> None:
    echo = json.dumps({"second": True}).encode()
    both = (
        b"GET " + PROFILE.encode() + b" HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: pipe-1\r\n\r\n"
        b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: pipe-2\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(echo), echo)
    )
    with tls_socket(main.https_port, main.certificates.client_context()) as sock:
        sock.sendall(both)  # one write: both requests in the first TLS records
        stream = sock.makefile("rb")
        status, headers, body = read_response(stream)
        assert (status, headers["x-request-id"]) == (200, "pipe-1")
        assert json.loads(body)["user_id"] == 3
        status, headers, body = read_response(stream)
        assert (status, headers["x-request-id"], body) == (200, "pipe-2", echo)


def test_alpn_is_http_1_1_and_tls_1_3_is_the_default(main: TlsGateway) -> None:
    context = main.certificates.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with tls_socket(main.https_port, context) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"  # never h2: not spoken
        assert sock.version() == "TLSv1.3"
    # A client that offers only h2 gets no ALPN, and HTTP/1.1 still works.
    context = main.certificates.client_context()
    context.set_alpn_protocols(["h2"])
    with tls_socket(main.https_port, context) as sock:
        assert sock.selected_alpn_protocol() is None
        sock.sendall(b"GET " + PROFILE.encode() + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, body = read_response(sock.makefile("rb"))
        assert (status, json.loads(body)["user_id"]) == (200, 3)


# ---------------------------------------------------------------- wss


def test_wss_json_mode_answers_and_pushes(main: TlsGateway) -> None:
    uid = fresh_uid()
    ws = main.wss(f"/ws?uid={uid}&did=tls")
    try:
        ws.send({"cmd": "echo", "seq": 1, "body": {"over": "tls"}})
        assert ws.receive() == {"cmd": "echo", "seq": 1, "status": 0, "body": {"over": "tls"}}
        # A protobuf command over wss, to oneself: the answer, then the push.
        ws.send({"cmd": "send_message", "seq": 2, "body": {"to_uid": uid, "text": "me"}})
        answer = ws.receive()
        assert isinstance(answer, dict), answer
        assert (answer["cmd"], answer["seq"], answer["status"]) == ("send_message", 2, 0)
        assert set(answer["body"]) == {"msg_id", "sent_at"}
        push = ws.receive()
        assert isinstance(push, dict), push
        assert (push["cmd"], push["push"]) == ("new_message", True)
        assert (push["body"]["to_uid"], push["body"]["text"]) == (uid, "me")
        # Another user's https REST request pushes to the wss session.
        sent = main.https("POST", "/v1/messages", {"to_uid": uid, "text": "hi"}, {"X-User-Id": "7"})
        assert sent.status == 200, sent
        push = ws.receive()
        assert isinstance(push, dict), push
        body = push["body"]
        assert (push["cmd"], body["from_uid"], body["to_uid"], body["text"]) == (
            "new_message",
            7,
            uid,
            "hi",
        )
        assert metric(main.metrics(), "tlvproxy_websocket_sessions") == 1
    finally:
        ws.close()
    wait_for(
        lambda: metric(main.metrics(), "tlvproxy_websocket_sessions") == 0,
        "the wss session to end",
    )


# ---------------------------------------------------------------- SNI


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("im.example.com", "im"),
        ("a.im.example.com", "im"),  # the wildcard
        ("CHAT.Im.Example.COM", "im"),  # names are not case-sensitive
        ("a.b.im.example.com", "gw"),  # a wildcard covers one label only
        ("example.com", "gw"),
        ("unknown.example.org", "gw"),  # an unknown name: the first certificate
        ("gw.example.com", "gw"),
        (None, "gw"),  # no SNI: the first certificate
    ],
)
def test_sni_chooses_the_certificate(main: TlsGateway, name: str | None, stem: str) -> None:
    assert main.served(name) == main.certificates.der(stem)


def test_sni_names_are_served_and_verified(main: TlsGateway) -> None:
    for name in ("im.example.com", "a.im.example.com"):
        connection = main.connection(name)
        try:
            answer = request(connection, "GET", PROFILE)
            assert answer.status == 200, answer
            assert connection.sock.getpeercert(binary_form=True) == main.certificates.der("im")
        finally:
            connection.close()
    ws = main.wss(f"/ws?uid={fresh_uid()}&did=sni", name="chat.im.example.com")
    try:
        ws.send({"cmd": "echo", "seq": 5, "body": {}})
        assert ws.receive() == {"cmd": "echo", "seq": 5, "status": 0, "body": {}}
    finally:
        ws.close()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_are_refused_and_counted(main: TlsGateway, version: str) -> None:
    old = getattr(ssl.TLSVersion, version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting TLS 1.0/1.1 warns
        context = unverified_context(minimum=old, maximum=old)
    before = failures(main, "protocol_version")
    with pytest.raises(ssl.SSLError):
        tls_socket(main.https_port, context).close()
    # Counted by the server: the client did offer the old version.
    wait_counted(main, "protocol_version", before)
    # The same client allowed TLS 1.2 is served: the refusal was the version's.
    with tls_socket(main.https_port, unverified_context(maximum=ssl.TLSVersion.TLSv1_2)) as sock:
        assert sock.version() == "TLSv1.2"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_plain_http_to_the_https_port_gets_a_400(main: TlsGateway, method: str) -> None:
    """Whatever the method: the table routes PUT, PATCH, DELETE and OPTIONS too."""
    before = failures(main, "plain_http")
    unmatched = metric(main.metrics(), REQUESTS, route="unmatched", method="-", status="400")
    with socket.create_connection(("127.0.0.1", main.https_port), timeout=10) as sock:
        sock.sendall(
            method.encode() + b" /v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        )
        received = read_until_closed(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request", received
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert error_code(body) == "bad_request"
    assert "HTTPS" in json.loads(body)["error"]["message"]
    wait_counted(main, "plain_http", before)
    # Counted as an unmatched request too (docs/operations.md "Plain HTTP").
    values = main.metrics()
    assert metric(values, REQUESTS, route="unmatched", method="-", status="400") == unmatched + 1
    assert main.https("GET", PROFILE).status == 200


def test_a_silent_client_is_closed_after_header_timeout(main: TlsGateway) -> None:
    before = failures(main, "timeout")
    with socket.create_connection(("127.0.0.1", main.https_port), timeout=10) as sock:
        start = time.monotonic()
        received = read_until_closed(sock)
        waited = time.monotonic() - start
    assert received == b""
    assert HEADER_TIMEOUT - 0.2 <= waited <= HEADER_TIMEOUT + 4, waited
    wait_counted(main, "timeout", before)


def test_a_stalled_handshake_is_closed_after_header_timeout(main: TlsGateway) -> None:
    """Half a ClientHello, then nothing: the handshake's deadline is header_timeout."""
    hello = client_hello()
    before = failures(main, "timeout")
    with socket.create_connection(("127.0.0.1", main.https_port), timeout=10) as sock:
        sock.sendall(hello[: len(hello) // 2])
        start = time.monotonic()
        received = read_until_closed(sock)
        waited = time.monotonic() - start
    assert received == b""
    assert HEADER_TIMEOUT - 0.2 <= waited <= HEADER_TIMEOUT + 4, waited
    wait_counted(main, "timeout", before)


def test_a_client_silent_after_its_handshake_is_closed_after_header_timeout(
    main: TlsGateway,
) -> None:
    """The first request has header_timeout again from the end of the
    handshake; no handshake failed, so none is counted."""
    before = failures(main)
    with tls_socket(main.https_port, main.certificates.client_context()) as sock:
        start = time.monotonic()
        received = read_until_closed(sock)
        waited = time.monotonic() - start
    assert received == b""
    assert HEADER_TIMEOUT - 0.2 <= waited <= HEADER_TIMEOUT + 4, waited
    assert failures(main) == before


def test_garbage_is_closed_and_counted_and_others_are_served(main: TlsGateway) -> None:
    before_total, before_timeout = failures(main), failures(main, "timeout")
    with socket.create_connection(("127.0.0.1", main.https_port), timeout=10) as sock:
        sock.sendall(b"\xff\x00" * 32 + b"not tls at all " * 40)
        start = time.monotonic()
        read_until_closed(sock)
        waited = time.monotonic() - start
    assert waited < HEADER_TIMEOUT - 0.5, waited  # refused at once, not timed out
    wait_for(lambda: failures(main) == before_total + 1, "the garbage to be counted")
    assert failures(main, "timeout") == before_timeout
    assert main.https("GET", PROFILE).status == 200
    assert main.process.alive()


def test_a_client_that_leaves_mid_handshake_is_counted_as_closed(main: TlsGateway) -> None:
    hello = client_hello()
    before = failures(main, "closed")
    with socket.create_connection(("127.0.0.1", main.https_port), timeout=10) as sock:
        sock.sendall(hello[: len(hello) // 2])
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
    wait_counted(main, "closed", before)
    assert main.https("GET", PROFILE).status == 200


def test_a_client_refusing_the_certificate_is_counted(main: TlsGateway) -> None:
    before = failures(main, "certificate_refused")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        untrusting = ssl.create_default_context()  # not the test CA
        untrusting.maximum_version = version
        with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
            tls_socket(main.https_port, untrusting, "localhost").close()
        other_name = main.certificates.client_context()
        other_name.maximum_version = version
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            tls_socket(main.https_port, other_name, "a.b.im.example.com").close()
    wait_counted(main, "certificate_refused", before, 4)


def test_no_shared_cipher_is_counted(main: TlsGateway) -> None:
    # The test certificates have ECDSA keys: RSA key exchange cannot use them.
    context = unverified_context(maximum=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("AES128-SHA:@SECLEVEL=0")
    before = failures(main, "no_shared_cipher")
    with pytest.raises(ssl.SSLError):
        tls_socket(main.https_port, context).close()
    wait_counted(main, "no_shared_cipher", before)


def client_hello() -> bytes:
    """The first flight of a TLS client: a whole ClientHello record."""
    outgoing = ssl.MemoryBIO()
    end = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing, server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        end.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16, hello[:10]  # a handshake record
    assert len(hello) > 100, hello
    return hello


# ---------------------------------------------------------------- curl and metrics


def curl(gateway: TlsGateway, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    port = gateway.https_port
    return subprocess.run(
        [
            CURL,
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(gateway.certificates.ca_path),
            *options,
            f"https://{name}:{port}{PROFILE}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_curl_verifies_the_chain_and_each_name(main: TlsGateway) -> None:
    port = main.https_port
    plain = curl(main, "localhost")
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["user_id"] == 3

    resolve = ("--resolve", f"im.example.com:{port}:127.0.0.1", "-w", "\n%{certs}")
    im = curl(main, "im.example.com", *resolve)
    assert im.returncode == 0, im.stderr
    body, _, certs = im.stdout.partition("\n")
    assert json.loads(body)["user_id"] == 3
    assert "X509v3 Subject Alternative Name:DNS:im.example.com, DNS:*.im.example.com" in certs

    # The default certificate does not name other.example.com: curl refuses it.
    other = curl(main, "other.example.com", "--resolve", f"other.example.com:{port}:127.0.0.1")
    assert other.returncode == 60, (other.returncode, other.stderr)
    assert "other.example.com" in other.stderr


def test_the_expiry_metric_tells_each_certificate_time_left(main: TlsGateway) -> None:
    values = main.metrics()
    names = {key for key in values if key.startswith(EXPIRY + "{")}
    assert names == {f'{EXPIRY}{{name="gw.pem"}}', f'{EXPIRY}{{name="im.pem"}}'}
    now = time.time()
    for stem in ("gw", "im"):
        left = expiry(values, f"{stem}.pem")
        # Set when the table was installed (and refreshed every minute since).
        assert left == pytest.approx(main.certificates.not_after(stem) - now, abs=180), stem
    assert expiry(values, "gw.pem") == pytest.approx(90 * DAY, abs=600)


# ---------------------------------------------------------------- reload


def test_rotated_certificates_serve_new_connections_while_a_wss_session_goes_on(
    procs: Processes, upstream: str, certificates: Certificates
) -> None:
    gateway = start_gateway(procs, upstream, certificates)
    uid = fresh_uid()
    ws = gateway.wss(f"/ws?uid={uid}&did=rotation")
    kept = gateway.connection()
    try:
        ws.send({"cmd": "echo", "seq": 1, "body": {"before": 1}})
        assert ws.receive() == {"cmd": "echo", "seq": 1, "status": 0, "body": {"before": 1}}
        assert request(kept, "GET", PROFILE).status == 200
        assert gateway.served(None) == certificates.der("gw")
        before = gateway.admin("GET", "/admin/config").json()["version"]

        # Replace the files (a new key too) and SIGHUP.
        shutil.copy(certificates.directory / "gw2.pem", gateway.directory / "gw.pem")
        shutil.copy(certificates.directory / "gw2.key", gateway.directory / "gw.key")
        gateway.process.send(signal.SIGHUP)
        wait_for(
            lambda: gateway.served("gw.example.com") == certificates.der("gw2"),
            "new connections to get the new certificate",
        )
        assert gateway.served(None) == certificates.der("gw2")
        assert gateway.served("im.example.com") == certificates.der("im")
        assert gateway.admin("GET", "/admin/config").json()["version"] != before
        assert gateway.https("GET", PROFILE).json()["user_id"] == 3  # verified: same CA

        # The session opened before goes on, on its own certificate.
        assert ws.peer_certificate() == certificates.der("gw")
        ws.send({"cmd": "echo", "seq": 2, "body": {"after": 1}})
        assert ws.receive() == {"cmd": "echo", "seq": 2, "status": 0, "body": {"after": 1}}
        sent = gateway.https(
            "POST", "/v1/messages", {"to_uid": uid, "text": "after"}, {"X-User-Id": "8"}
        )
        assert sent.status == 200, sent
        push = ws.receive()
        assert isinstance(push, dict), push
        assert (push["cmd"], push["body"]["text"]) == ("new_message", "after")
        # So does a keep-alive connection opened before.
        sock = kept.sock
        assert request(kept, "GET", PROFILE).json()["user_id"] == 3
        assert kept.sock is sock
        assert sock.getpeercert(binary_form=True) == certificates.der("gw")

        values = gateway.metrics()
        assert metric(values, "tlvproxy_config_reloads_total", result="ok") == 1
        left = expiry(values, "gw.pem")
        assert left == pytest.approx(certificates.not_after("gw2") - time.time(), abs=180)
    finally:
        ws.close()
        kept.close()


def named(directory: Path, written: str) -> str:
    """A regex for how an error names the file `written` (relative to the
    table): as written, or joined to the table's directory."""
    return f"(?:{re.escape(written)}|{re.escape(str(directory / written))})"


def _garbage(directory: Path, certificates: Certificates) -> str:
    (directory / "gw.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")
    return named(directory, "gw.pem") + " holds no PEM certificate"


def _mismatch(directory: Path, certificates: Certificates) -> str:
    shutil.copy(certificates.directory / "im.key", directory / "gw.key")
    return (
        f"the key {named(directory, 'gw.key')} does not match"
        f" the certificate {named(directory, 'gw.pem')}"
    )


@pytest.mark.parametrize("break_it", [_garbage, _mismatch], ids=["garbage", "mismatch"])
def test_a_broken_certificate_fails_the_reload_and_the_old_one_stays(
    procs: Processes, upstream: str, certificates: Certificates, break_it: Any
) -> None:
    gateway = start_gateway(procs, upstream, certificates)
    before = gateway.admin("GET", "/admin/config").json()["version"]
    message = break_it(gateway.directory, certificates)  # a regex
    lines = gateway.table.read_text().splitlines()

    answer = gateway.admin("POST", "/admin/reload")

    assert answer.status == 400, answer
    error = answer.json()["error"]
    assert error["code"] == "invalid_table"
    [problem] = error["errors"]
    where, _, what = problem.partition(": ")
    file, line, _column = where.rsplit(":", 2)
    assert file == str(gateway.table)
    assert "gw.pem" in lines[int(line) - 1], (problem, lines[int(line) - 1])  # the entry's place
    assert re.fullmatch(re.escape("tls.certificates[0]: ") + message, what), what
    # The old certificate is still served to new connections, and verifies.
    assert gateway.served(None) == certificates.der("gw")
    assert gateway.https("GET", PROFILE).json()["user_id"] == 3
    assert gateway.admin("GET", "/admin/config").json()["version"] == before

    # SIGHUP fails the same way.
    gateway.process.send(signal.SIGHUP)
    wait_for(
        lambda: any(r["message"].startswith("reload failed") for r in gateway.process.records()),
        "the reload error log line",
    )
    assert gateway.served("localhost") == certificates.der("gw")
    values = gateway.metrics()
    assert metric(values, "tlvproxy_config_reloads_total", result="error") == 2
    assert expiry(values, "gw.pem") == pytest.approx(90 * DAY, abs=600)

    # Mended files load on the next reload.
    shutil.copy(certificates.directory / "gw2.pem", gateway.directory / "gw.pem")
    shutil.copy(certificates.directory / "gw2.key", gateway.directory / "gw.key")
    assert gateway.admin("POST", "/admin/reload").status == 200
    assert gateway.served(None) == certificates.der("gw2")


# ---------------------------------------------------------------- other tables


def test_min_version_1_3_refuses_a_tls_1_2_client(
    procs: Processes, upstream: str, certificates: Certificates
) -> None:
    gateway = start_gateway(
        procs, upstream, certificates, tls={"certificates": [GW_ENTRY], "min_version": "1.3"}
    )
    before = failures(gateway, "protocol_version")
    with pytest.raises(ssl.SSLError):
        tls_socket(gateway.https_port, unverified_context(maximum=ssl.TLSVersion.TLSv1_2)).close()
    wait_counted(gateway, "protocol_version", before)

    context = gateway.certificates.client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    connection = HttpsConnection("localhost", gateway.https_port, context)
    try:
        assert request(connection, "GET", PROFILE).status == 200
        assert connection.sock.version() == "TLSv1.3"
    finally:
        connection.close()


def test_a_reload_raises_min_version_for_new_handshakes(
    procs: Processes, upstream: str, certificates: Certificates
) -> None:
    gateway = start_gateway(procs, upstream, certificates)
    tls12 = unverified_context(maximum=ssl.TLSVersion.TLSv1_2)
    kept = tls_socket(gateway.https_port, tls12, "im.example.com")
    try:
        assert kept.version() == "TLSv1.2"
        rewrite(gateway.table, tls={"certificates": [GW_ENTRY, IM_ENTRY], "min_version": "1.3"})
        assert gateway.admin("POST", "/admin/reload").status == 200
        before = failures(gateway, "protocol_version")
        for name in ("localhost", "im.example.com"):  # the default and an SNI choice
            with pytest.raises(ssl.SSLError):
                tls_socket(gateway.https_port, tls12, name).close()
        wait_counted(gateway, "protocol_version", before, 2)
        assert gateway.https("GET", PROFILE, name="im.example.com").status == 200
        # The connection made before keeps its TLS 1.2.
        kept.sendall(b"GET " + PROFILE.encode() + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, body = read_response(kept.makefile("rb"))
        assert (status, json.loads(body)["user_id"]) == (200, 3)
    finally:
        kept.close()


def test_a_certificate_removed_by_a_reload_leaves_the_expiry_metric(
    procs: Processes, upstream: str, certificates: Certificates
) -> None:
    gateway = start_gateway(procs, upstream, certificates)
    assert set(expiry_names(gateway)) == {"gw.pem", "im.pem"}
    rewrite(gateway.table, tls={"certificates": [GW_ENTRY]})
    assert gateway.admin("POST", "/admin/reload").status == 200
    assert set(expiry_names(gateway)) == {"gw.pem"}
    assert gateway.served("im.example.com") == certificates.der("gw")


def expiry_names(gateway: TlsGateway) -> dict[str, float]:
    """{certificate name: seconds left} from the expiry gauge."""
    prefix = EXPIRY + '{name="'
    return {
        key[len(prefix) : -2]: value
        for key, value in gateway.metrics().items()
        if key.startswith(prefix)
    }


def test_https_alone_with_listen_http_null(
    procs: Processes, upstream: str, certificates: Certificates
) -> None:
    gateway = start_gateway(procs, upstream, certificates, http=False)
    [listening] = [r for r in gateway.process.records() if r["message"] == "gateway listening"]
    assert listening["https"] == f"127.0.0.1:{gateway.https_port}"
    assert listening["http"] in (None, "None")
    assert gateway.https("GET", PROFILE).json()["user_id"] == 3
    assert gateway.https("POST", "/v1/echo", {"only": "https"}).json() == {"only": "https"}
    ws = gateway.wss(f"/ws?uid={fresh_uid()}&did=only")
    try:
        ws.send({"cmd": "echo", "seq": 1, "body": {}})
        assert ws.receive() == {"cmd": "echo", "seq": 1, "status": 0, "body": {}}
    finally:
        ws.close()


def test_two_workers_share_the_https_port(
    procs: Processes, upstream: str, certificates: Certificates
) -> None:
    gateway = start_gateway(procs, upstream, certificates, "--workers", "2")
    workers = set(children(gateway.process.pid))
    assert len(workers) == 2
    for n in range(40):  # each on a new connection: the kernel spreads them
        answer = gateway.https("POST", "/v1/echo", {"n": n})
        assert (answer.status, answer.json()) == (200, {"n": n})
    served = {
        r["pid"]
        for r in gateway.process.records()
        if r["message"] == "request" and r.get("path") == "/v1/echo" and r["status"] == 200
    }
    assert served == workers
    # The supervisor's /metrics sums the workers' counters.
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", gateway.https_port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    wait_for(lambda: failures(gateway, "plain_http") == 6, "6 plain_http failures, summed")
    left = expiry(gateway.metrics(), "gw.pem")
    assert left == pytest.approx(certificates.not_after("gw") - time.time(), abs=180)

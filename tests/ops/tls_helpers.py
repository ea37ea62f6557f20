"""TLS for the operations tests: test certificates (trustme), a gateway whose
table serves `listen.https`, and blocking TLS clients (https, wss, a raw socket).

Like procs.py everything is synchronous. Certificates are made once per
`Certificates` and copied next to each gateway's table, so a test may replace
its gateway's files (a rotation, a broken file) without touching another's.
"""

from __future__ import annotations

import datetime
import http.client
import json
import shutil
import socket
import ssl
from typing import TYPE_CHECKING, Any

import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.e2e.conftest import write_table
from tests.ops.procs import DEADLINE, Answer, Gateway, WebSocket, answer_of, free_port, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from tests.ops.procs import Processes

GW_NAMES = ("localhost", "127.0.0.1", "gw.example.com")
IM_NAMES = ("im.example.com", "*.im.example.com")
DAY = 86400.0


class Certificates:
    """A test CA and its leaves, written as STEM.pem / STEM.key in `directory`:
    gw (the default: localhost, 127.0.0.1, gw.example.com; 90 days), gw2 (the
    same names, another key: a rotation of gw; 120 days) and im (im.example.com
    and *.im.example.com; 60 days); ca.pem is the CA clients trust."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        now = datetime.datetime.now(datetime.UTC)
        self.leaves = {
            "gw": self.ca.issue_cert(*GW_NAMES, not_after=now + datetime.timedelta(days=90)),
            "gw2": self.ca.issue_cert(*GW_NAMES, not_after=now + datetime.timedelta(days=120)),
            "im": self.ca.issue_cert(*IM_NAMES, not_after=now + datetime.timedelta(days=60)),
        }
        for stem, leaf in self.leaves.items():
            leaf.cert_chain_pems[0].write_to_path(str(directory / f"{stem}.pem"))
            leaf.private_key_pem.write_to_path(str(directory / f"{stem}.key"))

    def der(self, stem: str) -> bytes:
        """The leaf certificate `stem` in DER, as a client's getpeercert(True) gives it."""
        pem = self.leaves[stem].cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)

    def not_after(self, stem: str) -> float:
        pem = self.leaves[stem].cert_chain_pems[0].bytes()
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()

    def copy_to(self, directory: Path) -> None:
        for stem in self.leaves:
            for suffix in (".pem", ".key"):
                shutil.copy(self.directory / f"{stem}{suffix}", directory / f"{stem}{suffix}")

    def client_context(self) -> ssl.SSLContext:
        """A client that verifies the chain against the test CA and the name."""
        return ssl.create_default_context(cafile=str(self.ca_path))


# The default tls section: gw first (the default), im for its names.
GW_ENTRY = {"cert": "gw.pem", "key": "gw.key"}
IM_ENTRY = {"cert": "im.pem", "key": "im.key", "server_names": list(IM_NAMES)}


class TlsGateway(Gateway):
    """A `tlvproxy serve` process with an https listener."""

    def __init__(
        self, base: Gateway, https_port: int, certificates: Certificates, directory: Path
    ) -> None:
        super().__init__(base.process, base.table, base.http_port, base.admin_port)
        self.https_port = https_port
        self.certificates = certificates
        self.directory = directory  # the table's: its certificate files are here

    def https(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        name: str = "localhost",
    ) -> Answer:
        """One request on an https connection of its own, verifying the test
        CA's chain and `name`."""
        connection = self.connection(name)
        try:
            return request(connection, method, path, body, headers)
        finally:
            connection.close()

    def connection(self, name: str = "localhost") -> HttpsConnection:
        return HttpsConnection(name, self.https_port, self.certificates.client_context())

    def served(self, name: str | None) -> bytes:
        """The DER of the certificate a new connection asking for `name` (None:
        no SNI at all) is served; the chain is verified, the name is not."""
        return served_certificate(self.https_port, name, self.certificates.client_context())

    def wss(self, target: str = "/ws?uid=1&did=a", name: str = "localhost") -> SecureWebSocket:
        return SecureWebSocket(self.https_port, self.certificates.client_context(), name, target)


def start_gateway(
    procs: Processes,
    upstream: str,
    certificates: Certificates,
    *options: str,
    http: bool = True,
    tls: dict[str, Any] | None = None,
    **overrides: Any,
) -> TlsGateway:
    """`tlvproxy serve` on a demo table that also listens for https (only https
    when not `http`), its certificates copied beside the table; returns once
    /readyz answers 200."""
    directory = procs.directory / f"tls-gw{free_port()}"
    directory.mkdir()
    certificates.copy_to(directory)
    http_port, https_port, admin_port = free_port(), free_port(), free_port()
    path = write_table(directory, upstream, **overrides)
    document = yaml.safe_load(path.read_text())
    document["listen"] = {
        "http": f"127.0.0.1:{http_port}" if http else None,
        "https": f"127.0.0.1:{https_port}",
        "admin": f"127.0.0.1:{admin_port}",
    }
    document["tls"] = tls or {"certificates": [GW_ENTRY, IM_ENTRY]}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    process = procs.start("gateway", "serve", "-c", str(path), *options)
    base = Gateway(process, path, http_port if http else 0, admin_port)

    def ready() -> bool:
        assert process.alive(), process.text()
        return base.ready()

    wait_for(ready, "the gateway's /readyz")
    return TlsGateway(base, https_port, certificates, directory)


class HttpsConnection(http.client.HTTPSConnection):
    """An https connection to 127.0.0.1 that asks for (SNI) and verifies `name`."""

    def __init__(self, name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(name, port, context=context, timeout=DEADLINE)
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self.host)


def request(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on `connection` (kept open for the next)."""
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    connection.request(method, path, body=data, headers=headers or {})
    return answer_of(connection.getresponse())


def tls_socket(port: int, context: ssl.SSLContext, name: str | None = "localhost") -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:`port`, the handshake done."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        return context.wrap_socket(sock, server_hostname=name)
    except BaseException:
        sock.close()
        raise


def served_certificate(port: int, name: str | None, context: ssl.SSLContext) -> bytes:
    context.check_hostname = False  # `name` may be one no certificate has
    with tls_socket(port, context, name) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def unverified_context(
    minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A client that checks nothing, limited to TLS versions [minimum, maximum];
    at OpenSSL's security level 0 so that it offers old versions at all (the
    refusal is then the server's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


class SecureWebSocket(WebSocket):
    """procs.WebSocket over TLS: the same send and receive, on an ssl socket."""

    def __init__(self, port: int, context: ssl.SSLContext, name: str, target: str) -> None:
        self.tls = tls_socket(port, context, name)
        super().__init__(port, target, sock=self.tls, host=name)

    def peer_certificate(self) -> bytes | None:
        """The DER of the certificate this session's handshake was served."""
        return self.tls.getpeercert(binary_form=True)


def read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a binary file: (status,
    headers lower-cased, body). For pipelined answers read from one file."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def read_until_closed(sock: socket.socket, limit: float = DEADLINE) -> bytes:
    """Everything `sock` receives until the peer closes (or resets) it."""
    sock.settimeout(limit)
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data

"""Helpers for the authentication tests of a real gateway (tests/ops/test_auth.py).

Keys and tokens (`Signer`, `jwks`, `unsigned`, `hmac_signed`), signed requests
(`signature_headers`), a WebSocket client that sends any handshake header and
reports a refused handshake (`handshake`), a JWKS server (`KeyServer`) and a
gateway started on a table with files of its own next to it (`start_gateway`).
Everything is synchronous, like tests/ops/procs.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import socket
import threading
import time
import uuid
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from unittest import mock

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection

from tests.auth.keys import b64url
from tests.ops.procs import DEADLINE, Gateway, WebSocket, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.ops.procs import Processes

ISSUER = "https://login.example.com"
AUDIENCE = "im-gateway"


# ---------------------------------------------------------------- keys and tokens


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


class Signer:
    """A private key and the `kid` its public half has in a key set."""

    def __init__(self, kid: str, kind: str = "rsa") -> None:
        self.kid = kid
        self.kind = kind
        self.key: Any
        if kind == "rsa":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "p256":
            self.key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "p384":
            self.key = ec.generate_private_key(ec.SECP384R1())
        else:
            raise ValueError(kind)

    @property
    def algorithm(self) -> str:
        return {"rsa": "RS256", "p256": "ES256", "p384": "ES384"}[self.kind]

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK with its kid, alg and use."""
        public = self.key.public_key()
        if self.kind == "rsa":
            entry: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            entry = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**entry, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        *,
        algorithm: str | None = None,
        kid: str | None = "",
        lifetime: float = 300.0,
        **claims: Any,
    ) -> str:
        """A signed token: issuer, audience, sub "1", exp in `lifetime` s and a
        unique jti unless `claims` say otherwise (a None claim is left out)."""
        payload = claims_of(lifetime=lifetime, **claims)
        headers = {} if kid is None else {"kid": kid or self.kid}
        return jwt.encode(payload, self.key, algorithm=algorithm or self.algorithm, headers=headers)


def claims_of(*, lifetime: float = 300.0, **claims: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "1",
        "iat": now - 1,
        "exp": now + int(lifetime),
        "jti": uuid.uuid4().hex,
    }
    payload.update(claims)
    return {name: value for name, value in payload.items() if value is not None}


def jwks(*signers: Signer) -> str:
    return json.dumps({"keys": [signer.jwk() for signer in signers]})


def unsigned(**claims: Any) -> str:
    """An `alg: none` token: header and payload, and an empty signature."""
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims_of(**claims))}."


def hmac_signed(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """An HS256 token signed by hand (PyJWT refuses a PEM key as an HMAC secret)."""
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    signature = hmac.digest(secret, signing_input.encode(), "sha256")
    return f"{signing_input}.{b64url(signature)}"


def rs256_signed(signer: Signer, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """An RS256 token with any header (PyJWT refuses to write some, like a
    number as the kid)."""
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    signature = signer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def tampered(token: str, **changes: Any) -> str:
    """`token` with claims changed in its payload and its signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64url_json(claims)}.{signature}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- signed requests


def digest_of(body: bytes) -> str:
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()


def signature_headers(
    secret: bytes,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    key_id: str = "k1",
    date: float | None = None,
    sign_digest: bool | None = None,
) -> dict[str, str]:
    """The Date, Digest and Authorization headers of a request signed with `secret`.

    The digest is signed when the request has a body, unless `sign_digest` says.
    """
    headers = {"Date": formatdate(time.time() if date is None else date, usegmt=True)}
    if sign_digest is None:
        sign_digest = bool(body)
    names = ["@request-target", "date"]
    if sign_digest:
        headers["Digest"] = digest_of(body)
        names.append("digest")
    lines = []
    for name in names:
        if name == "@request-target":
            lines.append(f"@request-target: {method.lower()} {target}")
        else:
            lines.append(f"{name}: {headers[name.title()]}")
    signature = base64.b64encode(hmac.digest(secret, "\n".join(lines).encode(), "sha256"))
    headers["Authorization"] = (
        f'Signature keyId="{key_id}",algorithm="hmac-sha256",'
        f'headers="{" ".join(names)}",signature="{signature.decode()}"'
    )
    return headers


# ---------------------------------------------------------------- WebSocket handshakes


class Session(WebSocket):
    """An open WebSocket session (procs.WebSocket's methods) after a raw handshake."""

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self.ws = Connection(ConnectionType.CLIENT)  # type: ignore[assignment]
        self._pending: list[Any] = []
        if leftover:
            self.ws.receive_data(leftover)
            self._pending.extend(self.ws.events())

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send `message` and return the next message, which must be JSON."""
        self.send(message)
        answer = self.receive()
        assert not isinstance(answer, CloseConnection), answer
        return answer

    def send_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        self.close()


class Handshake:
    """A handshake's answer: the status, headers and body (refused) or the session."""

    def __init__(
        self, status: int, headers: dict[str, str], body: bytes, session: Session | None
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.session = session

    def json(self) -> Any:
        return json.loads(self.body)

    def close(self) -> None:
        if self.session is not None:
            self.session.send_close()

    def __repr__(self) -> str:
        return f"Handshake({self.status}, {self.headers}, {self.body[:300]!r})"


def handshake(port: int, target: str = "/ws", headers: dict[str, str] | None = None) -> Handshake:
    """An upgrade request for `target` with `headers`, written by hand."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise AssertionError(f"the connection closed during the handshake: {received!r}")
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    if status == 101:
        expected = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        assert answer_headers.get("sec-websocket-accept") == expected, answer_headers
        return Handshake(status, answer_headers, b"", Session(sock, rest))
    length = int(answer_headers.get("content-length", "-1"))
    while len(rest) < length or length < 0:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    sock.close()
    return Handshake(status, answer_headers, rest, None)


# ---------------------------------------------------------------- a JWKS server


class KeyServer:
    """A real HTTP server on 127.0.0.1 serving `documents` by path (404 otherwise)."""

    def __init__(self) -> None:
        self.documents: dict[str, str] = {}
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                document = owner.documents.get(self.path)
                body = b'{"error": "not found"}' if document is None else document.encode()
                self.send_response(404 if document is None else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self.running = True

    def url(self, path: str = "/jwks.json") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(DEADLINE)


# ---------------------------------------------------------------- gateways


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    with mock.patch.dict(os.environ, values):
        yield


def start_gateway(
    procs: Processes,
    upstream: str,
    name: str,
    *,
    files: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Gateway:
    """`tlvproxy serve` on the tests' demo table with `overrides`, `files` written
    next to the table (paths relative to it) and `env` in its environment;
    returns once /readyz answers 200."""
    path, http_port, admin_port = procs.table(upstream, name, **overrides)
    for relative, text in (files or {}).items():
        file = path.parent / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    with environment(env or {}):
        process = procs.start(name, "serve", "-c", str(path))
    gateway = Gateway(process, path, http_port, admin_port)

    def ready() -> bool:
        assert process.alive(), process.text()
        return gateway.ready()

    wait_for(ready, f"the gateway {name}'s /readyz")
    return gateway


def access_record(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The access record of the request `request_id`, once written."""

    def find() -> dict[str, Any] | None:
        for record in gateway.process.records():
            if record.get("request_id") == request_id and "status" in record:
                return record
        return None

    found: dict[str, Any] = wait_for(find, f"the access record of {request_id}")
    return found

"""The `tls` section and the certificates it names (docs/configuration.md "tls").

Owns: reading `tls` into a `TlsSpec`, and loading each certificate's files into
a server-side `ssl.SSLContext`; `ServerCertificates`, the choice among them by
the name a client asks for (SNI), and when each expires.
Must not: accept connections or handshake (the server wraps its streams with
`ServerCertificates.context`), or import trio. Loading reads files and parses
keys: it runs where the table is loaded, off the serving thread.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import time
from typing import TYPE_CHECKING, Final, Literal

import attrs
from cryptography import x509

from tlvproxy.config import nodes
from tlvproxy.config.model import CertificateSpec, TlsSpec
from tlvproxy.config.nodes import Invalid, join

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from tlvproxy.config.nodes import Node, NodeReader

# The TLS versions a table may ask for at least. Below 1.2 is refused: the
# OpenSSL of current systems will not negotiate it anyway, and what it lacks
# (AEAD ciphers, a sound handshake hash) is why.
MIN_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# A certificate that expires within this many days is warned about
# (docs/operations.md "Certificates").
EXPIRY_WARNING_DAYS: Final = 14
_DAY = 86400.0
# One DNS label (RFC 1123, lower case: names are compared lower-cased).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SERVER_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_MAX_NAME = 253


class _EncryptedKeyError(Exception):
    pass


@attrs.frozen(eq=False)
class Certificate:
    """One loaded certificate: its context and what the metrics and logs tell."""

    name: str  # the `cert` path as written in the table
    context: ssl.SSLContext
    server_names: tuple[str, ...]
    dns_names: tuple[str, ...]  # the names the certificate itself is for
    not_after: float  # POSIX time the leaf certificate expires
    digest: str  # sha256 of the certificate file: a new file, a new table version

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until it expires (negative once it has)."""
        return self.not_after - (time.time() if now is None else now)


class ServerCertificates:
    """The certificates of one table, chosen per handshake by SNI.

    Every handshake starts on `context`, the first certificate's; its
    `sni_callback` moves the connection to the certificate whose `server_names`
    hold the name the client asked for: an exact name first, then `*.` and the
    name's parent (one label). No name, or an unknown one, keeps the first
    (docs/configuration.md "tls").
    """

    def __init__(self, certificates: Sequence[Certificate]) -> None:
        if not certificates:
            raise ValueError("at least one certificate is needed")
        self.certificates = tuple(certificates)
        self.context = certificates[0].context
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}
        for certificate in certificates:
            for name in certificate.server_names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], certificate.context)
                else:
                    self._exact.setdefault(name, certificate.context)
        self.context.sni_callback = self._choose

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context a handshake asking for `server_name` is served from."""
        if not server_name:
            return self.context
        name = server_name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is None:
            found = self._wildcard.get(name.partition(".")[2], self.context)
        return found

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        chosen = self.context_for(server_name)
        if chosen is not self.context:
            connection.context = chosen


def read_tls(
    r: NodeReader, node: Node | None, base: Path, warn: Callable[[Node, str, str], None]
) -> tuple[TlsSpec | None, ServerCertificates | None]:
    """The `tls` section and its certificates loaded, or (None, None) without
    one. A file that cannot be loaded is recorded on `r` at its entry; `warn`
    gets what still loads but will hurt (a name the certificate does not cover,
    an expiry within EXPIRY_WARNING_DAYS)."""
    if node is None or node.tag.endswith(":null"):
        return None, None
    found = r.mapping(node, "tls", ("certificates", "min_version"))
    if found is None:
        return None, None
    min_version: Literal["1.2", "1.3"] = r.get(found, "min_version", "tls", _min_version, "1.2")
    if "certificates" not in found:
        r.error(node, "tls", "certificates is required: at least one {cert, key}")
        return None, None
    items = r.sequence(found["certificates"], "tls.certificates")
    if items is None:
        return None, None
    if not items:
        r.error(found["certificates"], "tls.certificates", "give at least one {cert, key}")
        return None, None
    specs: list[CertificateSpec] = []
    loaded: list[Certificate] = []
    named: dict[str, int] = {}  # server name -> the certificate entry that has it
    failed = False
    for i, item in enumerate(items):
        path = join("tls.certificates", i)
        spec = _certificate_spec(r, item, path, base, named, i)
        if spec is None:
            failed = True
            continue
        specs.append(spec)
        try:
            certificate = load_certificate(spec, min_version)
        except Invalid as exc:
            r.error(item, path, str(exc))
            failed = True
            continue
        for problem in _coverage_problems(spec, certificate.dns_names):
            warn(item, path, problem)
        if i > 0 and not spec.server_names:
            warn(item, path, "no server_names: only the first certificate is served without one")
        left = certificate.seconds_left()
        if left <= 0:
            warn(item, path, f"{spec.name} expired {-left / _DAY:.0f} days ago")
        elif left < EXPIRY_WARNING_DAYS * _DAY:
            warn(item, path, f"{spec.name} expires in {left / _DAY:.1f} days")
        loaded.append(certificate)
    if failed:
        return None, None
    return TlsSpec(certificates=tuple(specs), min_version=min_version), ServerCertificates(loaded)


def load_certificate(spec: CertificateSpec, min_version: str) -> Certificate:
    """A server context for `spec`: TLS `min_version`+, ALPN http/1.1.

    Raises Invalid saying which file is missing, unreadable or not PEM, or that
    the key does not match the certificate (or is encrypted: the gateway has
    nobody to ask for a passphrase)."""
    try:
        pem = spec.cert.read_bytes()
    except OSError as exc:
        raise Invalid(f"cannot read the certificate {spec.cert}: {exc.strerror or exc}") from None
    try:
        leaf = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise Invalid(f"{spec.cert} holds no PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[min_version]
    # Renegotiation is a denial-of-service lever and HTTP/1.1 never needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(spec.cert, spec.key, password=_no_passphrase)
    except _EncryptedKeyError:
        raise Invalid(
            f"the key {spec.key} is encrypted; give it unencrypted (mode 0600): "
            "the gateway cannot ask for a passphrase"
        ) from None
    except FileNotFoundError as exc:
        raise Invalid(f"no such file: {exc.filename or spec.key}") from None
    except ssl.SSLError as exc:
        raise Invalid(_load_failure(spec, exc)) from None
    except OSError as exc:
        raise Invalid(f"cannot read {spec.key}: {exc.strerror or exc}") from None
    try:
        extension = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = extension.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    return Certificate(
        name=spec.name,
        context=context,
        server_names=spec.server_names,
        dns_names=tuple(name.lower() for name in dns_names),
        not_after=leaf.not_valid_after_utc.timestamp(),
        digest=hashlib.sha256(pem).hexdigest(),
    )


def _no_passphrase() -> bytes:
    raise _EncryptedKeyError


def _load_failure(spec: CertificateSpec, exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"the key {spec.key} does not match the certificate {spec.cert}"
    if not exc.reason and "PEM lib" in str(exc):
        # The certificate parsed already: what OpenSSL could not read is the key.
        return f"{spec.key} holds no PEM private key"
    return f"cannot load {spec.cert} with the key {spec.key}: {exc.reason or exc}"


def _min_version(value: object) -> Literal["1.2", "1.3"]:
    # `min_version: 1.2` unquoted is a YAML float: the same wish.
    text = str(value) if isinstance(value, (str, float)) else ""
    if text not in MIN_VERSIONS:
        raise Invalid(f"expected one of '1.2', '1.3', got {value!r}")
    return "1.3" if text == "1.3" else "1.2"


def _certificate_spec(
    r: NodeReader, item: Node, path: str, base: Path, named: dict[str, int], index: int
) -> CertificateSpec | None:
    found = r.mapping(item, path, ("cert", "key", "server_names"))
    if found is None:
        return None
    missing = [key for key in ("cert", "key") if key not in found]
    if missing:
        r.error(item, path, f"{' and '.join(missing)} required: the PEM files to serve")
        return None
    cert = r.get(found, "cert", path, nodes.text, None)
    key = r.get(found, "key", path, nodes.text, None)
    files: list[Path] = []
    for field, text in (("cert", cert), ("key", key)):
        try:
            if text is not None:
                files.append(r.file(base, text))
        except Invalid as exc:
            r.error(found[field], join(path, field), str(exc))
    names: list[str] = []
    if "server_names" in found:
        names_path = join(path, "server_names")
        for j, name_node in enumerate(r.sequence(found["server_names"], names_path) or []):
            name = r.value(name_node, join(names_path, j), _server_name, None)
            if name is None:
                continue
            if name in named:
                where = (
                    "listed twice"
                    if named[name] == index
                    else f"already a name of tls.certificates[{named[name]}]"
                )
                r.error(name_node, join(names_path, j), f"{name} is {where}")
                continue
            named[name] = index
            names.append(name)
    if cert is None or len(files) != 2:
        return None
    return CertificateSpec(cert=files[0], key=files[1], server_names=tuple(names), name=cert)


def _server_name(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a host name like im.example.com, got {value!r}")
    name = value.lower().rstrip(".")
    if len(name) > _MAX_NAME or not _SERVER_NAME.fullmatch(name):
        raise Invalid(
            f"expected a host name like im.example.com or *.im.example.com "
            f"(a wildcard covers one label), got {value!r}"
        )
    return name


def _coverage_problems(spec: CertificateSpec, covered: tuple[str, ...]) -> list[str]:
    """Each of `spec.server_names` the certificate itself does not name: a
    client checking the name would refuse it."""
    return [
        f"server name {name} is not among the names of {spec.name} "
        f"({', '.join(covered) or 'none'}): clients that check the name will refuse it"
        for name in spec.server_names
        if not any(_covers(pattern, name) for pattern in covered)
    ]


def _covers(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    # A wildcard certificate covers one label: also a wildcard server name of
    # the same parent.
    parent = pattern[2:]
    return name.partition(".")[2] == parent and "." in name

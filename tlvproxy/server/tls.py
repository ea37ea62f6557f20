"""The TLS handshake of a client connection on the https listener
(docs/configuration.md "tls", docs/operations.md "TLS").

Owns: wrapping an accepted socket in a `trio.SSLStream`, the handshake under
its time limit, what a failed handshake is counted as, and the one answer a
client that spoke plain HTTP to the TLS port gets.
Must not: choose certificates (`config/certificates.py` does, by SNI) or serve
HTTP (the caller hands the stream to `serve_http_connection`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING, Final

import trio

from tlvproxy.errors import BadRequest
from tlvproxy.server.admission import closing_answer, refuse

if TYPE_CHECKING:
    from tlvproxy.config.certificates import ServerCertificates
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.http_conn import ErrorHandler

log = logging.getLogger("tlvproxy.tls")

# OpenSSL's reasons for a failed handshake, as the `reason` label of
# tlvproxy_tls_handshake_failures_total: a few an operator acts on, the rest "other".
_REASONS: Final = {
    "WRONG_VERSION_NUMBER": "protocol_version",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate_refused",
    "SSLV3_ALERT_BAD_CERTIFICATE": "certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate_refused",
    "TLSV1_ALERT_DECRYPT_ERROR": "certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate_refused",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "certificate_refused",
}


async def handshake(
    stream: trio.SocketStream,
    peer: str,
    certificates: ServerCertificates,
    deadline: float,
    metrics: Metrics,
    errors: ErrorHandler,
) -> trio.SSLStream[trio.SocketStream] | None:
    """`stream` wrapped in TLS once the handshake is done, or None when it
    failed or was not done by `deadline` (then `stream` is closed, the failure
    logged at debug and counted). A client that sent plain HTTP gets a 400
    saying so before the close."""
    reason = "timeout"
    with trio.move_on_at(deadline):
        # A TLS client speaks first, with a handshake record (0x16); a letter
        # is a plain HTTP request's method. Told apart here, for any method:
        # OpenSSL recognises only a few.
        try:
            first = await stream.socket.recv(1, socket.MSG_PEEK)
        except OSError:
            first = b""
        if not first:
            reason = "closed"
        elif first.isalpha():
            reason = "plain_http"
        else:
            tls = trio.SSLStream(
                stream, certificates.context, server_side=True, https_compatible=True
            )
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = failure_reason(exc.__cause__)
                log.debug("TLS handshake from %s failed: %s", peer, exc.__cause__ or exc)
            else:
                return tls
    if reason == "timeout":
        log.debug("TLS handshake from %s did not finish in time", peer)
    metrics.tls_handshake_failures.labels(reason).inc()
    if reason == "plain_http":
        error = BadRequest("this port speaks HTTPS: the request was sent as plain HTTP")
        await refuse(stream, closing_answer(errors(error, None)))
    else:
        await trio.aclose_forcefully(stream)
    return None


def failure_reason(cause: BaseException | None) -> str:
    """The `reason` label for a handshake that failed with `cause`."""
    if isinstance(cause, ssl.SSLError) and not isinstance(
        cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
    ):
        return _REASONS.get(cause.reason or "", "other")
    # The client closed or reset the connection before the handshake was done.
    return "closed"

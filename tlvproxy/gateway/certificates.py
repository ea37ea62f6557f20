"""The certificates new TLS handshakes use, and their expiry
(docs/operations.md "TLS", "Certificates").

Owns: the latest table's certificates (a table without `tls` leaves them as
they were), the tlvproxy_tls_certificate_expiry_seconds gauge, and the daily
warning of a certificate about to expire.
Must not: load certificates (the loader does) or handshake (server/tls.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import trio

from tlvproxy.config.certificates import EXPIRY_WARNING_DAYS

if TYPE_CHECKING:
    from tlvproxy.config.certificates import ServerCertificates
    from tlvproxy.metrics import Metrics

# The gateway's records, under the logger name docs/operations.md "Logs" gives.
log = logging.getLogger("tlvproxy.app")

# How often the certificates' expiry gauge is brought up to date, and how often
# a certificate about to expire is warned about again (docs/operations.md "TLS").
_EXPIRY_REFRESH = 60.0
_EXPIRY_WARNING_INTERVAL = 86400.0


class ServingCertificates:
    """The certificates handshakes use (`current`, None before a table with
    `tls`); `run` keeps their expiry gauge current and warns of those about
    to expire."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.current: ServerCertificates | None = None
        self._expiry_names: set[str] = set()
        self._next_expiry_warning = math.inf

    def install(self, certificates: ServerCertificates) -> None:
        """Use `certificates` from now on, and publish their expiry."""
        self.current = certificates
        self._publish_expiry()
        # The loader's warnings told of those about to expire: again in a day.
        self._next_expiry_warning = time.time() + _EXPIRY_WARNING_INTERVAL

    def _publish_expiry(self) -> None:
        """Set tlvproxy_tls_certificate_expiry_seconds for the current certificates."""
        if self.current is None:
            return
        gauge = self._metrics.tls_certificate_expiry
        now = time.time()
        names = set()
        for certificate in self.current.certificates:
            gauge.labels(certificate.name).set(certificate.seconds_left(now))
            names.add(certificate.name)
        for gone in self._expiry_names - names:
            gauge.remove(gone)
        self._expiry_names = names

    async def run(self) -> None:
        """Keep the expiry gauge current, and warn once a day of each
        certificate with less than EXPIRY_WARNING_DAYS left."""
        while True:
            await trio.sleep(_EXPIRY_REFRESH)
            self._publish_expiry()
            now = time.time()
            if self.current is None or now < self._next_expiry_warning:
                continue
            self._next_expiry_warning = now + _EXPIRY_WARNING_INTERVAL
            for certificate in self.current.certificates:
                days = certificate.seconds_left(now) / 86400
                if days < EXPIRY_WARNING_DAYS:
                    log.warning(
                        "a TLS certificate expires soon"
                        if days > 0
                        else "a TLS certificate expired",
                        extra={"certificate": certificate.name, "days_left": round(days, 1)},
                    )

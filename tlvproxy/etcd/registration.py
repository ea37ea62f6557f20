"""A service's address registered in etcd while it runs (`mock-upstream
--register`, docs/operations.md "Discovery").

Owns: one key, `{prefix}/{address}` = `address`, put on a lease of LEASE_TTL
seconds, renewed every KEEPALIVE_INTERVAL; put again on a new lease when the
old one expired (etcd was out of reach longer than its TTL); and revoked when
the registration is cancelled, so gateways drop the node at once instead of
after the TTL.
Must not: serve anything; the caller stops taking work after `revoked`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

from tlvproxy.etcd.client import EtcdUnavailable, open_etcd
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer

if TYPE_CHECKING:
    from tlvproxy.etcd.client import EtcdClient

log = logging.getLogger("tlvproxy.etcd")

LEASE_TTL: Final = 10
KEEPALIVE_INTERVAL: Final = 3.0
# A request to etcd that takes longer than this is given up (and retried).
REQUEST_TIMEOUT: Final = 5.0
REVOKE_TIMEOUT: Final = 2.0


async def keep_registered(
    endpoint: str,
    prefix: str,
    address: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `address` registered under `prefix` until cancelled, then revoke it.

    Started once the key is first written. Raises EtcdUnavailable,
    EtcdRefused or MalformedAnswer if that first write fails."""
    key = f"{prefix}/{address}".encode()
    async with open_etcd([endpoint]) as client:
        with trio.fail_after(REQUEST_TIMEOUT):
            lease = await _register(client, key, address)
        log.info("registered in etcd", extra={"key": key.decode(), "lease": lease})
        task_status.started()
        try:
            while True:
                await trio.sleep(KEEPALIVE_INTERVAL)
                lease = await _renew(client, key, address, lease)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(REVOKE_TIMEOUT):
                try:
                    await client.revoke(lease)
                    log.info("registration revoked", extra={"key": key.decode()})
                except (EtcdUnavailable, EtcdRefused, MalformedAnswer) as exc:
                    log.warning(
                        "cannot revoke the registration; it ends with its lease",
                        extra={"key": key.decode(), "error": str(exc)},
                    )


async def _register(client: EtcdClient, key: bytes, address: str) -> int:
    lease = await client.grant(LEASE_TTL)
    await client.put(key, address.encode(), lease=lease)
    return lease


async def _renew(client: EtcdClient, key: bytes, address: str, lease: int) -> int:
    """Keep `lease` alive, or register again on a new one; the lease in use.
    A failure is logged: the next round tries again."""
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            if await client.keepalive(lease) > 0:
                return lease
            log.warning("the registration's lease expired; registering again")
            return await _register(client, key, address)
        except (EtcdUnavailable, EtcdRefused, MalformedAnswer) as exc:
            log.warning("cannot renew the registration", extra={"error": str(exc)})
    return lease

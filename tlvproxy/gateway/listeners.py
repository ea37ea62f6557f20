"""The gateway's listening sockets (docs/operations.md "Starting", "Workers").

Owns: binding a listener (SO_REUSEADDR, and SO_REUSEPORT so that workers
share a port), the one-line error that says where and why a bind failed, and
the address a bound listener reports.
Must not: accept or serve connections.
"""

from __future__ import annotations

import socket

import trio

from tlvproxy.config.model import Address

_BACKLOG = 1024


class CannotListen(OSError):
    """A listener could not be bound; `str()` is the one line that says where
    and why (docs/operations.md "Starting")."""

    def __init__(self, address: Address, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.address = address

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.strerror}"


def bind_listener(address: Address, *, reuse_port: bool) -> trio.SocketListener:
    """A listening socket on `address`; SO_REUSEPORT lets workers share a port
    (docs/operations.md "Workers").

    Raises CannotListen (an OSError) naming the address when it cannot be bound.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # bind() on a trio socket is synchronous for numeric addresses.
        sock._sock.bind((address.host, address.port))  # type: ignore[attr-defined]  # trio hides the stdlib socket; binding a numeric address never blocks
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise CannotListen(address, exc) from None
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def address_of(listener: trio.SocketListener) -> Address:
    """The address `listener` is bound to (its port when bound to port 0)."""
    host, port = listener.socket.getsockname()[:2]
    return Address(host, port)

"""Who may hold a connection: connection counts and the file descriptor budget.

Owns: the count of one worker's client connections, in all and per client
address (`limits.max_connections`, `limits.max_connections_per_ip`), and
the second descriptor of sessions and relayed TLS connections; the
descriptors a worker keeps in reserve for its upstream connections and its
admin listener (app.py adds those of handoffs), raising RLIMIT_NOFILE's
soft limit at start, accept()'s failures (a pause, not a spin), the answer
that refuses a connection (503 `overloaded`, written without reading the
request), and the burst logging of both. docs/operations.md "Connections
and file descriptors" tells the operator the same rules.
Must not: serve a connection or read a request: the accept loop (app.py)
decides, asking `Admission` once per connection, never per request.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import resource
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from tlvproxy.config.model import Limits, Network, UpstreamSpec
    from tlvproxy.server.http_conn import Response

log = logging.getLogger("tlvproxy.app")

# Connections the admin listener serves at once; more are refused 503. They
# come out of the descriptor reserve, so a flood of clients cannot starve
# /healthz, and a flood of the admin port cannot take the clients' share.
MAX_ADMIN_CONNECTIONS: Final = 32
# Refused connections lingering at once (see `refuse`), each for at most
# REFUSE_TIMEOUT; beyond this a refused connection is closed at once.
MAX_REFUSING: Final = 32
REFUSE_TIMEOUT: Final = 1.0
# A refused client's bytes are read and dropped until it is quiet this long,
# or MAX_DISCARD of them came. A request in flight arrives right behind the
# handshake's last ACK, so a short quiet time catches it.
LINGER_QUIET: Final = 0.1
MAX_DISCARD: Final = 64 * 1024
_READ_SIZE: Final = 65536
# Descriptors kept for what is neither a client nor an upstream connection:
# table and key files read on reload, name lookups, log and metrics files.
SPARE_DESCRIPTORS: Final = 64
# How long accepting pauses when accept() fails for want of descriptors: the
# pending connection keeps the listener readable, so retrying at once would spin.
ACCEPT_BACKOFF: Final = 0.1
# The soft limit aimed at when the hard limit is unlimited (Linux refuses an
# unlimited soft limit above fs.nr_open, whose default this is).
_UNLIMITED_TARGET: Final = 1 << 20

# accept() errors about one client, gone before it was accepted (trio's
# SocketListener ignores the same): the next connection is accepted at once.
_CLIENT_GONE: Final = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
# accept() errors of a listener closed under it (the drain).
_LISTENER_CLOSED: Final = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})


@attrs.frozen(slots=True)
class Refusal:
    """Why a connection is refused: `kind` names the limit (it keys the burst
    log), `message` is the 503 answer's message."""

    kind: str
    message: str


class Admission:
    """One worker's client connections, counted at accept and at release.

    `budget` is how many descriptors client connections may hold: each client
    connection takes one, each WebSocket or push session one more for its
    upstream connection, and each TLS connection relayed to another worker
    one more for its end of the relay. Pure bookkeeping, O(1) per connection:
    a count, and a count per client address that is dropped when it reaches
    zero (so the dict holds at most one entry per open connection).
    """

    __slots__ = ("budget", "clients", "per_address", "pushes", "relays", "sessions")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.clients = 0
        self.sessions = 0  # upstream connections of sessions, WebSocket and push
        self.pushes = 0  # push sessions, which hold no client connection of their own
        self.relays = 0  # TLS connections relayed to another worker
        self.per_address: dict[str, int] = {}

    def admit(self, address: str | None, limits: Limits) -> Refusal | None:
        """Count a new client connection from `address` (None: counted in all
        only); None when it is admitted, else why not (nothing is counted)."""
        if self.clients + self.pushes >= limits.max_connections:
            return Refusal(
                "max_connections",
                f"the gateway holds max_connections ({limits.max_connections}) "
                "connections; try again later",
            )
        refusal = self._take(address, limits)
        if refusal is None:
            self.clients += 1
        return refusal

    def release(self, address: str | None) -> None:
        """A connection admitted with `address` has ended."""
        self.clients -= 1
        if address is not None:
            self._drop(address)

    def admit_session(self, address: str | None, limits: Limits) -> Refusal | None:
        """Count the upstream connection of a WebSocket session about to open on
        an admitted connection, and `address` (the client a trusted proxy
        forwarded, None when the connection was counted at accept); None when
        admitted, else why not."""
        refusal = self._take(address, limits)
        if refusal is None:
            self.sessions += 1
        return refusal

    def release_session(self, address: str | None) -> None:
        """A session admitted with `address` has ended."""
        self.sessions -= 1
        if address is not None:
            self._drop(address)

    def admit_push_session(self, address: str, limits: Limits) -> Refusal | None:
        """Count a push session opened by the client `address`: it holds an
        upstream connection, and counts as a client connection against both
        limits (docs/operations.md "Connections and file descriptors"); None
        when admitted, else why not."""
        if self.clients + self.pushes >= limits.max_connections:
            return Refusal(
                "max_connections",
                f"the gateway holds max_connections ({limits.max_connections}) "
                "connections and push sessions; try again later",
            )
        refusal = self._take(address, limits)
        if refusal is None:
            self.sessions += 1
            self.pushes += 1
        return refusal

    def release_push_session(self, address: str) -> None:
        """A push session admitted with `address` has ended."""
        self.pushes -= 1
        self.release_session(address)

    def admit_relay(self) -> Refusal | None:
        """Count the descriptor an admitted TLS connection needs to be relayed
        to another worker (docs/push-sessions.md "Workers"); None when
        admitted, else why not."""
        if self._full():
            return _no_descriptors()
        self.relays += 1
        return None

    def release_relay(self) -> None:
        """A relay admitted by `admit_relay` has ended."""
        self.relays -= 1

    def _full(self) -> bool:
        return self.clients + self.sessions + self.relays >= self.budget

    def _take(self, address: str | None, limits: Limits) -> Refusal | None:
        """A descriptor from the budget and, for `address`, a place under its
        limit (counted); else why not (nothing counted)."""
        if self._full():
            return _no_descriptors()
        return None if address is None else self._count(address, limits)

    def _count(self, address: str, limits: Limits) -> Refusal | None:
        held = self.per_address.get(address, 0)
        if held >= limits.max_connections_per_ip:
            return Refusal(
                "max_connections_per_ip",
                f"{address} holds max_connections_per_ip ({limits.max_connections_per_ip}) "
                "connections; try again later",
            )
        self.per_address[address] = held + 1
        return None

    def _drop(self, address: str) -> None:
        held = self.per_address[address] - 1
        if held:
            self.per_address[address] = held
        else:
            del self.per_address[address]


def _no_descriptors() -> Refusal:
    return Refusal(
        "descriptors",
        "the gateway has no file descriptor to spare for another connection; try again later",
    )


def counted_address(peer: str, trusted: Sequence[Network]) -> str | None:
    """The address a connection from `peer` counts against at accept: the peer,
    or None when it is a trusted proxy, whose connection carries the requests of
    many clients (a WebSocket session through it counts against the client it
    forwards, `Admission.admit_session`)."""
    if not trusted:
        return peer
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    return None if any(ip in network for network in trusted) else peer


# ---------------------------------------------------------------- descriptors


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (logged when it
    changes); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning(
            "could not raise the file descriptor limit",
            extra={"soft_limit": soft, "hard_limit": hard, "error": str(exc)},
        )
        return soft
    log.info(
        "raised the file descriptor limit to the hard limit",
        extra={"from": soft, "to": target},
    )
    return target


def open_descriptors() -> int:
    """How many descriptors this process has open now (0 when the system does
    not say)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            # The listing itself holds one while it runs.
            return max(len(os.listdir(directory)) - 1, 0)
    return 0


def upstream_reserve(upstreams: Iterable[UpstreamSpec]) -> int:
    """Descriptors the pools of `upstreams` may hold: `connections` per node,
    and one more per node for a probe, a heartbeat's connect, or a connection
    that opens while a broken one closes."""
    return sum(len(spec.nodes) * (spec.connections + 1) for spec in upstreams)


def descriptor_budget(limit: int, in_use: int, reserve: int) -> int:
    """Descriptors left for client connections: the soft `limit`, less those
    `in_use` at start (listeners, logs, the event loop), less `reserve`."""
    return max(limit - in_use - reserve, 0)


def log_capacity(limit: int, in_use: int, budget: int, limits: Limits) -> None:
    """Say at start when the descriptor limit, not max_connections, caps clients."""
    extra = {
        "descriptor_limit": limit,
        "descriptors_in_use": in_use,
        "client_descriptors": budget,
        "max_connections": limits.max_connections,
    }
    if budget == 0:
        log.warning(
            "the file descriptor limit leaves none for client connections: every "
            "connection will be refused 503; raise it (ulimit -n, LimitNOFILE)",
            extra=extra,
        )
    elif budget < limits.max_connections:
        log.info("client connections are capped by the file descriptor limit", extra=extra)


# ---------------------------------------------------------------- refusing


def closing_answer(response: Response) -> bytes:
    """`response` as HTTP/1.1 bytes that close the connection."""
    status = response.status
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append(f"Content-Length: {len(response.body)}")
    lines.append("Connection: close")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + response.body


async def refuse(stream: trio.abc.Stream, answer: bytes) -> None:
    """Write `answer` without reading the request, then close `stream`, all
    within REFUSE_TIMEOUT.

    Between the two, what the client sends is read and dropped (until it
    closes, is quiet for LINGER_QUIET, or MAX_DISCARD came): a socket closed
    with a request arriving is reset, and a client whose send fails may never
    read the answer.
    """
    try:
        with trio.move_on_after(REFUSE_TIMEOUT):
            # A client gone already leaves nothing to do but close below.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(answer)
                # Over TLS, the TCP connection ends (see http_conn `_close_gracefully`).
                rest = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
                if isinstance(rest, trio.abc.HalfCloseableStream):
                    await rest.send_eof()
                discarded = 0
                while discarded < MAX_DISCARD:
                    data: bytes | bytearray = b""
                    with trio.move_on_after(LINGER_QUIET):
                        data = await rest.receive_some(_READ_SIZE)
                    if not data:
                        break
                    discarded += len(data)
    finally:
        await trio.aclose_forcefully(stream)


def refuse_now(stream: trio.SocketStream, answer: bytes) -> None:
    """`refuse` without waiting: write what of `answer` the socket takes, drop
    what the client has sent so far, close."""
    sock = stream.socket
    fd = sock.fileno()
    with contextlib.suppress(OSError):  # BlockingIOError: nothing (more) to do
        os.write(fd, answer)
        for _ in range(MAX_DISCARD // _READ_SIZE):
            if not os.read(fd, _READ_SIZE):
                break
    sock.close()


class Doorkeeper:
    """What one worker's accept loops share: the refused connections being
    answered (at most MAX_REFUSING lingering, each for at most REFUSE_TIMEOUT),
    and the burst logs of accept failures and refusals, whose tasks run in
    `nursery`."""

    __slots__ = ("_accept_failures", "_nursery", "_refusal_logs", "_refusing")

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._refusing = 0
        self._accept_failures = BurstLog("accept failed; accepting pauses briefly")
        self._refusal_logs: dict[str, BurstLog] = {}

    async def accept(self, listener: trio.SocketListener) -> tuple[trio.SocketStream, str] | None:
        """The next connection on `listener` and its peer's address; None once
        the listener is closed (see `accept_socket`)."""
        accepted = await self.accept_socket(listener.socket)
        if accepted is None:
            return None
        sock, address = accepted
        return trio.SocketStream(sock), address[0]

    async def accept_socket(
        self, listener: trio.socket.SocketType
    ) -> tuple[trio.socket.SocketType, Any] | None:
        """The next connection on the listening socket `listener` and its
        peer's address; None once the listener is closed.

        When accept() fails for want of descriptors (EMFILE, ENFILE) or
        memory, pauses ACCEPT_BACKOFF and tries again: logged once per burst,
        not per failure.
        """
        while True:
            try:
                return await listener.accept()
            except trio.ClosedResourceError:
                return None
            except OSError as exc:
                if exc.errno in _LISTENER_CLOSED:
                    return None
                if exc.errno in _CLIENT_GONE:
                    continue
                self._accept_failures.record(self._nursery, error=str(exc))
                await trio.sleep(ACCEPT_BACKOFF)

    def refuse(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream,
        peer: str,
        refusal: Refusal,
        answer: bytes,
    ) -> None:
        """Answer `stream` with `answer` and close it: in a task of `nursery`
        (`refuse`), or at once when MAX_REFUSING already linger (`refuse_now`):
        the accept loop never waits for a refused client."""
        self.log_refusal(refusal, peer)
        if self._refusing >= MAX_REFUSING:
            refuse_now(stream, answer)
            return
        self._refusing += 1
        nursery.start_soon(self._refuse, stream, answer)

    async def refuse_here(
        self, stream: trio.SocketStream, peer: str, refusal: Refusal, answer: bytes
    ) -> None:
        """`refuse`, in the calling task: a refused connection that is
        already a task's (one another worker passed on) lingers only within
        the same MAX_REFUSING as the others."""
        self.log_refusal(refusal, peer)
        if self._refusing >= MAX_REFUSING:
            refuse_now(stream, answer)
            return
        self._refusing += 1
        await self._refuse(stream, answer)

    def log_refusal(self, refusal: Refusal, peer: str, *, answered: bool = True) -> None:
        """Log `refusal`, once per burst of its kind; `answered` False for a
        connection closed without an answer (the TLS port's)."""
        key = refusal.kind if answered else f"{refusal.kind} unanswered"
        burst = self._refusal_logs.get(key)
        if burst is None:
            how = "503 overloaded" if answered else "unanswered"
            burst = self._refusal_logs[key] = BurstLog(f"connections refused {how}: {refusal.kind}")
        burst.record(self._nursery, client_ip=peer, error=refusal.message)

    async def _refuse(self, stream: trio.SocketStream, answer: bytes) -> None:
        try:
            await refuse(stream, answer)
        finally:
            self._refusing -= 1


class BurstLog:
    """A repeated event logged once per burst, not once per occurrence: the
    first occurrence at once, then, every `interval` while it goes on, one line
    with how many there were since; a quiet interval ends the burst."""

    __slots__ = ("_count", "_interval", "_message", "_running")

    def __init__(self, message: str, interval: float = 10.0) -> None:
        self._message = message
        self._interval = interval
        self._count = 0
        self._running = False

    def record(self, nursery: trio.Nursery, **extra: object) -> None:
        """One occurrence; `extra` goes with the first line of a burst."""
        if self._running:
            self._count += 1
            return
        self._running = True
        log.warning(self._message, extra=extra)
        nursery.start_soon(self._report)

    async def _report(self) -> None:
        try:
            while True:
                await trio.sleep(self._interval)
                count, self._count = self._count, 0
                if not count:
                    return
                log.warning(
                    f"{self._message} (repeated)",
                    extra={"count": count, "seconds": self._interval},
                )
        finally:
            self._running = False

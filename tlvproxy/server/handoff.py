"""A request for a push session, served by the worker that holds the session
(docs/push-sessions.md "Workers").

With `workers: N` the kernel hands each new connection to any worker, but a
session lives in one. The worker that reads a request for another's session
passes it the connection: the client's socket (SCM_RIGHTS, over a Unix
socket each worker listens on in the supervisor's private runtime
directory), with the request it read written again as HTTP/1.1 and the bytes
past it. The owner says when it has taken the connection, and serves it from
there as if it had accepted it; a connection it does not take in time is
the sender's to answer (503), never both. A TLS connection cannot be passed
(its keys live in this process): the owner gets one end of a socket pair
instead, and this worker relays the plain bytes between it and the client
until either side closes.

Owns: the listening socket of one worker, passing a connection (bounded:
MAX_PENDING at once, HANDOFF_TIMEOUT each, the request and MAX_LEFTOVER
bytes past it), receiving one (the same bounds, exactly one descriptor,
which must be a stream socket), the relay of a TLS connection (its
descriptor counted by the worker's `Admission`), the descriptors all this
may hold at once (DESCRIPTORS, which the worker keeps in reserve), and the
answer when the owner cannot take it: `session_not_found` when it does not
run (its sessions went with it), `overloaded` when it does not answer in
time or a worker is out of descriptors.
Must not: serve HTTP on the connections it receives (the gateway does, as
connections it accepted), or parse requests.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import struct
import time
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from tlvproxy.errors import GatewayError, Overloaded, SessionNotFound
from tlvproxy.server.admission import closing_answer, refuse
from tlvproxy.server.rest import render_error

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    from tlvproxy.server.admission import Admission, Doorkeeper
    from tlvproxy.server.http_conn import Request, UpgradeHandler

# Bounds: handoffs one worker sends at once and receives at once; the time
# one may take; the bytes past the request that may go with it.
MAX_PENDING: Final = 64
HANDOFF_TIMEOUT: Final = 5.0
MAX_LEFTOVER: Final = 256 * 1024
# The descriptors a worker's handoffs hold at most at once, beyond the client
# connections they pass: a Unix socket for each handoff sent (and for a TLS
# connection one end of its socket pair), a Unix socket and the connection
# received for each handoff taken. A relay's own end is counted with its
# connection (`Admission.admit_relay`).
DESCRIPTORS: Final = 4 * MAX_PENDING
_MAX_PEER: Final = 64  # an IPv6 address in text is at most 45 characters
_MAGIC: Final = b"TLVH"
# magic, the peer address's length, the request bytes' length, and when the
# sender stops waiting (time.monotonic(), one clock for every process of the
# host); then the address and the bytes.
_HEAD: Final = struct.Struct("!4sHId")
# The owner's answer once it has the connection: from then on it is the
# owner's to serve, and the sender's only to close.
_TAKEN: Final = b"\x01"
# An owner takes a connection only this long before the sender stops
# waiting, so that the sender hears it in time: never are both serving it.
_TAKE_MARGIN: Final = 1.0
_DESCRIPTOR: Final = array.array("i", [0]).itemsize
_RELAY_SIZE: Final = 65536
# The longest path a Unix socket address holds (sun_path is 108 bytes on
# Linux, the last one a NUL).
_MAX_SOCKET_PATH: Final = 107
# Headers the request is written again without: its body is whole now, and a
# `100 Continue` was answered (or not) by the worker that read it.
_DROPPED: Final = frozenset({"content-length", "transfer-encoding", "expect"})

log = logging.getLogger("tlvproxy.sessions")


def socket_path(directory: Path, worker: int) -> Path:
    """Where worker `worker` takes the connections of its sessions."""
    return directory / "sessions" / f"worker-{worker}.sock"


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An address of the Unix socket `path` that `bind` and `connect` take:
    the path itself, or, when it is too long for one (a long TMPDIR),
    the same file reached through a descriptor of its directory."""
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def request_bytes(request: Request) -> bytes:
    """`request` as HTTP/1.1 bytes the owner's parser reads as the same request.

    Header names and values are the bytes received (latin-1 both ways); the
    body, read whole (chunked or not), goes with its Content-Length.

    The head is never longer than the one received, so that the owner, with
    the same `max_header_bytes`, takes what this worker took: no space after
    the colons, which the parsers strip (the request line is the one
    received), and a Content-Length only for a body, whose framing header
    (Content-Length or `Transfer-Encoding: chunked`, dropped) was at least as long.
    """
    lines = [f"{request.method} {request.target} HTTP/{request.http_version}"]
    lines.extend(f"{name}:{value}" for name, value in request.headers if name not in _DROPPED)
    if request.body:
        lines.append(f"content-length:{len(request.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


class Handoff:
    """One worker's end of the handoffs: it passes connections to the other
    workers (`handler`) and takes theirs (`serve`)."""

    def __init__(self, directory: Path, worker: int, admission: Admission) -> None:
        """`admission`: the worker's, which counts the descriptor of each relay."""
        self._directory = directory
        self.worker = worker
        self._admission = admission
        self._sending = 0
        self._receiving = 0
        self._accepting: trio.CancelScope | None = None

    # ------------------------------------------------------------ passing

    def handler(self, owner: int, request_id: str) -> UpgradeHandler:
        """What takes over a connection whose request is for a session of
        worker `owner` (`Answer.take_over`): it passes the connection on."""
        return partial(self._pass, owner, request_id)

    async def _pass(
        self,
        owner: int,
        request_id: str,
        request: Request,
        stream: trio.abc.Stream,
        leftover: bytes,
    ) -> None:
        relayed = not isinstance(stream, trio.SocketStream)
        if len(leftover) > MAX_LEFTOVER or self._sending >= MAX_PENDING:
            error: GatewayError | None = Overloaded(
                "too many requests are on their way between workers; try again"
            )
        elif relayed and (refusal := self._admission.admit_relay()) is not None:
            error = Overloaded(refusal.message)
        else:
            try:
                self._sending += 1
                try:
                    error, relay = await self._hand(owner, request, stream, leftover)
                finally:
                    self._sending -= 1
                if error is None:
                    log.debug(
                        "push session request passed to its worker",
                        extra={"request_id": request_id, "worker": owner},
                    )
                    if relay is not None:
                        await _relay(stream, relay)
                    return
            finally:
                if relayed:
                    self._admission.release_relay()
        assert error is not None  # one that was passed returned above
        log.info(
            "push session request not passed to its worker",
            extra={"request_id": request_id, "worker": owner, "error": error.message},
        )
        response = render_error(error, request_id, envelope=False)
        await refuse(stream, closing_answer(response))

    async def _hand(
        self, owner: int, request: Request, stream: trio.abc.Stream, leftover: bytes
    ) -> tuple[GatewayError | None, socket.socket | None]:
        """Pass `stream` (its socket, or one end of a socket pair to relay it
        through) to worker `owner`: None once taken, with this worker's end of
        the relay when there is one; else the error to answer with."""
        data = request_bytes(request) + leftover
        if isinstance(stream, trio.SocketStream):
            return await self._send(owner, request.remote_addr, stream.socket.fileno(), data), None
        try:
            relay, theirs = socket.socketpair()
        except OSError:
            return _no_descriptor(), None
        with theirs:
            error = await self._send(owner, request.remote_addr, theirs.fileno(), data)
        if error is not None:
            relay.close()
            return error, None
        return None, relay

    async def _send(
        self, owner: int, peer: str, descriptor: int, data: bytes
    ) -> GatewayError | None:
        """Pass `descriptor` and `data` to worker `owner`; None once the owner
        has taken it, else the error to answer with."""
        peer_bytes = peer.encode()[:_MAX_PEER]
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        head = _HEAD.pack(_MAGIC, len(peer_bytes), len(data), deadline) + peer_bytes
        try:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return _no_descriptor()
        with sock, trio.move_on_after(HANDOFF_TIMEOUT):
            try:
                with _address(socket_path(self._directory, owner)) as address:
                    await sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError):
                # No such worker, or it is not running: its sessions are gone.
                return SessionNotFound("no such push session: its worker is not running")
            except OSError as exc:
                log.warning("cannot reach a worker", extra={"worker": owner, "error": str(exc)})
                return Overloaded("the session's worker cannot be reached; try again")
            try:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [descriptor]))]
                sent = await sock.sendmsg([head], rights)
                view = memoryview(head[sent:] + data)
                while view:
                    view = view[await sock.send(view) :]
                taken = await sock.recv(1)
            except OSError:
                taken = b""
            if taken == _TAKEN:
                return None
            # The owner dropped it (too many handoffs at once, or too late).
            return Overloaded("the session's worker did not take the request; try again")
        # The owner did not take it in time: it takes none after that.
        return Overloaded("the session's worker did not answer in time; try again")

    # ------------------------------------------------------------ receiving

    async def serve(
        self,
        nursery: trio.Nursery,
        door: Doorkeeper,
        accept: Callable[[trio.SocketStream, str, bytes], Awaitable[None]],
        max_bytes: Callable[[], int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Take the connections other workers pass, until `close()`; each one
        received whole goes to `accept(stream, peer, received)` in `nursery`.
        `door` accepts them as it does clients (out of descriptors, it
        pauses and tries again). `max_bytes()`: the most request bytes one
        may carry."""
        path = socket_path(self._directory, self.worker)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        # A restarted worker takes over the path of the one it replaces.
        path.unlink(missing_ok=True)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            with _address(path) as address:
                await listener.bind(address)
            listener.listen(MAX_PENDING)
            with trio.CancelScope() as self._accepting:
                task_status.started()
                while (accepted := await door.accept_socket(listener)) is not None:
                    conn, _ = accepted
                    if self._receiving >= MAX_PENDING:
                        conn.close()  # the sender answers `overloaded`
                        continue
                    self._receiving += 1
                    nursery.start_soon(self._receive, conn, accept, max_bytes())
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop taking connections (the drain); those received are served."""
        if self._accepting is not None:
            self._accepting.cancel()

    async def _receive(
        self,
        conn: trio.socket.SocketType,
        accept: Callable[[trio.SocketStream, str, bytes], Awaitable[None]],
        max_bytes: int,
    ) -> None:
        received: tuple[socket.socket, str, bytes, float] | None = None
        taken = False
        try:
            with conn, trio.move_on_after(HANDOFF_TIMEOUT):
                received = await _read_handoff(conn, max_bytes)
                if received is not None and time.monotonic() < received[3] - _TAKE_MARGIN:
                    with contextlib.suppress(OSError):
                        taken = await conn.send(_TAKEN) == 1
        finally:
            self._receiving -= 1
            if received is not None and not taken:
                received[0].close()  # the sender answers this client
        if received is None or not taken:
            return
        client, peer, data, _ = received
        await accept(trio.SocketStream(trio.socket.from_stdlib_socket(client)), peer, data)


async def _read_handoff(
    conn: trio.socket.SocketType, max_bytes: int
) -> tuple[socket.socket, str, bytes, float] | None:
    """One handoff: the client's socket, its address, the request bytes and
    the sender's deadline; None (logged) for anything else, whose descriptors
    are closed (also when cancelled)."""
    descriptors: list[int] = []
    client: socket.socket | None = None
    try:
        data, ancillary, flags, _ = await conn.recvmsg(_HEAD.size, socket.CMSG_SPACE(_DESCRIPTOR))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _DESCRIPTOR
                descriptors.extend(array.array("i", payload[:usable]))
        # Out of descriptors, the kernel drops the one sent and says so (MSG_CTRUNC).
        if len(descriptors) != 1 or flags & socket.MSG_CTRUNC:
            raise ValueError(f"{len(descriptors)} descriptors")
        client = socket.socket(fileno=descriptors[0])
        descriptors.clear()  # the socket object owns it now
        if client.type != socket.SOCK_STREAM:
            raise ValueError("not a stream socket")
        data += await _read_exactly(conn, _HEAD.size - len(data))
        magic, peer_length, length, deadline = _HEAD.unpack(data)
        if magic != _MAGIC or peer_length > _MAX_PEER or length > max_bytes:
            raise ValueError(f"a head of {peer_length}, {length} bytes")
        peer = (await _read_exactly(conn, peer_length)).decode("ascii")
        request = await _read_exactly(conn, length)
    except (ValueError, OSError, EOFError) as exc:
        log.warning("a malformed handoff was dropped", extra={"error": str(exc)})
        _close(descriptors, client)
        return None
    except BaseException:
        _close(descriptors, client)
        raise
    return client, peer, request, deadline


def _no_descriptor() -> Overloaded:
    # socket() or socketpair() failed: the process (or the system) is out of
    # descriptors or memory (docs/operations.md "Connections and file descriptors").
    return Overloaded("the gateway has no file descriptor to spare for the request; try again")


def _close(descriptors: list[int], client: socket.socket | None) -> None:
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            socket.close(descriptor)
    if client is not None:
        client.close()


async def _read_exactly(conn: trio.socket.SocketType, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        chunk = await conn.recv(min(size - len(parts), _RELAY_SIZE))
        if not chunk:
            raise EOFError("the handoff ended early")
        parts += chunk
    return bytes(parts)


async def _relay(client: trio.abc.Stream, relay: socket.socket) -> None:
    """Copy bytes both ways between `client` (TLS) and the owner's end of the
    pair until the owner closes, or the client does and the owner answers."""
    owner = trio.SocketStream(trio.socket.from_stdlib_socket(relay))
    async with owner, trio.open_nursery() as nursery:

        async def to_owner() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await client.receive_some(_RELAY_SIZE):
                    await owner.send_all(data)
                await owner.send_eof()
                return
            nursery.cancel_scope.cancel()

        async def to_client() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await owner.receive_some(_RELAY_SIZE):
                    await client.send_all(data)
            nursery.cancel_scope.cancel()

        nursery.start_soon(to_owner)
        nursery.start_soon(to_client)

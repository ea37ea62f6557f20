"""The demo IM service: a TLV server for trying the gateway out (`tlvproxy mock-upstream`).

Owns: the demo service's behaviour, its in-memory messages, and which connection
gets which push. Must not: be imported by the gateway; it uses tlvproxy/framing and the
table's codecs like any other TLV peer would.

It speaks the table's framing layout and reads request bodies with the table's
codecs (`decode_request` / `encode_response`), so it follows the table's message
names and JSON options. It plays one upstream of the table (`upstream`: by
default the WebSocket's, else the first): a frame's command word is read among
that upstream's commands, since words are unique per upstream only. Commands,
by their name in the table, or, for a name it does not know, by their request
message (a `get_profile_next` taking `demo.im.GetProfileRequest` answers as
`get_profile`):

- `heartbeat` (always also 0x0001): empty answer, status 0.
- `echo`: answers the body unchanged.
- `send_message` (`demo.im.SendMessageRequest`): stores the message with
  `from_uid` = the frame's uid, answers `{msg_id, sent_at}` and pushes
  `new_message` (flags = push) to every connection whose session uid is the
  recipient. A connection's session uid is the uid of the latest frame with a
  non-zero uid it sent (a WebSocket session's uid).
- `get_profile`: a made-up profile; status 2 (not found) for user 0 or
  any user id from 1,000,000 on.
- `list_messages`: the user's latest messages (sent or received), `limit` or 20.
- `login` (`demo.im.LoginRequest`): a DEMO login, no password. Answers a token
  for `user_id` (`{token, expires_at}`: an ES256 JWT, sub = the user id, valid
  for an hour) signed with the key of `--token-key` (`tlvproxy.demo_keys`).
  Without a key: status 4 (unavailable), its `error` saying so; user 0 or any
  id from 1,000,000 on: status 2.
- Any other command, or a body that does not decode: status 1, empty body.

`variant="next"` plays the next version of the service, for trying a migration
(docs/migrating.md): `get_profile` answers the nickname `User N` and the tags
`["demo", "next"]`; everything else is the same.

Switches for trying failures:
- an `echo` body that is a JSON object with `"_status": N` is answered with status
  N (body unchanged); `"_delay_ms": N` answers N milliseconds late;
- a `send_message` text of `/status N` answers status N without storing anything;
  a text starting with `/delay MS ` is sent MS milliseconds late.
Status codes follow the demo table's `status_map`: 1 bad request, 2 not found,
3 conflict, 4 unavailable.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from tlvproxy.errors import BadRequest
from tlvproxy.framing import (
    FLAG_PUSH,
    FLAG_RESPONSE,
    NEED_DATA,
    ConnectionClosed,
    Frame,
    FrameDecoder,
    FramingError,
    encode_frame,
)

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.demo_keys import TokenIssuer

log = logging.getLogger("tlvproxy.mock_upstream")

DEMO_TABLE: Final = Path(__file__).resolve().parent.parent / "commands.yaml"
HEARTBEAT: Final = 0x0001
NEW_MESSAGE: Final = 0x2001
STATUS_BAD_REQUEST: Final = 1
STATUS_NOT_FOUND: Final = 2
STATUS_UNAVAILABLE: Final = 4
NO_SIGNING_KEY: Final = (
    "the demo upstream has no signing key: start it with --token-key "
    "build/demo-keys/demo-signing-key.pem (`make run` does)"
)
UNKNOWN_USERS_FROM: Final = 1_000_000
# What a command whose name the demo does not know does, by its request message.
_BY_REQUEST: Final = {
    "demo.im.SendMessageRequest": "send_message",
    "demo.im.GetProfileRequest": "get_profile",
    "demo.im.ListMessagesRequest": "list_messages",
    "demo.im.LoginRequest": "login",
}
_KNOWN: Final = frozenset({"echo", *_BY_REQUEST.values()})
DEFAULT_LIST_LIMIT: Final = 20
# What the demo keeps and waits for at most: the messages it remembers (the
# oldest are forgotten), and the delay a failure switch may ask (seconds).
MAX_MESSAGES: Final = 10_000
MAX_DELAY: Final = 60.0
_CREATED_AT: Final = 1_700_000_000_000  # every demo user joined at this unix millisecond
# With --register, how long the service answers after its registration is
# revoked, while gateways still have requests on their way to it.
DRAIN_AFTER_REVOKE: Final = 5.0


class _Client:
    """One accepted connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.uid = 0
        self._send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)


def _field(value: Any, name: str) -> Any:
    """A request field by its proto name or its lowerCamelCase JSON name."""
    if not isinstance(value, dict):
        return None
    if name in value:
        return value[name]
    head, *rest = name.split("_")
    return value.get(head + "".join(part.title() for part in rest))


def _number(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def default_upstream(table: CompiledTable) -> str:
    """The upstream the service plays unless told: the WebSocket's, else the
    table's first ("" when it has none)."""
    if table.websocket is not None:
        return table.websocket.upstream
    return next(iter(table.upstreams), "")


class MockService:
    """The demo IM service over `table` (its framing and codecs), playing its
    `upstream` (default: `default_upstream`), in `variant` "current" or
    "next"; `issuer` signs the tokens of `login` (None: login answers status 4)."""

    def __init__(
        self,
        table: CompiledTable,
        issuer: TokenIssuer | None = None,
        *,
        upstream: str | None = None,
        variant: str = "current",
    ) -> None:
        self.table = table
        self.issuer = issuer
        self.upstream = default_upstream(table) if upstream is None else upstream
        self.variant = variant
        self.layout = table.framing
        self.messages: deque[dict[str, Any]] = deque(maxlen=MAX_MESSAGES)
        self._sent = 0  # messages ever sent: the next msg_id
        self._clients: set[_Client] = set()
        self._idle = trio.Event()  # set when the last connection closes
        self._unpushed: list[dict[str, Any]] = []  # stored, pushed after the answer
        push = table.find_command("new_message")
        self._push_command = push.command if push is not None else NEW_MESSAGE

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until it closes or sends a malformed frame."""
        client = _Client(stream)
        self._clients.add(client)
        try:
            async with trio.open_nursery() as nursery:
                await self._read(client, nursery)
        finally:
            self._clients.discard(client)
            if not self._clients:
                self._idle.set()
            await trio.aclose_forcefully(stream)

    async def wait_idle(self) -> None:
        """Wait until no connection is open."""
        if self._clients:
            self._idle = trio.Event()
            await self._idle.wait()

    async def _read(self, client: _Client, nursery: trio.Nursery) -> None:
        # Each request is answered in its own task, so a delayed one holds up nothing.
        decoder = FrameDecoder(self.layout)
        try:
            while True:
                try:
                    data = await client.stream.receive_some()
                except trio.BrokenResourceError:
                    data = b""
                decoder.receive_data(data)
                while (event := decoder.next_event()) is not NEED_DATA:
                    if isinstance(event, ConnectionClosed):
                        return
                    if event.uid:
                        client.uid = event.uid
                    nursery.start_soon(self._answer, client, event)
        except FramingError as exc:
            log.warning("malformed frame, closing the connection", extra={"error": str(exc)})
            await trio.aclose_forcefully(client.stream)

    async def _answer(self, client: _Client, frame: Frame) -> None:
        status, body, delay = self._dispatch(frame)
        if delay > 0:
            await trio.sleep(min(delay, MAX_DELAY))
        reply = Frame(
            command=frame.command,
            seq=frame.seq,
            uid=frame.uid,
            flags=FLAG_RESPONSE,
            status=status,
            body=body,
        )
        try:
            wire = encode_frame(self.layout, reply)
        except ValueError as exc:
            # A failure switch asked for a status the header cannot hold.
            log.info("status out of range", extra={"status": status, "error": str(exc)})
            wire = encode_frame(
                self.layout, attrs.evolve(reply, status=STATUS_BAD_REQUEST, body=b"")
            )
        try:
            await client.send(wire)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nobody to answer
        pushed = self._unpushed
        self._unpushed = []
        for message in pushed:
            await self.push_message(message)

    def _dispatch(self, frame: Frame) -> tuple[int, bytes, float]:
        """(status, body, delay in seconds) for a request frame."""
        if frame.command == HEARTBEAT:
            return 0, b"", 0.0
        spec = self.table.command_at(self.upstream, frame.command)
        if spec is None or spec.push is not None:
            return STATUS_BAD_REQUEST, b"", 0.0
        codec = self.table.codecs[spec.name]
        try:
            value = codec.decode_request(frame.body)
        except BadRequest as exc:
            log.info("undecodable request", extra={"command": spec.name, "error": exc.message})
            return STATUS_BAD_REQUEST, b"", 0.0
        behaviour = spec.name if spec.name in _KNOWN else _BY_REQUEST.get(spec.request or "")
        if behaviour == "echo":
            return self._echo(frame.body, value)
        if behaviour == "send_message":
            status, answer, delay = self._send_message(frame.uid, value)
        elif behaviour == "get_profile":
            status, answer, delay = self._profile(value)
        elif behaviour == "list_messages":
            status, answer, delay = self._list_messages(value)
        elif behaviour == "login":
            status, answer, delay = self._login(value)
        else:
            return STATUS_BAD_REQUEST, b"", 0.0
        try:
            return status, (codec.encode_response(answer) if answer is not None else b""), delay
        except BadRequest as exc:
            log.warning("answer does not fit the response message", extra={"error": exc.message})
            return STATUS_BAD_REQUEST, b"", 0.0

    @staticmethod
    def _echo(body: bytes, value: Any) -> tuple[int, bytes, float]:
        if isinstance(value, dict):
            return _number(value.get("_status")), body, _number(value.get("_delay_ms")) / 1000
        return 0, body, 0.0

    def _send_message(self, uid: int, value: Any) -> tuple[int, Any, float]:
        text = str(_field(value, "text") or "")
        delay = 0.0
        if text.startswith("/status "):
            return _number(text.removeprefix("/status ").strip() or STATUS_BAD_REQUEST), None, 0.0
        if text.startswith("/delay "):
            ms, _, text = text.removeprefix("/delay ").partition(" ")
            delay = _number(ms) / 1000
        to_uid = _number(_field(value, "to_uid"))
        if to_uid == 0:
            return STATUS_BAD_REQUEST, None, 0.0
        self._sent += 1
        message = {
            "msg_id": self._sent,
            "from_uid": uid,
            "to_uid": to_uid,
            "text": text,
            "sent_at": int(time.time() * 1000),
        }
        self.messages.append(message)
        self._unpushed.append(message)
        return 0, {"msg_id": message["msg_id"], "sent_at": message["sent_at"]}, delay

    async def push_message(self, message: dict[str, Any]) -> None:
        """Push `new_message` to every connection of the recipient."""
        spec = self.table.find_command(self._push_command)
        if spec is None:
            return
        body = self.table.codecs[spec.name].encode_response(message)
        push = Frame(
            command=self._push_command,
            seq=0,
            uid=message["to_uid"],
            flags=FLAG_PUSH,
            body=body,
        )
        wire = encode_frame(self.layout, push)
        for client in [c for c in self._clients if c.uid == message["to_uid"]]:
            try:
                await client.send(wire)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # that session is gone; the others still get it

    def _profile(self, value: Any) -> tuple[int, Any, float]:
        user_id = _number(_field(value, "user_id"))
        if user_id == 0 or user_id >= UNKNOWN_USERS_FROM:
            return STATUS_NOT_FOUND, None, 0.0
        online = any(c.uid == user_id for c in self._clients)
        following = self.variant == "next"
        profile = {
            "user_id": user_id,
            "nickname": f"User {user_id}" if following else f"user{user_id}",
            "gender": "GENDER_FEMALE" if user_id % 2 else "GENDER_MALE",
            "status": "STATUS_ONLINE" if online else "STATUS_OFFLINE",
            "created_at": _CREATED_AT,
            "tags": ["demo", "next"] if following else ["demo"],
        }
        return 0, profile, 0.0

    def _list_messages(self, value: Any) -> tuple[int, Any, float]:
        user_id = _number(_field(value, "user_id"))
        limit = _number(_field(value, "limit")) or DEFAULT_LIST_LIMIT
        mine = [m for m in self.messages if user_id in (m["from_uid"], m["to_uid"])]
        return 0, {"messages": mine[-limit:]}, 0.0

    def _login(self, value: Any) -> tuple[int, Any, float]:
        # A DEMO login: whoever asks gets a token for the user id they name.
        if self.issuer is None:
            log.warning("login without a signing key", extra={"error": NO_SIGNING_KEY})
            return STATUS_UNAVAILABLE, {"error": NO_SIGNING_KEY}, 0.0
        user_id = _number(_field(value, "user_id"))
        if user_id == 0 or user_id >= UNKNOWN_USERS_FROM:
            return STATUS_NOT_FOUND, None, 0.0
        token, expires_at = self.issuer.issue(user_id, time.time())
        return 0, {"token": token, "expires_at": expires_at}, 0.0


async def serve_mock_upstream(
    host: str,
    port: int,
    table: CompiledTable | None = None,
    *,
    issuer: TokenIssuer | None = None,
    upstream: str | None = None,
    variant: str = "current",
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo service on HOST:PORT (port 0: any free port) until cancelled.

    `table` defaults to the bundled demo table; `issuer` signs `login`'s tokens;
    `upstream` and `variant` are `MockService`'s. Logs the address it listens
    on and reports it ("host:port") through `task_status`. Raises OSError if it
    cannot bind.
    """
    if table is None:
        from tlvproxy.config.loader import load_table

        table = await trio.to_thread.run_sync(load_table, DEMO_TABLE)
    if issuer is None and table.find_command("login") is not None:
        log.warning("no --token-key: login answers status 4", extra={"error": NO_SIGNING_KEY})
    service = MockService(table, issuer, upstream=upstream, variant=variant)
    await _listen(service, host, port, task_status=task_status)


async def _listen(
    service: MockService,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    log.info("mock upstream listening on %s", address, extra={"address": address})
    task_status.started(address)
    await trio.serve_listeners(service.handle, listeners)


async def serve_registered(
    service: MockService, host: str, port: int, endpoint: str, prefix: str
) -> None:
    """Serve like `serve_mock_upstream`, registered in the etcd at `endpoint`
    under `prefix` (docs/operations.md "Discovery") until SIGTERM or SIGINT.

    Then the registration is revoked first, so gateways send nothing new, and
    the service still answers until its connections close (at most
    DRAIN_AFTER_REVOKE seconds): requests in flight are not failed."""
    from tlvproxy.etcd.registration import keep_registered

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(_listen, service, host, port)
            registration = trio.CancelScope()
            revoked = trio.Event()

            async def registered(*, task_status: trio.TaskStatus[None]) -> None:
                try:
                    with registration:
                        await keep_registered(endpoint, prefix, address, task_status=task_status)
                finally:
                    revoked.set()

            await nursery.start(registered)
            async for signum in signals:
                log.info("stopping", extra={"signal": signal.Signals(signum).name})
                break
            registration.cancel()
            await revoked.wait()
            with trio.move_on_after(DRAIN_AFTER_REVOKE):
                await service.wait_idle()
            nursery.cancel_scope.cancel()


def run_mock_upstream(
    listen: str,
    table_path: Path,
    token_key: Path | None = None,
    register: tuple[str, str] | None = None,
    *,
    upstream: str | None = None,
    variant: str = "current",
) -> int:
    """The whole `tlvproxy mock-upstream`: JSON logs on stdout; returns the exit status.

    `register` is (etcd endpoint, prefix) for `--register URL --prefix P`;
    `upstream` and `variant` are `MockService`'s (`--upstream`, `--variant`)."""
    from tlvproxy.config.loader import TableError, load_table
    from tlvproxy.demo_keys import TokenIssuer
    from tlvproxy.etcd.client import EtcdUnavailable
    from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer
    from tlvproxy.logs import setup_logging
    from tlvproxy.upstream.call import parse_address

    setup_logging("info")
    try:
        address = parse_address(listen)
    except ValueError as exc:
        print(f"tlvproxy mock-upstream: --listen: {exc}", file=sys.stderr)
        return 2
    issuer = None
    if token_key is not None:
        try:
            issuer = TokenIssuer.from_file(token_key)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            print(f"tlvproxy mock-upstream: --token-key {token_key}: {reason}", file=sys.stderr)
            return 2
    try:
        table = load_table(table_path)
    except TableError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if upstream is not None and upstream not in table.upstreams:
        known = ", ".join(table.upstreams) or "none"
        print(
            f"tlvproxy mock-upstream: --upstream: the table has no upstream {upstream!r} "
            f"(its upstreams: {known})",
            file=sys.stderr,
        )
        return 2
    # The errors come out of nurseries (strict exception groups): except*
    # finds them inside, and the message, not a traceback, is what is shown.
    status = 0
    try:
        if register is None:
            trio.run(
                partial(
                    serve_mock_upstream,
                    address.host,
                    address.port,
                    table,
                    issuer=issuer,
                    upstream=upstream,
                    variant=variant,
                )
            )
        else:
            service = MockService(table, issuer, upstream=upstream, variant=variant)
            trio.run(serve_registered, service, address.host, address.port, *register)
    except* (EtcdUnavailable, EtcdRefused, MalformedAnswer, trio.TooSlowError) as group:
        failure = _first(group)
        why = "etcd did not answer in time" if isinstance(failure, trio.TooSlowError) else failure
        print(f"tlvproxy mock-upstream: cannot register in etcd: {why}", file=sys.stderr)
        status = 1
    except* OSError as group:
        print(
            f"tlvproxy mock-upstream: cannot listen on {listen}: {_first(group)}", file=sys.stderr
        )
        status = 1
    except* KeyboardInterrupt:
        pass
    return status


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of `group`, however deeply nurseries nested it."""
    found = group.exceptions[0]
    return _first(found) if isinstance(found, BaseExceptionGroup) else found

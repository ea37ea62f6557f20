"""A byte relay between TCP and unix sockets, in threads, that can be cut and
restored: how the fleet tests reach a gateway in a network namespace of its
own, and take one gateway's etcd away while the others keep theirs."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

# ("tcp", port) on 127.0.0.1, or ("unix", path).
Place = tuple[str, int] | tuple[str, str]


def parse_place(text: str) -> Place:
    """ "1234" is a TCP port on 127.0.0.1; anything else a unix socket path."""
    return ("tcp", int(text)) if text.isdigit() else ("unix", text)


def _listen(place: Place) -> socket.socket:
    if place[0] == "tcp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", place[1]))
    else:
        path = str(place[1])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    sock.listen(128)
    return sock


def _connect(place: Place) -> socket.socket:
    if place[0] == "tcp":
        return socket.create_connection(("127.0.0.1", place[1]), timeout=5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(place[1]))
    return sock


class Relay:
    """Accepts at `listen` and pipes each connection to `target`."""

    def __init__(self, listen: Place, target: Place) -> None:
        self.listen = listen
        self.target = target
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def start(self) -> Relay:
        self._listener = _listen(self.listen)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Stop accepting and drop every connection: the far side sees resets."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        if self._listener is None:
            self.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = _connect(self.target)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for sock in (source, sink):
                if sock in self._open:
                    self._open.discard(sock)
                    sock.close()

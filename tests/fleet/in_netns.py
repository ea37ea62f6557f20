"""Run a command in the network namespace `unshare -n` gave this process, with
relays through unix sockets to and from the host's loopback (tests/fleet).

    unshare -n python -m tests.fleet.in_netns --into PORT=SOCK... --out SOCK=PORT... -- CMD...

`--into PORT=SOCK`: 127.0.0.1:PORT here reaches whatever the host relays SOCK
to. `--out SOCK=PORT`: the host reaches 127.0.0.1:PORT here through SOCK.
SIGTERM, SIGINT and SIGHUP are passed to CMD; the exit code is CMD's.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from tests.fleet.relay import Relay, parse_place


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--into", action="append", default=[])
    parser.add_argument("--out", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for item in args.into:
        port, sock = item.split("=", 1)
        Relay(parse_place(port), parse_place(sock)).start()
    for item in args.out:
        sock, port = item.split("=", 1)
        Relay(parse_place(sock), parse_place(port)).start()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, _: child.send_signal(number))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())

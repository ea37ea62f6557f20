"""What TLS costs (issue 21): the json route over https against plain http,
handshakes/s, and gateway memory per idle wss session against an idle ws one.

Test certificates come from trustme, made in a temp dir at start: a CA and one
leaf for 127.0.0.1 and localhost (`--key-type`: trustme's default ECDSA P-256,
or RSA 2048). The C echo upstream (../shared/bench/upstream, through
bench_upstream's helpers) answers every request. Load generator, gateway and
upstream share the machine, as in the other REST benches.

- keep-alive: one `tlvproxy serve` process (1 worker) with `listen.http` and
  `listen.https` in one table, the shared harness's json route (POST /v1/echo,
  json codec, benchmarks/shared_target.py) and its 200-byte body, driven by
  wrk -t1 -c64 (bench_workers.wrk, ../shared/bench/wrk/bench.lua) over each
  listener; req/s, p50/p99 and the gateway's CPU per request.
- new connection per request, same process: wrk -t1 -c64 sending
  `Connection: close` over http (TCP connect + request) and over https. wrk
  keeps its TLS session across reconnections, so its https connections are
  resumed handshakes (TLS 1.3 PSK, no certificate signature): a 1 s probe
  against a server with the table's own TLS context counts how many, and the
  row's label says so. Full handshakes come from `--handshake-clients`
  parallel `openssl s_time -new` clients (each one connection at a time,
  never resuming) that close once the handshake is done, without a request
  (so the row is the handshake alone). The row's errors are
  the gateway's tlvproxy_tls_handshake_failures_total over the run.
- idle sessions: a fresh gateway process per run (the table adds a json-mode
  `websocket`, each session with its dedicated upstream connection); its VmRSS
  before and after opening `--idle` sessions (bench_websocket's method),
  divided, over ws and over wss.

Every figure is the median of `--rounds` runs; the variants alternate within a
round, so a neighbour's load on the shared box hits them alike.

Run: .venv/bin/python benchmarks/bench_tls.py [--duration 5] [--rounds 3]
         [--idle 1000] [--key-type ecdsa|rsa] [--handshake-clients 8]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import trustme
from bench_upstream import build_echo, start_echo
from bench_websocket import Client, raise_fd_limit, rss_kib
from bench_workers import (
    CONNECTIONS,
    WRK,
    check_echo,
    free_port,
    tree_cpu_seconds,
    wrk,
)
from bench_workers import serving as serve_table
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from shared_target import table_text

from tlvproxy.config.loader import load_table

if TYPE_CHECKING:
    from collections.abc import Iterator

ECHO_PATH = "/v1/echo"
# The idle-session table: a json-mode endpoint, and limits that admit every
# session from 127.0.0.1 (as bench_websocket's table does).
WEBSOCKET = (
    "websocket: {path: /ws, upstream: echo, mode: json, idle_timeout: 600s}\n"
    "limits: {max_connections: 100000, max_connections_per_ip: 100000}\n"
)
WARM_SESSIONS = 50
OPENING = 200  # sessions being opened at once
PROBE_SECONDS = 1
PROBE_CONNECTIONS = 4


class Listeners:
    """A table on disk and the ports it listens on."""

    def __init__(self, path: Path, http: int, https: int, admin: int) -> None:
        self.path, self.http, self.https, self.admin = path, http, https, admin


# ---------------------------------------------------------------- setup


def make_certificate(directory: Path, key_type: str) -> tuple[trustme.CA, Path, Path, str]:
    """A trustme CA and a leaf for 127.0.0.1/localhost written to `directory`;
    returns (ca, cert path, key path, what the leaf's key is)."""
    ca = trustme.CA(key_type=trustme.KeyType[key_type.upper()])
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "leaf.pem", directory / "leaf.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.touch(mode=0o600)
    leaf.private_key_pem.write_to_path(str(key))
    private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        kind = f"ECDSA {private.curve.name}"
    elif isinstance(private, rsa.RSAPrivateKey):
        kind = f"RSA {private.key_size}"
    else:
        kind = type(private).__name__
    return ca, cert, key, kind


def write_table(
    directory: Path, name: str, upstream_port: int, cert: Path, key: Path, websocket: bool
) -> Listeners:
    """The shared harness's json route on an http and an https listener, with
    an admin listener for /readyz and /metrics."""
    http, https, admin = free_port(), free_port(), free_port()
    text = table_text(http, f"127.0.0.1:{upstream_port}", "json").replace(
        "admin: null", f"admin: 127.0.0.1:{admin}\n  https: 127.0.0.1:{https}"
    )
    entry = {"cert": str(cert), "key": str(key)}
    text += f"tls:\n  certificates: [{json.dumps(entry)}]\n"
    if websocket:
        text += WEBSOCKET
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return Listeners(path, http, https, admin)


@contextlib.contextmanager
def serving(listeners: Listeners) -> Iterator[subprocess.Popen[bytes]]:
    """`tlvproxy serve` (1 worker) on the table until the block ends."""
    with serve_table(listeners.path, listeners.admin) as process:
        yield process


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def negotiated(port: int, context: ssl.SSLContext) -> str:
    """The protocol and cipher a default client gets from the https listener."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"


def check_routes(listeners: Listeners, context: ssl.SSLContext) -> None:
    """Both listeners echo the bench body."""
    body = (WRK / "body.json").read_bytes()
    check_echo(f"http://127.0.0.1:{listeners.http}{ECHO_PATH}", body)
    # check_echo opens URLs through urllib's default opener: make it trust the CA.
    urllib.request.install_opener(
        urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    )
    check_echo(f"https://localhost:{listeners.https}{ECHO_PATH}", body)


def handshake_failures(admin_port: int) -> dict[str, float]:
    """The gateway's tlvproxy_tls_handshake_failures_total by reason."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    pattern = r'^tlvproxy_tls_handshake_failures_total\{reason="([^"]*)"\} (\S+)$'
    return {reason: float(value) for reason, value in re.findall(pattern, text, re.MULTILINE)}


# ---------------------------------------------------------------- measurements


def run_wrk(url: str, duration: int, pid: int, script: Path | None = None) -> dict[str, float]:
    """One wrk run (bench_workers.wrk) against the gateway `pid`: wrk's figures
    plus rps, errors and the gateway's cpu_us per request."""
    cpu_before = tree_cpu_seconds(pid)
    result = wrk(url, duration, CONNECTIONS, script)
    cpu = tree_cpu_seconds(pid) - cpu_before
    errors = sum(result[k] for k in ("err_connect", "err_read", "err_write", "err_status"))
    result["errors"] = errors + result["err_timeout"]
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["cpu_us"] = cpu * 1e6 / max(result["requests"], 1)
    return result


def s_time(listeners: Listeners, duration: int, clients: int, pid: int) -> dict[str, float]:
    """Full TLS handshakes/s: `clients` parallel `openssl s_time -new`, each one
    new connection at a time (closed once the handshake is done) for `duration`
    seconds; errors are the handshakes the gateway counted as failed, and
    `failed:REASON` of them by reason."""
    command = ["openssl", "s_time", "-new", "-connect", f"127.0.0.1:{listeners.https}"]
    command += ["-time", str(duration)]
    time.sleep(0.5)  # connections the run before left half done are counted by now
    failures_before = handshake_failures(listeners.admin)
    cpu_before = tree_cpu_seconds(pid)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(clients)
    ]
    total = 0
    try:
        for process in processes:
            out = process.communicate(timeout=duration + 30)[0]
            found = re.search(r"^(\d+) connections in [\d.]+s", out, re.MULTILINE)
            if found is None:
                raise SystemExit(f"openssl s_time said no count:\n{out[-2000:]}")
            total += int(found.group(1))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_seconds(pid) - cpu_before
    failures = handshake_failures(listeners.admin)
    result = {"rps": total / elapsed, "cpu_us": cpu * 1e6 / max(total, 1), "errors": 0.0}
    for reason, count in failures.items():
        if count > failures_before.get(reason, 0.0):
            result[f"failed:{reason}"] = count - failures_before.get(reason, 0.0)
            result["errors"] += result[f"failed:{reason}"]
    return result


async def wrk_resumption(context: ssl.SSLContext, script: Path) -> tuple[int, int]:
    """(resumed, handshakes) of wrk's https connections when each carries one
    request (`script` sends `Connection: close`), to a server answering
    `{}` with `context`, the table's own server context."""
    counts = [0, 0]

    async def answer(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
            counts[0] += bool(tls.session_reused)
            counts[1] += 1
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = await tls.receive_some(65536)
                if not chunk:
                    return
                received += chunk
            await tls.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            await tls.aclose()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        url = f"https://127.0.0.1:{port}/"
        run = functools.partial(wrk, url, PROBE_SECONDS, PROBE_CONNECTIONS, script)
        await trio.to_thread.run_sync(functools.partial(run, BENCH_METHOD="GET"))
        nursery.cancel_scope.cancel()
    return counts[0], counts[1]


async def open_session(port: int, uid: int, context: ssl.SSLContext | None) -> Client:
    """A json-mode session (bench_websocket.Client.connect), over TLS when `context`."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if context is not None:
        stream = trio.SSLStream(stream, context, server_hostname="localhost", https_compatible=True)
        await stream.do_handshake()
    return await Client.connect(port, uid, stream)


async def idle_memory(port: int, pid: int, sessions: int, context: ssl.SSLContext | None) -> float:
    """KiB of the gateway's VmRSS per idle session, as bench_websocket.idle_memory
    measures it (after 50 sessions opened and closed), over TLS when `context`."""
    with trio.fail_after(300):
        warm = [await open_session(port, uid, context) for uid in range(1, WARM_SESSIONS + 1)]
        for client in warm:
            await trio.aclose_forcefully(client.stream)
        await trio.sleep(0.5)
        before = rss_kib(pid)
        clients: list[Client] = []
        limiter = trio.CapacityLimiter(OPENING)

        async def open_one(uid: int) -> None:
            async with limiter:
                clients.append(await open_session(port, uid, context))

        async with trio.open_nursery() as nursery:
            for uid in range(1, sessions + 1):
                nursery.start_soon(open_one, uid)
        await trio.sleep(1.0)
        after = rss_kib(pid)
        for client in clients:
            await trio.aclose_forcefully(client.stream)
    return (after - before) / sessions


# ---------------------------------------------------------------- report


def medians(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each figure's median over its runs (a key missing from a run counts 0)."""
    return {
        name: {
            key: statistics.median(run.get(key, 0.0) for run in results)
            for key in dict.fromkeys(key for run in results for key in run)
        }
        for name, results in runs.items()
        if results
    }


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5, help="seconds per wrk/s_time run")
    options.add_argument("--rounds", type=int, default=3)
    options.add_argument("--idle", type=int, default=1000, help="idle sessions per run")
    options.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa")
    options.add_argument("--handshake-clients", type=int, default=8)
    args = options.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    has_openssl = shutil.which("openssl") is not None
    raise_fd_limit()  # the gateways inherit it: --idle sessions each hold two descriptors
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        ca, cert, key, kind = make_certificate(directory, args.key_type)
        context = client_context(ca)
        close_script = directory / "close.lua"
        close_script.write_text(
            f'dofile("{WRK / "bench.lua"}")\nwrk.headers["Connection"] = "close"\n'
        )
        echo, port = start_echo(build_echo(directory))
        try:
            rest = write_table(directory, "rest", port, cert, key, websocket=False)
            sessions = write_table(directory, "sessions", port, cert, key, websocket=True)
            server_certificates = load_table(rest.path).certificates
            assert server_certificates is not None
            resumed, handshakes = trio.run(
                wrk_resumption, server_certificates.context, close_script
            )
            protocol, rest_runs, new_runs, rss = run_all(
                args, rest, sessions, context, close_script
            )
            print_rest(args, kind, rest_runs, protocol)
            print_handshakes(args, new_runs, resumed, handshakes, has_openssl)
            print_sessions(args, rss)
        finally:
            echo.terminate()
            echo.wait()


def run_all(
    args: argparse.Namespace,
    rest: Listeners,
    sessions: Listeners,
    context: ssl.SSLContext,
    close_script: Path,
) -> tuple[
    str,
    dict[str, list[dict[str, float]]],
    dict[str, list[dict[str, float]]],
    dict[str, list[float]],
]:
    """Every run, the variants alternating within each round: keep-alive and
    new-connection runs on one gateway process, then the idle sessions; the
    protocol and cipher negotiated first."""
    plain = f"http://127.0.0.1:{rest.http}{ECHO_PATH}"
    tls = f"https://127.0.0.1:{rest.https}{ECHO_PATH}"
    keep_alive: dict[str, list[dict[str, float]]] = {"http": [], "https": []}
    new: dict[str, list[dict[str, float]]] = {"http": [], "https wrk": [], "https full": []}
    with serving(rest) as gateway:
        check_routes(rest, context)
        protocol = negotiated(rest.https, context)
        for url in (plain, tls):  # warm-up: connections, pools, caches
            wrk(url, 1, CONNECTIONS)
            wrk(url, 1, CONNECTIONS, close_script)
        for _ in range(args.rounds):
            keep_alive["http"].append(run_wrk(plain, args.duration, gateway.pid))
            keep_alive["https"].append(run_wrk(tls, args.duration, gateway.pid))
            new["http"].append(run_wrk(plain, args.duration, gateway.pid, close_script))
            new["https wrk"].append(run_wrk(tls, args.duration, gateway.pid, close_script))
            if shutil.which("openssl") is not None:
                new["https full"].append(
                    s_time(rest, args.duration, args.handshake_clients, gateway.pid)
                )
    rss: dict[str, list[float]] = {"ws": [], "wss": []}
    for _ in range(args.rounds):
        for name, port, tls_context in (
            ("ws", sessions.http, None),
            ("wss", sessions.https, context),
        ):
            with serving(sessions) as gateway:
                rss[name].append(trio.run(idle_memory, port, gateway.pid, args.idle, tls_context))
    return protocol, keep_alive, new, rss


def print_rest(
    args: argparse.Namespace, kind: str, runs: dict[str, list[dict[str, float]]], tls: str
) -> None:
    print(
        f"POST {ECHO_PATH} (json codec, 200-byte body), 1 worker, C echo upstream, one gateway "
        f"process with listen.http and listen.https; medians of {args.rounds} alternating runs"
    )
    print(f"certificate: trustme {kind} leaf for 127.0.0.1/localhost; {tls}")
    print(f"keep-alive connections, wrk -t1 -c{CONNECTIONS} -d{args.duration}s")
    print(
        f"{'listener':<20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/req':>11} {'errors':>7}"
    )
    median = medians(runs)
    for name, result in median.items():
        print(
            f"{name:<20} {result['rps']:>10.0f} {result['p50_us'] / 1000:>8.2f} "
            f"{result['p99_us'] / 1000:>8.2f} {result['cpu_us']:>11.1f} "
            f"{result['errors']:>7.0f}"
        )
    plain, tls_result = median["http"], median["https"]
    print(
        f"https: {tls_result['rps'] / plain['rps']:.2f}x the req/s of http, "
        f"CPU per request {tls_result['cpu_us'] - plain['cpu_us']:+.1f} us"
    )


def print_handshakes(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, float]]],
    resumed: int,
    handshakes: int,
    has_openssl: bool,
) -> None:
    share = resumed / handshakes if handshakes else 0.0
    wrk_kind = "resumed" if share >= 0.5 else "full"
    labels = {
        "http": "http (TCP + request)",
        "https wrk": f"https, {wrk_kind} handshake",
        "https full": "https, full, no request",
    }
    print(f"\na new connection per request; medians of {args.rounds} runs of {args.duration}s")
    print(f"{'connections':<28} {'conn/s':>10} {'CPU us/conn':>12} {'errors':>7}")
    median = medians(runs)
    for name, result in median.items():
        print(
            f"{labels[name]:<28} {result['rps']:>10.0f} {result['cpu_us']:>12.1f} "
            f"{result['errors']:>7.0f}"
        )
    print(
        f"- http and https {wrk_kind}: wrk -t1 -c{CONNECTIONS}, POST {ECHO_PATH} with "
        "`Connection: close`"
    )
    print(
        f"  wrk {'resumes' if wrk_kind == 'resumed' else 'does not resume'} its TLS session "
        f"on reconnecting: {resumed} of {handshakes} handshakes resumed in a "
        f"{PROBE_SECONDS} s probe against the table's TLS context"
    )
    if has_openssl:
        print(
            f"- https full: {args.handshake_clients} parallel `openssl s_time -new`, one "
            "connection at a time each, never resumed, closed after the handshake"
        )
        if "https full" in median:
            reasons = ", ".join(
                f"{key.removeprefix('failed:')} {value:.0f}"
                for key, value in median["https full"].items()
                if key.startswith("failed:")
            )
            print(
                "  errors: the gateway's tlvproxy_tls_handshake_failures_total"
                f" ({reasons or 'none'}); `closed`: the client left before the gateway's"
                " side of the handshake was done (s_time leaves as soon as its side is)"
            )
    else:
        print("- https full: not measured, openssl is not installed")
    extra = median["https wrk"]["cpu_us"] - median["http"]["cpu_us"]
    print(f"https, {wrk_kind}: CPU per connection {extra:+.1f} us over http")


def print_sessions(args: argparse.Namespace, rss: dict[str, list[float]]) -> None:
    print(
        f"\ngateway RSS per idle json-mode session, {args.idle} sessions (each with its "
        f"upstream connection), a fresh gateway per run; medians of {args.rounds}"
    )
    print(f"{'session':<8} {'KiB/session':>12} {'MiB in all':>11}")
    per_session = {name: statistics.median(values) for name, values in rss.items()}
    for name, kib in per_session.items():
        print(f"{name:<8} {kib:>12.1f} {kib * args.idle / 1024:>11.1f}")
    print(f"wss adds {per_session['wss'] - per_session['ws']:+.1f} KiB per idle session")


if __name__ == "__main__":
    main()

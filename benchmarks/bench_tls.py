"""What TLS costs (issue 21): the json route over https against plain http,
handshakes/s, and gateway memory per idle wss session against an idle ws one.

Test certificates come from trustme, made in a temp dir at start: a CA and one
leaf for 127.0.0.1 and localhost (`--key-type`: trustme's default ECDSA P-256,
or RSA 2048). The C echo upstream (../shared/bench/upstream) answers every
request. Load generator, gateway and upstream share the machine, as in the
other REST benches; processes, wrk runs, sessions and printing come from
benchmarks/harness.

- keep-alive: one `tlvproxy serve` process (1 worker) with `listen.http` and
  `listen.https` in one table, the shared harness's json route (POST /v1/echo,
  json codec, benchmarks/shared_target.py) and its 200-byte body, driven by
  wrk -t1 -c64 (../shared/bench/wrk/bench.lua) over each
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
  before and after opening `--idle` sessions (harness/sessions.py, as
  bench_websocket.py measures it), divided, over ws and over wss.

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

import trio
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from harness.figures import Column, FigureTable, medians
from harness.load import (
    CONNECTIONS,
    RUN_COLUMNS,
    WARMUP_SECONDS,
    check_echo,
    drive,
    require_wrk,
    run_cells,
    wrk,
    wrk_script,
)
from harness.processes import echo_upstream, raise_fd_limit, serving, tree_cpu_seconds
from harness.sessions import idle_memory
from harness.tables import ECHO_PATH, GatewayTable, write_echo_table

from tlvproxy.config.loader import load_table

# The idle-session table: a json-mode endpoint, and limits that admit every
# session from 127.0.0.1 (as bench_websocket's table does).
WEBSOCKET = (
    "websocket: {path: /ws, upstream: echo, mode: json, idle_timeout: 600s}\n"
    "limits: {max_connections: 100000, max_connections_per_ip: 100000}\n"
)
PROBE_SECONDS = 1
PROBE_CONNECTIONS = 4

Runs = dict[str, list[dict[str, float]]]


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
) -> GatewayTable:
    """The shared harness's json route on an http and an https listener (and
    an admin one, for /readyz and /metrics)."""
    entry = {"cert": str(cert), "key": str(key)}
    tls = f"tls:\n  certificates: [{json.dumps(entry)}]\n"
    extra = tls + (WEBSOCKET if websocket else "")
    return write_echo_table(directory / f"{name}.yaml", upstream_port, extra, https=True)


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


def handshake_failures(admin_port: int) -> dict[str, float]:
    """The gateway's tlvproxy_tls_handshake_failures_total by reason."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    pattern = r'^tlvproxy_tls_handshake_failures_total\{reason="([^"]*)"\} (\S+)$'
    return {reason: float(value) for reason, value in re.findall(pattern, text, re.MULTILINE)}


# ---------------------------------------------------------------- measurements


def s_time(table: GatewayTable, duration: int, clients: int, pid: int) -> dict[str, float]:
    """Full TLS handshakes/s: `clients` parallel `openssl s_time -new`, each one
    new connection at a time (closed once the handshake is done) for `duration`
    seconds; errors are the handshakes the gateway counted as failed, and
    `failed:REASON` of them by reason."""
    command = ["openssl", "s_time", "-new", "-connect", f"127.0.0.1:{table.https}"]
    command += ["-time", str(duration)]
    time.sleep(0.5)  # connections the run before left half done are counted by now
    failures_before = handshake_failures(table.admin)
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
    failures = handshake_failures(table.admin)
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


def run_all(
    args: argparse.Namespace,
    rest: GatewayTable,
    sessions: GatewayTable,
    context: ssl.SSLContext,
    close_script: Path,
) -> tuple[str, Runs, Runs, dict[str, list[float]]]:
    """Every run, the variants alternating within each round: keep-alive and
    new-connection runs on one gateway process, then the idle sessions; the
    protocol and cipher negotiated first."""
    assert rest.https is not None
    assert sessions.https is not None
    plain, tls = rest.url(), rest.url(tls=True)
    keep_alive: Runs = {"http": [], "https": []}
    new: Runs = {"http": [], "https wrk": [], "https full": []}
    with serving(rest) as gateway:
        check_echo(plain)
        check_echo(rest.url(tls=True, host="localhost"), context=context)
        protocol = negotiated(rest.https, context)
        for url in (plain, tls):  # warm-up: connections, pools, caches
            wrk(url, WARMUP_SECONDS, CONNECTIONS)
            wrk(url, WARMUP_SECONDS, CONNECTIONS, close_script)
        for _ in range(args.rounds):
            keep_alive["http"].append(drive(plain, args.duration, gateway.pid))
            keep_alive["https"].append(drive(tls, args.duration, gateway.pid))
            new["http"].append(drive(plain, args.duration, gateway.pid, close_script))
            new["https wrk"].append(drive(tls, args.duration, gateway.pid, close_script))
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


# ---------------------------------------------------------------- report


def print_rest(args: argparse.Namespace, kind: str, tls: str, runs: Runs) -> dict[str, float]:
    """The keep-alive table; returns https's req/s and CPU against http's."""
    figures = FigureTable(
        f"POST {ECHO_PATH} (json codec, 200-byte body), 1 worker, C echo upstream, one gateway "
        f"process with listen.http and listen.https; medians of {args.rounds} alternating runs",
        "listener",
        20,
        RUN_COLUMNS,
        notes=[
            f"certificate: trustme {kind} leaf for 127.0.0.1/localhost; {tls}",
            f"keep-alive connections, wrk -t1 -c{CONNECTIONS} -d{args.duration}s",
        ],
    )
    median = medians(runs)
    for name, result in median.items():
        figures.row(name, *run_cells(result))
    return {
        "ratio": median["https"]["rps"] / median["http"]["rps"],
        "cpu_us": median["https"]["cpu_us"] - median["http"]["cpu_us"],
    }


def print_resumption(resumed: int, handshakes: int) -> str:
    """The probe's table; returns whether wrk's https reconnections are
    `resumed` or `full` handshakes."""
    FigureTable(
        f"wrk's TLS sessions on reconnecting: wrk -t1 -c{PROBE_CONNECTIONS}, one request "
        f"per connection, for {PROBE_SECONDS} s against the table's TLS context",
        "probe",
        8,
        [Column("handshakes"), Column("resumed")],
    ).row("wrk", handshakes, resumed)
    return "resumed" if handshakes and resumed / handshakes >= 0.5 else "full"


def print_handshakes(
    args: argparse.Namespace, runs: Runs, wrk_kind: str, has_openssl: bool
) -> dict[str, float]:
    """The new-connection table; returns https's conn/s and CPU against http's."""
    notes = [
        f"http and https {wrk_kind}: wrk -t1 -c{CONNECTIONS}, POST {ECHO_PATH} with "
        "`Connection: close`",
    ]
    if has_openssl:
        notes += [
            f"https full: {args.handshake_clients} parallel `openssl s_time -new`, one "
            "connection at a time each, never resumed, closed after the handshake;",
            "its errors are the gateway's tlvproxy_tls_handshake_failures_total, by reason "
            "below; `closed`: the client left before the gateway's side of the handshake was "
            "done (s_time leaves as soon as its side is)",
        ]
    else:
        notes.append("https full: not measured, openssl is not installed")
    figures = FigureTable(
        f"a new connection per request; medians of {args.rounds} runs of {args.duration}s",
        "connections",
        28,
        [Column("conn/s"), Column("CPU us/conn", ".1f", 12), Column("errors", ".0f", 7)],
        notes,
    )
    labels = {
        "http": "http (TCP + request)",
        "https wrk": f"https, {wrk_kind} handshake",
        "https full": "https, full, no request",
    }
    median = medians(runs)
    for name, result in median.items():
        figures.row(labels[name], result["rps"], result["cpu_us"], result["errors"])
        for key, value in result.items():
            if key.startswith("failed:"):
                figures.row(f"  failed: {key.removeprefix('failed:')}", None, None, value)
    return {
        "ratio": median["https wrk"]["rps"] / median["http"]["rps"],
        "cpu_us": median["https wrk"]["cpu_us"] - median["http"]["cpu_us"],
    }


def print_against_http(keep_alive: dict[str, float], new: dict[str, float], wrk_kind: str) -> None:
    figures = FigureTable(
        "https against http",
        "requests",
        28,
        [Column("rate / http's", ".2f", 13), Column("CPU us added", "+.1f", 12)],
    )
    figures.row("keep-alive", keep_alive["ratio"], keep_alive["cpu_us"])
    figures.row(f"new connection, {wrk_kind}", new["ratio"], new["cpu_us"])


def print_sessions(args: argparse.Namespace, rss: dict[str, list[float]]) -> None:
    figures = FigureTable(
        f"gateway RSS per idle json-mode session, {args.idle} sessions (each with its "
        f"upstream connection), a fresh gateway per run; medians of {args.rounds}",
        "session",
        8,
        [Column("KiB/session", ".1f", 12), Column("MiB in all", ".1f", 11)],
    )
    per_session = {name: statistics.median(values) for name, values in rss.items()}
    for name, kib in per_session.items():
        figures.row(name, kib, kib * args.idle / 1024)
    extra = per_session["wss"] - per_session["ws"]
    figures.row("wss adds", extra, extra * args.idle / 1024)


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5, help="seconds per wrk/s_time run")
    options.add_argument("--rounds", type=int, default=3)
    options.add_argument("--idle", type=int, default=1000, help="idle sessions per run")
    options.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa")
    options.add_argument("--handshake-clients", type=int, default=8)
    args = options.parse_args()
    require_wrk()
    has_openssl = shutil.which("openssl") is not None
    raise_fd_limit()  # the gateways inherit it: --idle sessions each hold two descriptors
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        ca, cert, key, kind = make_certificate(directory, args.key_type)
        context = client_context(ca)
        close_script = wrk_script(directory / "close.lua", 'wrk.headers["Connection"] = "close"\n')
        with echo_upstream(directory) as port:
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
    keep_alive = print_rest(args, kind, protocol, rest_runs)
    wrk_kind = print_resumption(resumed, handshakes)
    new = print_handshakes(args, new_runs, wrk_kind, has_openssl)
    print_against_http(keep_alive, new, wrk_kind)
    print_sessions(args, rss)


if __name__ == "__main__":
    main()

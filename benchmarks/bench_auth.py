"""What a JWT costs: CPU per request of a json route with `auth: none` and with
a `jwt` authenticator (issue 15: at most 15% more).

Builds the C echo upstream, writes a table like the shared harness's json
target (benchmarks/shared_target.py) with an ES256 key set in a file, starts
`tlvproxy serve` as a real process for each variant, checks the echo, and
drives POST /v1/echo with wrk -t1 -c64 (../shared/bench/wrk/bench.lua and its
200-byte body; the jwt variant adds `Authorization: Bearer TOKEN`, one token
for every request, as a client sends its token until it expires). Access
records go to a file; metrics are on. The figure is the gateway process's CPU
seconds over the requests served, which moves much less than req/s when wrk
and the upstream share the two cores. The variants alternate, `--rounds`
times each; medians are compared.

Run: .venv/bin/python benchmarks/bench_auth.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jwt
from bench_upstream import build_echo, start_echo
from bench_workers import WRK, free_port, measure
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from shared_target import table_text

VARIANTS = ("none", "jwt")
TARGET = 1.15


def write_tables(directory: Path, upstream_port: int) -> dict[str, tuple[Path, int, int]]:
    """The json route's table once without and once with a jwt authenticator."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "bench", "use": "sig"}
    (directory / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    tables = {}
    for variant in VARIANTS:
        http_port, admin_port = free_port(), free_port()
        text = table_text(http_port, f"127.0.0.1:{upstream_port}", "json").replace(
            "admin: null", f"admin: 127.0.0.1:{admin_port}"
        )
        if variant == "jwt":
            text += (
                "    auth: users\n"
                "auth:\n"
                "  - name: users\n"
                "    type: jwt\n"
                "    keys: jwks.json\n"
                "    algorithms: [ES256]\n"
                "    issuer: https://login.bench\n"
                "    audience: bench\n"
            )
        path = directory / f"{variant}.yaml"
        path.write_text(text)
        tables[variant] = (path, http_port, admin_port)
    claims = {"sub": "7", "iss": "https://login.bench", "aud": "bench", "exp": time.time() + 3600}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench"})
    (directory / "token").write_text(token)
    return tables


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=3)
    args = options.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        echo, port = start_echo(build_echo(directory))
        script = directory / "auth.lua"
        script.write_text(
            f'dofile("{WRK / "bench.lua"}")\n'
            'local authorization = os.getenv("BENCH_AUTHORIZATION")\n'
            'if authorization then wrk.headers["Authorization"] = authorization end\n'
        )
        try:
            tables = write_tables(directory, port)
            bearer = "Bearer " + (directory / "token").read_text()
            print(
                f"POST /v1/echo (json codec, 200-byte body), wrk -t1 -c64 -d{args.duration}s, "
                f"1 worker, C echo upstream, {args.rounds} rounds alternating"
            )
            print(f"{'auth':<6} {'round':>5} {'req/s':>10} {'cpu us/req':>11} {'errors':>7}")
            cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            for round_number in range(1, args.rounds + 1):
                for variant in VARIANTS:
                    env = {"BENCH_AUTHORIZATION": bearer} if variant == "jwt" else {}
                    table, http_port, admin_port = tables[variant]
                    result = measure(
                        table, http_port, admin_port, 1, args.duration, "info", script, **env
                    )
                    if result["errors"]:
                        raise SystemExit(f"{variant}: {result['errors']:.0f} errors under load")
                    cpu[variant].append(result["cpu_us"])
                    print(
                        f"{variant:<6} {round_number:>5} {result['rps']:>10.0f} "
                        f"{result['cpu_us']:>11.1f} {result['errors']:>7.0f}",
                        flush=True,
                    )
        finally:
            echo.terminate()
            echo.wait()
    none, with_jwt = (statistics.median(cpu[variant]) for variant in VARIANTS)
    ratio = with_jwt / none
    verdict = "meets" if ratio <= TARGET else "misses"
    print(
        f"median cpu us/req: none {none:.1f}, jwt {with_jwt:.1f}: {ratio:.3f}x "
        f"({verdict} the {TARGET:.2f}x target)"
    )


if __name__ == "__main__":
    main()

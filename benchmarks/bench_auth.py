"""What a JWT costs: CPU per request of a json route with `auth: none` and with
a `jwt` authenticator (issue 15: at most 15% more).

Builds the C echo upstream, writes the shared harness's json target
(benchmarks/shared_target.py) once as it is and once with an ES256 key set in
a file, starts `tlvproxy serve` as a real process for each variant, checks the
echo, and drives POST /v1/echo with wrk -t1 -c64 (../shared/bench/wrk/bench.lua
and its 200-byte body; the jwt variant adds `Authorization: Bearer TOKEN`, one
token for every request, as a client sends its token until it expires), all
through benchmarks/harness. Access records go to a file; metrics are on. The
figure is the gateway process's CPU seconds over the requests served, which
moves much less than req/s when wrk and the upstream share the two cores. The
variants alternate, `--rounds` times each; medians are compared against the
target: jwt / none <= 1.15.

Run: .venv/bin/python benchmarks/bench_auth.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from harness.figures import Column, FigureTable, medians, print_target
from harness.load import CONNECTIONS, measure, require_wrk, wrk_script
from harness.processes import echo_upstream
from harness.tables import GatewayTable, write_echo_table
from jwt.algorithms import ECAlgorithm

VARIANTS = ("none", "jwt")
TARGET = 1.15
# The echo command's `auth`, then the authenticator it names.
_JWT = (
    "    auth: users\n"
    "auth:\n"
    "  - name: users\n"
    "    type: jwt\n"
    "    keys: jwks.json\n"
    "    algorithms: [ES256]\n"
    "    issuer: https://login.bench\n"
    "    audience: bench\n"
)
_AUTHORIZATION_LUA = (
    'local authorization = os.getenv("BENCH_AUTHORIZATION")\n'
    'if authorization then wrk.headers["Authorization"] = authorization end\n'
)


def write_tables(directory: Path, upstream_port: int) -> tuple[dict[str, GatewayTable], str]:
    """The json route's table once without and once with a jwt authenticator
    (its key set in `directory`), and a token it accepts."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "bench", "use": "sig"}
    (directory / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    tables = {
        "none": write_echo_table(directory / "none.yaml", upstream_port),
        "jwt": write_echo_table(directory / "jwt.yaml", upstream_port, _JWT),
    }
    claims = {"sub": "7", "iss": "https://login.bench", "aud": "bench", "exp": time.time() + 3600}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench"})
    return tables, token


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--duration", type=int, default=5)
    options.add_argument("--rounds", type=int, default=3)
    args = options.parse_args()
    require_wrk()
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="tlvbench-") as workdir:
        directory = Path(workdir)
        script = wrk_script(directory / "auth.lua", _AUTHORIZATION_LUA)
        with echo_upstream(directory) as port:
            tables, token = write_tables(directory, port)
            figures = FigureTable(
                f"POST /v1/echo (json codec, 200-byte body), wrk -t1 -c{CONNECTIONS} "
                f"-d{args.duration}s, 1 worker, C echo upstream, {args.rounds} rounds alternating",
                "auth",
                14,
                [Column("req/s"), Column("CPU us/req", ".1f", 11), Column("errors", ".0f", 7)],
            )
            for round_number in range(1, args.rounds + 1):
                for variant in VARIANTS:
                    env = {"BENCH_AUTHORIZATION": f"Bearer {token}"} if variant == "jwt" else {}
                    result = measure(tables[variant], 1, args.duration, "info", script, **env)
                    if result["errors"]:
                        raise SystemExit(f"{variant}: {result['errors']:.0f} errors under load")
                    runs[variant].append(result)
                    figures.row(
                        f"{variant}, round {round_number}",
                        result["rps"],
                        result["cpu_us"],
                        result["errors"],
                    )
    median = medians(runs)
    for variant in VARIANTS:
        figures.row(
            f"{variant}, median",
            median[variant]["rps"],
            median[variant]["cpu_us"],
            median[variant]["errors"],
        )
    ratio = median["jwt"]["cpu_us"] / median["none"]["cpu_us"]
    print_target("jwt / none, CPU per request", ratio, "<=", TARGET, ".3f", "x")


if __name__ == "__main__":
    main()

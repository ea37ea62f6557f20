"""deploy/: the systemd unit, the Dockerfile and the nginx front agree with the gateway.

Cheap checks that need neither systemd, docker nor a running nginx: the files
parse, and the settings that a drain, a reload and the limits depend on hold
against the tests' table (the demo table's settings). The nginx check runs
`nginx -t`; `make test` installs nginx for it.
"""

from __future__ import annotations

import configparser
import datetime
import json
import re
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cli import REPO
from tests.fixtures import FIXTURE_TABLE
from tlvproxy.config.loader import load_table
from tlvproxy.config.model import SessionsSpec
from tlvproxy.server.push_stream import KEEP_ALIVE_INTERVAL
from tlvproxy.units import parse_duration

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "tlvproxy.service"
DOCKERFILE = DEPLOY / "Dockerfile"
NGINX = DEPLOY / "nginx.conf"


@pytest.fixture(scope="module")
def table():
    return load_table(FIXTURE_TABLE)


# ---------------------------------------------------------------- systemd unit


def unit_values(key):
    """Every value of `key` in the unit's [Service] section, in order (systemd
    allows a key more than once; configparser keeps only the last)."""
    values = []
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.partition("=")[0] == key:
            values.append(line.partition("=")[2])
    return values


@pytest.fixture(scope="module")
def service():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    return parser["Service"]


def test_unit_runs_serve_as_its_own_user(service):
    assert service["ExecStart"].split()[1:] == ["serve", "-c", "/etc/tlvproxy/commands.yaml"]
    assert service["User"] not in ("", "root", "0")


def test_unit_reload_checks_the_table_then_sends_sighup():
    reloads = unit_values("ExecReload")
    assert reloads[-1] == "/bin/kill -HUP $MAINPID"
    assert any(" check -c " in command for command in reloads[:-1])


def test_unit_stop_drains_through_the_main_process(service, table):
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to the supervisor only: it forwards one to each worker (a second
    # SIGTERM would make a worker exit without draining).
    assert service["KillMode"] == "mixed"
    assert service.get("SendSIGHUP", "no") == "no"  # SIGHUP would reload
    assert parse_duration(service["TimeoutStopSec"]) > table.shutdown_timeout


def test_unit_limits_and_sandbox(service):
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    # The supervisor's metrics directory is made under $TMPDIR: a directory
    # the unit makes writable.
    assert service["Environment"] == "TMPDIR=/run/tlvproxy"
    assert service["RuntimeDirectory"] == "tlvproxy"


# ---------------------------------------------------------------- Dockerfile


def final_stage():
    """The last stage's instructions as (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, arguments = line.partition(" ")
        if name.upper() == "FROM":
            instructions = []
        instructions.append((name.upper(), arguments.strip()))
    return instructions


def instruction(name):
    found = [arguments for each, arguments in final_stage() if each == name]
    assert found, f"no {name} in the final stage"
    return found[-1]


def test_dockerfile_runs_as_a_user_that_is_not_root():
    user = instruction("USER").split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_asks_readyz_on_the_admin_listener(table):
    healthcheck = instruction("HEALTHCHECK")
    assert f"http://127.0.0.1:{table.listen.admin.port}/readyz" in healthcheck
    assert "curl" not in healthcheck  # python:*-slim has none


def test_dockerfile_serves_the_mounted_table(table):
    assert instruction("FROM").startswith("python:3.11-slim")
    command = json.loads(instruction("CMD"))
    assert command[:2] == ["tlvproxy", "serve"]
    assert command[2:] == ["-c", "/etc/tlvproxy/commands.yaml"]
    exposed = {int(port) for port in instruction("EXPOSE").split()}
    assert exposed == {table.listen.http.port, table.listen.admin.port}


# ---------------------------------------------------------------- nginx


def test_nginx_timeouts_are_above_the_gateways(table):
    text = NGINX.read_text()
    ws = re.search(r"location = /ws \{(.*?)\}", text, re.S)
    assert ws is not None
    read = re.search(r"proxy_read_timeout (\d+)s;", ws.group(1))
    assert read is not None
    assert int(read.group(1)) > table.websocket.idle_timeout
    keepalive = re.search(r"keepalive_timeout (\d+)s;", text)
    assert keepalive is not None
    assert int(keepalive.group(1)) < table.limits.keepalive_timeout
    # Push sessions: unbuffered, sticky, and waiting longer than a poll or an
    # idle stream's comments (the defaults: the tests' table has no `sessions`).
    sessions = re.search(r"location /v1/sessions \{(.*?)\}", text, re.S)
    assert sessions is not None
    assert "proxy_buffering off;" in sessions.group(1)
    assert "proxy_pass http://tlvproxy_sessions;" in sessions.group(1)
    read = re.search(r"proxy_read_timeout (\d+)s;", sessions.group(1))
    assert read is not None
    assert int(read.group(1)) > max(SessionsSpec(upstream="").poll_timeout, KEEP_ALIVE_INTERVAL)
    assert re.search(r"upstream tlvproxy_sessions \{\s*hash \$remote_addr consistent;", text)


def self_signed(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def nginx_version(nginx):
    result = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=30)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", result.stderr + result.stdout)
    assert match is not None, result.stderr
    return tuple(int(part) for part in match.groups())


def test_nginx_accepts_the_sample(tmp_path):
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    assert nginx is not None, "nginx is missing: `make test-deps` installs it"
    # The sample names certificates that exist only where it is deployed.
    cert, key = self_signed(tmp_path)
    site = NGINX.read_text()
    site, certs = re.subn(r"(?m)^(\s*ssl_certificate)\s+\S+;", rf"\1 {cert};", site)
    site, keys = re.subn(r"(?m)^(\s*ssl_certificate_key)\s+\S+;", rf"\1 {key};", site)
    assert (certs, keys) == (1, 1)
    # `nginx -t` binds what it listens on: Unix sockets instead of ports 80 and
    # 443, which only root may bind and something else may hold.
    sockets = iter(range(100))
    site, listens = re.subn(
        r"(?m)^(\s*listen)\s+[^\s;]+",
        lambda match: f"{match.group(1)} unix:{tmp_path}/listen{next(sockets)}.sock",
        site,
    )
    assert listens == 4
    (tmp_path / "site.conf").write_text(site)
    # Everything nginx would write goes under tmp_path; `-t` only reads and checks.
    wrapper = tmp_path / "nginx.conf"
    wrapper.write_text(
        f"pid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\n"
        "events {}\n"
        "http {\n"
        f"    access_log {tmp_path}/access.log;\n"
        + "".join(
            f"    {kind}_temp_path {tmp_path}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {tmp_path}/site.conf;\n"
        "}\n"
    )
    command = [nginx, "-t", "-p", str(tmp_path), "-c", str(wrapper)]
    if nginx_version(nginx) >= (1, 19, 5):
        # The error log before the configuration is read (else the built-in
        # path, which only root may write).
        command[2:2] = ["-e", str(tmp_path / "error.log")]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr

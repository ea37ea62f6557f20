"""The `tls` section and `listen.https` (SPEC 3, 10): certificates loaded by the
table loader, every mistake with its place, the warnings `check` prints, the
choice of a certificate by SNI (`ServerCertificates.context_for` and the
handshake's `sni_callback`), and a new table version for a new certificate file.

Pure: no gateway process; certificates come from trustme, made once per module.
"""

from __future__ import annotations

import datetime
import re
import shutil
import ssl
import textwrap
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.cli import run_cli
from tlvproxy.config.certificates import ServerCertificates
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import Address

REPO = Path(__file__).resolve().parents[2]
PROTO = f"proto: {{paths: [{REPO / 'proto'}], files: [demo/im.proto]}}\n"
DAY = 86400.0
GW_NAMES = ("localhost", "127.0.0.1", "gw.example.com")
IM_NAMES = ("im.example.com", "*.im.example.com")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(leaf: trustme.LeafCert, directory: Path, stem: str) -> None:
    leaf.cert_chain_pems[0].write_to_path(str(directory / f"{stem}.pem"))
    leaf.private_key_pem.write_to_path(str(directory / f"{stem}.key"))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every file the tests name, in certs/: gw (the default), im (a wildcard),
    gw2 (a rotation of gw), expired, soon (5 days left), month (30 days left),
    enc.key (gw's key encrypted), junk.pem (not PEM), fake.pem (PEM armour around
    no certificate), and the CA."""
    directory = tmp_path_factory.mktemp("made") / "certs"
    directory.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    now = _now()
    leaves = {
        "gw": ca.issue_cert(*GW_NAMES, not_after=now + datetime.timedelta(days=90)),
        "gw2": ca.issue_cert(*GW_NAMES, not_after=now + datetime.timedelta(days=120)),
        "im": ca.issue_cert(*IM_NAMES, not_after=now + datetime.timedelta(days=60)),
        "expired": ca.issue_cert(
            "old.example.com",
            not_before=now - datetime.timedelta(days=40),
            not_after=now - datetime.timedelta(days=10),
        ),
        "soon": ca.issue_cert("soon.example.com", not_after=now + datetime.timedelta(days=5)),
        "month": ca.issue_cert("month.example.com", not_after=now + datetime.timedelta(days=30)),
    }
    for stem, leaf in leaves.items():
        _write(leaf, directory, stem)
    key = serialization.load_pem_private_key(leaves["gw"].private_key_pem.bytes(), None)
    (directory / "enc.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    (directory / "junk.pem").write_bytes(b"this is no certificate\n")
    (directory / "fake.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    (directory / "dir.pem").mkdir()
    (directory / "ca-first.pem").write_bytes(
        ca.cert_pem.bytes() + leaves["gw"].cert_chain_pems[0].bytes()
    )
    return directory, {stem: leaf.cert_chain_pems[0].bytes() for stem, leaf in leaves.items()}


@pytest.fixture
def workdir(tmp_path, made):
    """A directory of its own holding certs/ (a copy: tests may replace files)."""
    shutil.copytree(made[0], tmp_path / "certs")
    return tmp_path


@pytest.fixture
def pems(made):
    """{stem: the leaf certificate's PEM} of the files in certs/."""
    return made[1]


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def load(workdir, text, name="table.yaml"):
    path = workdir / name
    path.write_text(PROTO + textwrap.dedent(text))
    return load_table(path)


def problems(workdir, text, name="table.yaml"):
    with pytest.raises(TableError) as caught:
        load(workdir, text, name)
    return caught.value.problems


def place(workdir, line, column, name="table.yaml"):
    """The "FILE:LINE:COL: " a problem starts with; `line` counts from the line
    after PROTO (the first line of the text a test gives)."""
    return f"{workdir / name}:{line + 1}:{column}: "


def at(workdir, text, token, name="table.yaml"):
    """The place of the first `token` in `text` (a test's text, without PROTO)."""
    for number, line in enumerate(text.splitlines(), 1):
        if token in line:
            return place(workdir, number, line.index(token) + 1, name)
    raise AssertionError(f"{token!r} is not in the text")


def file_pattern(workdir, written: str) -> str:
    """A regex for how a message names the file `written` (relative to the
    table): as written (docs/configuration.md) or joined to the table's directory."""
    return f"(?:{re.escape(written)}|{re.escape(str(workdir / written))})"


def message_pattern(workdir, template: str) -> str:
    """`template` as a regex, each {certs/NAME} a file named either way."""
    parts = re.split(r"\{(certs/[^}]+)\}", template)
    return "".join(
        file_pattern(workdir, part) if i % 2 else re.escape(part) for i, part in enumerate(parts)
    )


def tls_with(*entries: str, extra: str = "") -> str:
    """listen.https and a tls section of `entries` (flow mappings), one per line
    from line 4 on (line 1 is listen, 2 tls, 3 certificates)."""
    lines = [
        "listen: {http: 127.0.0.1:8080, https: 127.0.0.1:8443}",
        "tls:",
        "  certificates:",
        *(f"    - {entry}" for entry in entries),
    ]
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


GW = "{cert: certs/gw.pem, key: certs/gw.key}"
IM = '{cert: certs/im.pem, key: certs/im.key, server_names: [im.example.com, "*.im.example.com"]}'


# ---------------------------------------------------------------- what loads


def test_a_table_with_https_loads_its_certificates(workdir, pems):
    table = load(workdir, tls_with(GW, IM))
    assert table.listen.http == Address("127.0.0.1", 8080)
    assert table.listen.https == Address("127.0.0.1", 8443)
    assert table.tls is not None
    assert table.tls.min_version == "1.2"
    gw, im = table.tls.certificates
    # Paths start at the table's directory; the name is the path as written.
    assert (gw.cert, gw.key, gw.name) == (
        workdir / "certs" / "gw.pem",
        workdir / "certs" / "gw.key",
        "certs/gw.pem",
    )
    assert gw.server_names == ()
    assert im.server_names == IM_NAMES
    assert table.warnings == ()
    assert table.certificates is not None
    loaded = table.certificates.certificates
    assert [c.name for c in loaded] == ["certs/gw.pem", "certs/im.pem"]
    assert loaded[0].dns_names == ("localhost", "gw.example.com")  # the IP SAN is no DNS name
    assert loaded[1].dns_names == IM_NAMES
    for certificate in loaded:
        context = certificate.context
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_RENEGOTIATION
    # The default context is the first certificate's.
    assert table.certificates.context is loaded[0].context


def test_relative_paths_start_at_the_table_not_the_working_directory(workdir, monkeypatch):
    conf = workdir / "conf"
    conf.mkdir()
    monkeypatch.chdir(REPO)
    table = load(workdir, tls_with("{cert: ./certs/gw.pem, key: certs/../certs/gw.key}"))
    assert table.certificates is not None
    # And from a table in another directory, `..` reaches the same files.
    other = load(conf, tls_with("{cert: ../certs/gw.pem, key: ../certs/gw.key}"))
    assert other.tls is not None
    assert other.tls.certificates[0].cert == conf / "../certs/gw.pem"
    assert other.tls.certificates[0].name == "../certs/gw.pem"
    assert other.certificates is not None
    assert [c.not_after for c in other.certificates.certificates] == [
        c.not_after for c in table.certificates.certificates
    ]


def test_https_alone_loads_with_http_null(workdir):
    text = tls_with(GW).replace("http: 127.0.0.1:8080", "http: null")
    table = load(workdir, text)
    assert table.listen.http is None
    assert table.listen.https == Address("127.0.0.1", 8443)
    assert table.listen.admin == Address("127.0.0.1", 9180)


@pytest.mark.parametrize(
    "listen",
    ["{http: null, https: null}", "{http: null}", "{http: null, admin: 127.0.0.1:9180}"],
)
def test_no_listener_for_requests_is_an_error(workdir, listen):
    found = problems(workdir, f"listen: {listen}\n")
    assert found == [
        place(workdir, 1, 9) + "listen: http and https are both null: nothing would serve requests"
    ]


def test_https_without_tls_is_an_error_at_listen(workdir):
    found = problems(workdir, "listen: {https: 127.0.0.1:8443}\n")
    assert found == [place(workdir, 1, 9) + "listen.https: serving https needs the tls section"]


def test_an_https_address_is_checked_like_http(workdir):
    text = tls_with(GW).replace("https: 127.0.0.1:8443", "https: localhost")
    found = problems(workdir, text)
    assert found == [
        at(workdir, text, "localhost") + "listen.https: expected HOST:PORT, got 'localhost'"
    ]


def test_tls_null_is_no_tls(workdir):
    """docs/configuration.md: leave `tls` out, or write `tls: null`, when there are none."""
    table = load(workdir, "listen: {http: 127.0.0.1:8080}\ntls: null\n")
    assert (table.tls, table.certificates, table.warnings) == (None, None, ())


def test_https_with_tls_null_is_an_error_at_listen(workdir):
    # Loaded, such a table would serve an https port with no certificate at all.
    found = problems(workdir, "listen: {https: 127.0.0.1:8443}\ntls: null\n")
    assert found == [place(workdir, 1, 9) + "listen.https: serving https needs the tls section"]


def test_tls_without_https_is_a_warning(workdir):
    text = "listen: {http: 127.0.0.1:8080}\ntls:\n  certificates:\n    - " + GW + "\n"
    table = load(workdir, text)
    assert table.listen.https is None
    assert table.warnings == (
        place(workdir, 3, 3) + "tls: listen.https is not set: these certificates serve nothing",
    )


@pytest.mark.parametrize(
    ("written", "version", "minimum"),
    [
        (None, "1.2", ssl.TLSVersion.TLSv1_2),
        ('"1.2"', "1.2", ssl.TLSVersion.TLSv1_2),
        ("1.2", "1.2", ssl.TLSVersion.TLSv1_2),  # an unquoted YAML float
        ("'1.3'", "1.3", ssl.TLSVersion.TLSv1_3),
        ("1.3", "1.3", ssl.TLSVersion.TLSv1_3),
    ],
)
def test_min_version_forms(workdir, written, version, minimum):
    extra = "" if written is None else f"  min_version: {written}"
    table = load(workdir, tls_with(GW, IM, extra=extra))
    assert table.tls is not None
    assert table.tls.min_version == version
    assert table.certificates is not None
    for certificate in table.certificates.certificates:
        assert certificate.context.minimum_version == minimum


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("1.1", "1.1"),
        ('"1.0"', "'1.0'"),
        ("'1.4'", "'1.4'"),
        ("13", "13"),
        ("true", "True"),
        ("TLSv1.3", "'TLSv1.3'"),
        ("null", "None"),
    ],
)
def test_min_version_mistakes(workdir, written, shown):
    found = problems(workdir, tls_with(GW, extra=f"  min_version: {written}"))
    assert found == [
        place(workdir, 5, 16) + f"tls.min_version: expected one of '1.2', '1.3', got {shown}"
    ]


# ---------------------------------------------------------------- what does not load


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{cert: certs/gw.pem, key: certs/im.key}",
            "the key {certs/im.key} does not match the certificate {certs/gw.pem}",
        ),
        (
            # A chain must start with the server certificate.
            "{cert: certs/ca-first.pem, key: certs/gw.key}",
            "the key {certs/gw.key} does not match the certificate {certs/ca-first.pem}",
        ),
        ("{cert: certs/junk.pem, key: certs/gw.key}", "{certs/junk.pem} holds no PEM certificate"),
        ("{cert: certs/fake.pem, key: certs/gw.key}", "{certs/fake.pem} holds no PEM certificate"),
        ("{cert: certs/gw.key, key: certs/gw.key}", "{certs/gw.key} holds no PEM certificate"),
        (
            "{cert: certs/nowhere.pem, key: certs/gw.key}",
            "cannot read the certificate {certs/nowhere.pem}: No such file or directory",
        ),
        (
            "{cert: certs/dir.pem, key: certs/gw.key}",
            "cannot read the certificate {certs/dir.pem}: Is a directory",
        ),
        ("{cert: certs/gw.pem, key: certs/nowhere.key}", "no such file: {certs/nowhere.key}"),
        (
            "{cert: certs/gw.pem, key: certs/enc.key}",
            "the key {certs/enc.key} is encrypted; give it unencrypted (mode 0600):"
            " the gateway cannot ask for a passphrase",
        ),
        ("{cert: certs/gw.pem, key: certs/junk.pem}", "{certs/junk.pem} holds no PEM private key"),
        ("{cert: certs/gw.pem, key: certs/gw.pem}", "{certs/gw.pem} holds no PEM private key"),
    ],
)
def test_a_certificate_that_cannot_load_fails_at_its_entry(workdir, entry, message):
    # The broken one is the second entry (line 5): its place, not the first's.
    found = problems(workdir, tls_with(GW, entry))
    assert len(found) == 1, found
    expected = re.escape(place(workdir, 5, 7) + "tls.certificates[1]: ") + message_pattern(
        workdir, message
    )
    assert re.fullmatch(expected, found[0]), found


def test_every_broken_entry_is_reported_at_once(workdir):
    found = problems(
        workdir,
        tls_with(
            "{cert: certs/junk.pem, key: certs/gw.key}",
            GW,
            "{cert: certs/gw.pem, key: certs/enc.key}",
        ),
    )
    assert [p.split(": ")[0:2] for p in found] == [
        [place(workdir, 4, 7)[:-2], "tls.certificates[0]"],
        [place(workdir, 6, 7)[:-2], "tls.certificates[2]"],
    ], found


@pytest.mark.parametrize(
    ("section", "where", "message"),
    [
        ("tls: {}", (2, 6), "tls: certificates is required: at least one {cert, key}"),
        ("tls: {certificates: []}", (2, 21), "tls.certificates: give at least one {cert, key}"),
        (
            "tls: {certificates: [{cert: certs/gw.pem}]}",
            (2, 22),
            "tls.certificates[0]: key required: the PEM files to serve",
        ),
        (
            "tls: {certificates: [{key: certs/gw.key}]}",
            (2, 22),
            "tls.certificates[0]: cert required: the PEM files to serve",
        ),
        (
            "tls: {certificates: [{}]}",
            (2, 22),
            "tls.certificates[0]: cert and key required: the PEM files to serve",
        ),
        (
            "tls: {certificates: [{cert: certs/gw.pem, key: certs/gw.key, colour: red}]}",
            "colour",
            "tls.certificates[0].colour: unknown key (expected one of: cert, key, server_names)",
        ),
        (
            "tls: {certificates: [" + GW + "], ciphers: ALL}",
            "ciphers",
            "tls.ciphers: unknown key (expected one of: certificates, min_version)",
        ),
    ],
)
def test_tls_section_mistakes(workdir, section, where, message):
    text = f"listen: {{https: 127.0.0.1:8443}}\n{section}\n"
    found = problems(workdir, text)
    start = at(workdir, text, where) if isinstance(where, str) else place(workdir, *where)
    assert found == [start + message], found


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("'*.*.im.example.com'", "'*.*.im.example.com'"),
        ("'*'", "'*'"),
        ("'a*.im.example.com'", "'a*.im.example.com'"),
        ("im..example.com", "'im..example.com'"),
        ("-im.example.com", "'-im.example.com'"),
        ("im_x.example.com", "'im_x.example.com'"),
        ("'im example.com'", "'im example.com'"),
        ("'" + "a" * 64 + ".example.com'", "'" + "a" * 64 + ".example.com'"),
    ],
)
def test_an_invalid_server_name_is_placed(workdir, name, shown):
    entry = "{cert: certs/im.pem, key: certs/im.key, server_names: [im.example.com, " + name + "]}"
    text = tls_with(GW, entry)
    found = problems(workdir, text)
    expected = (
        at(workdir, text, name) + "tls.certificates[1].server_names[1]: expected a host name like"
        f" im.example.com or *.im.example.com (a wildcard covers one label), got {shown}"
    )
    assert found == [expected], found


def test_a_server_name_that_is_no_string_is_placed(workdir):
    entry = "{cert: certs/im.pem, key: certs/im.key, server_names: [42]}"
    text = tls_with(GW, entry)
    found = problems(workdir, text)
    assert found == [
        at(workdir, text, "42]")
        + "tls.certificates[1].server_names[0]: expected a host name like im.example.com, got 42"
    ]


def test_a_server_name_of_two_entries_is_an_error_at_the_second(workdir):
    text = tls_with(
        "{cert: certs/gw.pem, key: certs/gw.key, server_names: [gw.example.com]}",
        IM,
        "{cert: certs/gw2.pem, key: certs/gw2.key, server_names: [localhost, GW.Example.COM.]}",
    )
    found = problems(workdir, text)
    assert found == [
        at(workdir, text, "GW.Example")
        + "tls.certificates[2].server_names[1]: gw.example.com is already a name of"
        " tls.certificates[0]"
    ], found


def test_a_server_name_listed_twice_in_one_entry_is_an_error(workdir):
    text = tls_with(
        "{cert: certs/im.pem, key: certs/im.key, server_names: [im.example.com, IM.example.com]}"
    )
    found = problems(workdir, text)
    assert found == [
        at(workdir, text, "IM.example")
        + "tls.certificates[0].server_names[1]: im.example.com is listed twice"
    ], found


# ---------------------------------------------------------------- warnings


def test_an_entry_after_the_first_without_server_names_is_a_warning(workdir):
    """docs/configuration.md: such an entry is never served."""
    table = load(workdir, tls_with(IM, GW))
    assert table.warnings == (
        place(workdir, 5, 7)
        + "tls.certificates[1]: no server_names: only the first certificate is served without one",
    )


def test_a_server_name_the_certificate_does_not_cover_is_a_warning(workdir):
    table = load(
        workdir,
        tls_with(
            GW,
            "{cert: certs/im.pem, key: certs/im.key, server_names:"
            " [im.example.com, a.im.example.com, '*.im.example.com', b.a.im.example.com,"
            " chat.example.com]}",
        ),
    )
    prefix = place(workdir, 5, 7) + "tls.certificates[1]: server name "
    suffix = (
        " is not among the names of certs/im.pem (im.example.com, *.im.example.com):"
        " clients that check the name will refuse it"
    )
    # a.im.example.com is covered by the wildcard, b.a.im.example.com is not: one label.
    assert table.warnings == (
        prefix + "b.a.im.example.com" + suffix,
        prefix + "chat.example.com" + suffix,
    )


def test_an_expired_certificate_still_loads_with_a_warning(workdir):
    entry = "{cert: certs/expired.pem, key: certs/expired.key, server_names: [old.example.com]}"
    table = load(workdir, tls_with(GW, entry))
    assert table.warnings == (
        place(workdir, 5, 7) + "tls.certificates[1]: certs/expired.pem expired 10 days ago",
    )
    assert table.certificates is not None
    assert table.certificates.certificates[1].seconds_left() == pytest.approx(-10 * DAY, abs=600)


def test_a_certificate_expiring_within_14_days_is_a_warning(workdir):
    table = load(
        workdir,
        tls_with(
            "{cert: certs/soon.pem, key: certs/soon.key}",
            # 30 days left: no warning
            "{cert: certs/month.pem, key: certs/month.key, server_names: [month.example.com]}",
        ),
    )
    assert len(table.warnings) == 1, table.warnings
    match = re.fullmatch(
        re.escape(place(workdir, 4, 7) + "tls.certificates[0]: certs/soon.pem expires in ")
        + r"(\d+\.\d) days",
        table.warnings[0],
    )
    assert match is not None, table.warnings
    assert float(match.group(1)) in (4.9, 5.0)


def test_check_prints_the_warnings_and_fails_on_errors(workdir):
    text = tls_with("{cert: certs/soon.pem, key: certs/soon.key}")
    (workdir / "good.yaml").write_text(PROTO + text)
    result = run_cli("check", "-c", str(workdir / "good.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        f"warning: {workdir / 'good.yaml'}:5:7: tls.certificates[0]: certs/soon.pem expires in "
    ), result.stderr

    (workdir / "bad.yaml").write_text(PROTO + tls_with("{cert: certs/gw.pem, key: certs/im.key}"))
    result = run_cli("check", "-c", str(workdir / "bad.yaml"))
    assert result.returncode == 1
    expected = re.escape(f"{workdir / 'bad.yaml'}:5:7: tls.certificates[0]: ") + message_pattern(
        workdir, "the key {certs/im.key} does not match the certificate {certs/gw.pem}"
    )
    assert any(re.fullmatch(expected, line) for line in result.stderr.splitlines()), result.stderr


# ---------------------------------------------------------------- expiry and version


def test_seconds_left_is_the_leaf_not_after_minus_now(workdir, pems):
    table = load(workdir, tls_with(GW, IM))
    assert table.certificates is not None
    for certificate, stem in zip(table.certificates.certificates, ("gw", "im"), strict=True):
        leaf = x509.load_pem_x509_certificate(pems[stem])
        assert certificate.not_after == leaf.not_valid_after_utc.timestamp()
        now = time.time()
        assert certificate.seconds_left(now) == certificate.not_after - now
        assert certificate.seconds_left(now + 100) == certificate.not_after - now - 100
    gw, im = table.certificates.certificates
    assert gw.seconds_left() == pytest.approx(90 * DAY, abs=600)
    assert im.seconds_left() == pytest.approx(60 * DAY, abs=600)


def test_a_new_certificate_file_is_a_new_table_version(workdir):
    text = tls_with(GW, IM)
    first = load(workdir, text)
    assert load(workdir, text).version == first.version  # the same files: the same version
    certs = workdir / "certs"
    shutil.copy(certs / "gw2.pem", certs / "gw.pem")
    shutil.copy(certs / "gw2.key", certs / "gw.key")
    rotated = load(workdir, text)
    assert rotated.version != first.version
    assert rotated.certificates is not None
    assert rotated.certificates.certificates[0].seconds_left() == pytest.approx(120 * DAY, abs=600)
    # And the second entry's file counts as much as the first's.
    shutil.copy(certs / "gw2.pem", certs / "gw.pem")
    shutil.copy(certs / "soon.pem", certs / "im.pem")
    shutil.copy(certs / "soon.key", certs / "im.key")
    assert load(workdir, text).version not in (first.version, rotated.version)


# ---------------------------------------------------------------- SNI


@pytest.fixture
def chosen(workdir):
    """gw (default), a wildcard-only entry, and an exact name inside the wildcard."""
    table = load(
        workdir,
        tls_with(
            GW,
            '{cert: certs/im.pem, key: certs/im.key, server_names: ["*.im.example.com",'
            " im.example.com]}",
            "{cert: certs/gw2.pem, key: certs/gw2.key, server_names: [special.im.example.com,"
            " gw2.example.com]}",
        ),
    )
    assert table.certificates is not None
    gw, im, gw2 = (c.context for c in table.certificates.certificates)
    return table.certificates, gw, im, gw2


@pytest.mark.parametrize(
    ("name", "which"),
    [
        ("im.example.com", "im"),
        ("a.im.example.com", "im"),  # the wildcard
        ("A.IM.Example.COM", "im"),  # names are not case-sensitive
        ("a.im.example.com.", "im"),  # a fully qualified name's dot
        ("special.im.example.com", "gw2"),  # an exact name wins over the wildcard
        ("SPECIAL.im.example.com", "gw2"),
        ("gw2.example.com", "gw2"),
        ("a.b.im.example.com", "gw"),  # a wildcard covers one label only
        ("x.special.im.example.com", "gw"),
        ("example.com", "gw"),
        ("nowhere.test", "gw"),  # unknown: the first
        ("localhost", "gw"),
        ("", "gw"),
        (None, "gw"),  # no SNI: the first
    ],
)
def test_context_for_chooses_by_name(chosen, name, which):
    certificates, gw, im, gw2 = chosen
    assert certificates.context_for(name) is {"gw": gw, "im": im, "gw2": gw2}[which]


def test_no_certificates_is_refused():
    with pytest.raises(ValueError, match="at least one certificate"):
        ServerCertificates([])


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str | None) -> ssl.SSLObject:
    """A TLS handshake in memory; returns the client's end once both are done."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_hostname=name)
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, end in (("client", client_end), ("server", server_end)):
            if not done[side]:
                try:
                    end.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            server_in.write(to_server.read())
            to_client.write(server_out.read())
        if all(done.values()):
            return client_end
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("im.example.com", "im"),
        ("chat.im.example.com", "im"),
        ("special.im.example.com", "gw2"),
        ("a.b.im.example.com", "gw"),
        ("unknown.test", "gw"),
        (None, "gw"),
    ],
)
def test_the_handshake_serves_the_certificate_sni_chooses(chosen, workdir, pems, name, stem):
    certificates, *_ = chosen
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=workdir / "certs" / "ca.pem")
    client.set_alpn_protocols(["h2", "http/1.1"])
    end = _handshake(certificates.context, client, name)
    assert end.getpeercert(binary_form=True) == der_of(pems[stem])
    assert end.selected_alpn_protocol() == "http/1.1"
    assert end.version() in ("TLSv1.2", "TLSv1.3")

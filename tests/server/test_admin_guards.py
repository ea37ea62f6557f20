"""The admin listener's guards (tlvproxy.server.admin): the Host rule, the
Content-Type rule and the bearer token, in the order docs/reference.md
("Admin listener") gives them. tests/ops/test_admin.py runs the same rules
through a real `tlvproxy serve`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tlvproxy.config.model import Address, Readiness
from tlvproxy.server.admin import AdminHandler, content_type_is_json, host_allowed
from tlvproxy.server.http_conn import Request

LOOPBACK = Address("127.0.0.1", 9180)
ANY_V4 = Address("0.0.0.0", 9180)
ANY_V6 = Address("::", 9180)
POD = Address("10.0.0.5", 9180)
LINK_LOCAL = Address("fe80::1%eth0", 9180)

TOKEN = "s3cret-token"


# ------------------------------------------------------------ the Host rule


@pytest.mark.parametrize(
    "host",
    [
        None,  # HTTP/1.0 without Host: no browser sends that
        "localhost",
        "localhost:9180",
        "localhost:1",
        "localhost:",  # RFC 3986 allows an empty port
        "LOCALHOST",
        "LocalHost:9180",
        "127.0.0.1",
        "127.0.0.1:9180",
        "127.255.1.2:80",
        "[::1]",
        "[::1]:9180",
        "[0:0:0:0:0:0:0:1]:9180",
    ],
)
def test_loopback_names_and_addresses_pass(host):
    for bound in (LOOPBACK, ANY_V4, ANY_V6, POD):
        assert host_allowed(host, bound), (host, bound)


@pytest.mark.parametrize(
    "host",
    [
        "",
        " ",
        "evil.example",
        "evil.example:9180",
        "localhost.evil.example",
        "localhost.evil.example:9180",
        "127.0.0.1.evil.example",
        "127.0.0.1.nip.io:9180",
        "localhost.",  # the rule names `localhost` exactly
        "foo.localhost",
        "0x7f.0.0.1",  # non-canonical IPv4 forms are names, and names are refused
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "2130706433",
        "127.000.000.001",
        "local host",
        "localhost ",
        " localhost",
        "localhost\r\nX: y",
        "a@127.0.0.1",
        "a@localhost:9180",
        "localhost:9180@evil.example",
        "l\u043ecalhost",  # a Cyrillic "o"
        "localhost\u00e9",
        "\u00e9vil.example",
        "localhost:99999",
        "localhost:123456",
        "localhost:9180:1",
        "localhost:-1",
        "localhost:0x10",
        "::1",
        "[::1",
        "::1]:9180",
        "[::1]x",
        "[localhost]",
        "[127.0.0.1]",
        "[::1%25lo]",
        "http://localhost",
        "localhost/admin",
        "*",
    ],
)
def test_names_and_malformed_values_are_refused(host):
    for bound in (LOOPBACK, ANY_V4, ANY_V6, POD):
        assert not host_allowed(host, bound), (host, bound)


@pytest.mark.parametrize("host", ["10.0.0.5", "10.0.0.5:9180", "10.0.0.5:8080"])
def test_the_bound_address_passes_with_any_port(host):
    assert host_allowed(host, POD)
    assert not host_allowed(host, LOOPBACK)


@pytest.mark.parametrize("host", ["10.0.0.6:9180", "[2001:db8::5]:9180", "[::ffff:10.0.0.5]:9180"])
def test_another_address_is_refused_on_a_specific_bind(host):
    assert not host_allowed(host, POD)


@pytest.mark.parametrize(
    "host", ["10.1.2.3", "10.1.2.3:9180", "192.0.2.7:1", "[2001:db8::1]:9180", "[::ffff:1.2.3.4]"]
)
def test_any_address_bind_takes_any_ip_literal(host):
    assert host_allowed(host, ANY_V4)
    assert host_allowed(host, ANY_V6)
    assert not host_allowed(host, LOOPBACK)


def test_a_link_local_bind_matches_without_its_zone():
    assert host_allowed("[fe80::1]:9180", LINK_LOCAL)
    assert not host_allowed("[fe80::2]:9180", LINK_LOCAL)


def test_the_host_rule_is_the_same_for_ipv6_loopback_binds():
    bound = Address("::1", 9180)
    assert host_allowed("[::1]:9180", bound)
    assert host_allowed("localhost:9180", bound)
    assert not host_allowed("10.0.0.5:9180", bound)


# ------------------------------------------------------------ the Content-Type rule


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/json;charset=UTF-8", True),
        ("Application/JSON", True),
        ("  application/json\t; x=y", True),
        (None, False),
        ("", False),
        ("text/plain", False),
        ("text/plain; charset=utf-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/json-patch+json", False),
        ("application/jsonx", False),
        ("application/json, text/plain", False),
        ("text/plain; a=application/json", False),
        ("application/\u00e9json", False),
    ],
)
def test_content_type_is_json(value, expected):
    assert content_type_is_json(value) is expected


# ------------------------------------------------------------ the handler's order


class Backend:
    """The two attributes the guards and the probes read; counts reloads."""

    def __init__(self, token: str | None) -> None:
        self.table = SimpleNamespace(admin_token=token, readiness=Readiness())
        self.ready = True
        self.reloads = 0

    def metrics_exposition(self) -> bytes:
        return b"# metrics\n"

    def upstream_states(self):
        return {}

    async def reload(self) -> str:
        self.reloads += 1
        return "v2"


def request(method, path, *headers, version="1.1"):
    return Request(
        method=method,
        target=path,
        path=path,
        query_string="",
        headers=tuple((name.lower(), value) for name, value in headers),
        body=b"",
        http_version=version,
        remote_addr="127.0.0.1",
        received_at=0.0,
    )


HOST = ("Host", "localhost:9180")
BEARER = ("Authorization", f"Bearer {TOKEN}")
JSON = ("Content-Type", "application/json")


def code(response):
    return response.status, json.loads(response.body).get("error", {}).get("code")


async def test_host_then_token_then_content_type():
    backend = Backend(TOKEN)
    admin = AdminHandler(backend, bound=LOOPBACK)
    evil = ("Host", "evil.example")

    assert code(await admin(request("POST", "/admin/reload", evil))) == (403, "forbidden")
    assert code(await admin(request("POST", "/admin/reload", evil, BEARER, JSON))) == (
        403,
        "forbidden",
    )
    assert code(await admin(request("POST", "/admin/reload", HOST))) == (401, "unauthorized")
    assert code(await admin(request("POST", "/admin/reload", HOST, BEARER))) == (
        415,
        "unsupported_media_type",
    )
    assert backend.reloads == 0
    answer = await admin(request("POST", "/admin/reload", HOST, BEARER, JSON))
    assert answer.status == 200
    assert backend.reloads == 1


async def test_401_names_the_scheme():
    admin = AdminHandler(Backend(TOKEN), bound=LOOPBACK)
    answer = await admin(request("GET", "/metrics", HOST))
    assert answer.status == 401
    assert ("WWW-Authenticate", 'Bearer realm="tlvproxy-admin"') in answer.headers


@pytest.mark.parametrize(
    "value",
    [
        "Bearer s3cret-t\u00f6ken",  # latin-1 decoded bytes, as the parsers give them
        "Bearer \u20ac",  # not latin-1 at all: no parser makes it, still no exception
        f"Bearer {TOKEN}\u00e9",
        f"Basic {TOKEN}",
        f"Bearer{TOKEN}",
        TOKEN,
        "Bearer",
        "",
    ],
)
async def test_wrong_or_odd_authorization_is_401(value):
    admin = AdminHandler(Backend(TOKEN), bound=LOOPBACK)
    answer = await admin(request("GET", "/admin/config", HOST, ("Authorization", value)))
    assert code(answer) == (401, "unauthorized")


async def test_a_non_ascii_token_matches_its_utf8_bytes():
    token = "s\u00e9cret"
    admin = AdminHandler(Backend(token), bound=LOOPBACK)
    sent = ("Bearer " + token).encode().decode("latin-1")  # what the parser hands over
    answer = await admin(request("GET", "/metrics", HOST, ("Authorization", sent)))
    assert answer.status == 200


async def test_probes_need_no_token_but_other_methods_on_them_do():
    admin = AdminHandler(Backend(TOKEN), bound=LOOPBACK)
    for path in ("/healthz", "/readyz"):
        assert (await admin(request("GET", path, HOST))).status == 200
        assert (await admin(request("HEAD", path, HOST))).status == 200
        assert (await admin(request("POST", path, HOST, JSON))).status == 401
        assert (await admin(request("POST", path, HOST, BEARER, JSON))).status == 405


async def test_the_probes_are_host_checked_too():
    admin = AdminHandler(Backend(None), bound=LOOPBACK)
    assert code(await admin(request("GET", "/healthz", ("Host", "evil.example")))) == (
        403,
        "forbidden",
    )
    assert (await admin(request("GET", "/healthz", version="1.0"))).status == 200


async def test_two_content_types_are_415():
    backend = Backend(None)
    admin = AdminHandler(backend, bound=LOOPBACK)
    answer = await admin(
        request("POST", "/admin/reload", HOST, JSON, ("Content-Type", "text/plain"))
    )
    assert code(answer) == (415, "unsupported_media_type")
    assert "Content-Type: application/json" in json.loads(answer.body)["error"]["message"]
    assert backend.reloads == 0


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_a_preflight_is_never_approved(token):
    admin = AdminHandler(Backend(token), bound=LOOPBACK)
    for path in ("/admin/reload", "/admin/config", "/metrics", "/healthz", "/nowhere"):
        answer = await admin(
            request(
                "OPTIONS",
                path,
                HOST,
                ("Origin", "http://evil.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type, authorization"),
            )
        )
        assert answer.status in (401, 404, 405), (path, answer)
        assert not [n for n, _ in answer.headers if n.lower().startswith("access-control-")]

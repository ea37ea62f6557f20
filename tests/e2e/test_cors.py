"""CORS (docs/configuration.md "cors"): preflights answered before routing, and
the headers an allowed page's answers carry; with both parsers, the real gateway
and the real mock upstream."""

from __future__ import annotations

import pytest

from tests.e2e.client import fetch

PARTNER = "https://partner.example"
CORS = {"origins": [PARTNER], "credentials": True, "max_age": "10m"}


@pytest.fixture
async def cors_gateway(gateways):
    return await gateways.start(cors=CORS)


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type, authorization",
    }


async def test_a_preflight_is_answered_before_routing(cors_gateway):
    # /v1/messages has no OPTIONS route: the preflight is answered all the same.
    answer = await fetch(
        cors_gateway.http_address, "OPTIONS", "/v1/messages", None, preflight(PARTNER)
    )
    assert answer.status == 204
    assert answer.body == b""
    headers = answer.headers
    assert headers["access-control-allow-origin"] == PARTNER
    assert headers["access-control-allow-methods"] == "GET, POST, PUT, PATCH, DELETE"
    assert headers["access-control-allow-headers"] == "authorization, content-type, x-request-id"
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-max-age"] == "600"
    assert "Origin" in headers["vary"]
    assert headers["x-request-id"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (preflight("https://evil.example"), "'https://evil.example' are not allowed"),
        (preflight(PARTNER, "TRACE"), "'TRACE' requests are not allowed"),
    ],
)
async def test_a_preflight_of_another_origin_or_method_is_refused(cors_gateway, headers, message):
    answer = await fetch(cors_gateway.http_address, "OPTIONS", "/v1/messages", None, headers)
    assert answer.status == 403
    error = answer.json()["error"]
    assert error["code"] == "forbidden"
    assert message in error["message"]
    assert "access-control-allow-origin" not in answer.headers


async def test_answers_to_an_allowed_page_carry_the_cors_headers(cors_gateway):
    answer = await fetch(
        cors_gateway.http_address, "GET", "/v1/users/3/profile", None, {"Origin": PARTNER}
    )
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == PARTNER
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
    assert answer.headers["vary"] == "Origin"
    # Errors too: the page must be able to read why it failed.
    missing = await fetch(cors_gateway.http_address, "GET", "/nowhere", None, {"Origin": PARTNER})
    assert missing.status == 404
    assert missing.headers["access-control-allow-origin"] == PARTNER


async def test_other_pages_and_plain_clients_get_no_cors_headers(cors_gateway):
    other = await fetch(
        cors_gateway.http_address,
        "GET",
        "/v1/users/3/profile",
        None,
        {"Origin": "https://x.example"},
    )
    plain = await fetch(cors_gateway.http_address, "GET", "/v1/users/3/profile")
    for answer in (other, plain):
        assert answer.status == 200
        assert not any(name.startswith("access-control-") for name in answer.headers)


async def test_without_cors_an_options_request_is_routed_as_before(gateway):
    answer = await fetch(gateway.http_address, "OPTIONS", "/v1/messages", None, preflight(PARTNER))
    assert answer.status == 405
    assert "access-control-allow-origin" not in answer.headers

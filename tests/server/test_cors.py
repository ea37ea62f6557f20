"""The CORS answers as values (docs/configuration.md "cors")."""

from __future__ import annotations

import pytest

from tlvproxy.config.model import CorsSpec
from tlvproxy.errors import Forbidden
from tlvproxy.server import cors


def test_any_origin_is_star_and_never_echoed():
    spec = CorsSpec(origins=("*",))
    assert cors.answer_headers(spec, "https://a.example")[0] == ("Access-Control-Allow-Origin", "*")
    assert ("Access-Control-Allow-Credentials", "true") not in cors.answer_headers(spec, "x")


def test_the_echoed_origin_is_one_of_the_table():
    spec = CorsSpec(origins=("https://a.example",))
    assert cors.answer_headers(spec, "https://a.example.evil") is None
    assert cors.answer_headers(spec, "https://A.example") is None  # browsers send lower case
    with pytest.raises(Forbidden):
        cors.preflight_headers(spec, "null", "GET")

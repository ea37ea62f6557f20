"""The web IM demo's static files at /demo/ (tlvproxy.server.static)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlvproxy.server.static import demo_files, demo_response

PAGE = Path(__file__).resolve().parents[2] / "tlvproxy" / "demo_page"


def header(response, name):
    return dict(response.headers)[name]


def test_the_index_is_served_at_the_prefix():
    response = demo_response("/demo/")
    assert response is not None
    assert response.status == 200
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    assert response.body == (PAGE / "index.html").read_bytes()
    assert b'<script src="app.js" defer></script>' in response.body


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("index.html", "text/html; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ],
)
def test_each_file_has_its_content_type(name, content_type):
    response = demo_response(f"/demo/{name}")
    assert response is not None
    assert response.status == 200
    assert header(response, "Content-Type") == content_type
    assert response.body == (PAGE / name).read_bytes()
    assert header(response, "X-Content-Type-Options") == "nosniff"
    assert "default-src 'self'" in header(response, "Content-Security-Policy")


def test_the_bare_prefix_redirects_to_the_directory():
    response = demo_response("/demo")
    assert response is not None
    assert response.status == 308
    assert header(response, "Location") == "/demo/"
    assert response.body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/messages",
        "/demonstration",
        "/demo/missing.js",
        "/demo/../cli.py",
        "/demo/../../pyproject.toml",
        "/demo//etc/passwd",
        "/demo/sub/app.js",
        "/demo/%2e%2e/cli.py",
        "/DEMO/",
    ],
)
def test_other_paths_are_left_to_routing(path):
    assert demo_response(path) is None


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
def test_only_get_is_answered(method):
    assert demo_response("/demo/", method) is None
    assert demo_response("/demo/app.js", method) is None


def test_the_listing_is_exactly_the_page_files():
    assert demo_files() == {
        "index.html": "text/html; charset=utf-8",
        "app.js": "text/javascript; charset=utf-8",
        "style.css": "text/css; charset=utf-8",
    }


def test_the_page_uses_nothing_outside_the_gateway():
    # No CDN: nothing outside the machine is reachable, and the CSP forbids it anyway.
    for name in demo_files():
        text = (PAGE / name).read_text()
        assert "http://" not in text
        assert "https://" not in text
        assert "<script>" not in text  # no inline script: the CSP would block it

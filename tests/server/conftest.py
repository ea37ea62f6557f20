"""Fixtures shared by the HTTP connection tests."""

from __future__ import annotations

import pytest

from tlvproxy.server.http_conn import HttpSettings


@pytest.fixture(params=["h11", "httptools"])
def settings(request):
    """Small limits, each parser in turn."""
    return HttpSettings(
        max_header_bytes=1024,
        max_request_body=4096,
        header_timeout=5.0,
        keepalive_timeout=20.0,
        parser=request.param,
    )

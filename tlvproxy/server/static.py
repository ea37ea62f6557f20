"""The web IM demo's static files at /demo/ (served when the table has `demo: true`).

Owns: mapping GET paths under /demo/ to the files packaged in
`tlvproxy/demo_page/`, with their content types and headers.
Must not: do network I/O, know about routes or commands, or serve anything but
the package's own files: a name is looked up in the listing of the package
directory, so no path (`..`, encoded slashes) can reach outside it.

Anything that is not a packaged file (another path, an unknown name, a method
other than GET) gets None, so the REST handler routes it as usual and a miss is
the ordinary `route_not_found` answer (docs/reference.md "Errors"), with its
request id.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Final

from tlvproxy.server.http_conn import Response

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEMO_PREFIX: Final = "/demo/"
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_HEADERS: Final = (
    # The files are tiny; revalidating means an upgraded gateway's page shows at once.
    ("Cache-Control", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
    # Everything the page uses comes from the gateway itself: no CDN, no inline script.
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:"),
)


def _directory() -> Traversable:
    # Package data of `tlvproxy` (pyproject.toml), not a package of its own.
    return resources.files("tlvproxy").joinpath("demo_page")


def demo_files() -> dict[str, str]:
    """The demo page's file names and their content types."""
    files: dict[str, str] = {}
    for entry in _directory().iterdir():
        _, dot, suffix = entry.name.rpartition(".")
        content_type = _TYPES.get(dot + suffix)
        if dot and content_type is not None and entry.is_file():
            files[entry.name] = content_type
    return files


def demo_response(path: str, method: str = "GET") -> Response | None:
    """The answer for GET of a demo path, or None when it is not one.

    `/demo` redirects (308) to `/demo/`; `/demo/` is `index.html`; `/demo/NAME`
    is that packaged file. `path` is the decoded path without the query.
    """
    if method != "GET":
        return None
    if path == DEMO_PREFIX.rstrip("/"):
        return Response(status=308, headers=[("Location", DEMO_PREFIX), *_HEADERS])
    if not path.startswith(DEMO_PREFIX):
        return None
    name = path[len(DEMO_PREFIX) :] or "index.html"
    content_type = demo_files().get(name)
    if content_type is None:
        return None
    body = _directory().joinpath(name).read_bytes()
    return Response(status=200, headers=[("Content-Type", content_type), *_HEADERS], body=body)

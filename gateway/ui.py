"""The run timeline page on the internal listener.

    GET /ui                 the page: a single-page app over the admin API (list and run view,
                            chosen by the URL hash: /ui#/runs?status=failed, /ui#/runs/{id})
    GET /ui/static/{name}   its stylesheet, script and icon, from gateway/static/

The page is plain HTML, CSS and JavaScript shipped inside the package: no CDN, no build step.
It holds no data of its own; the script reads `/v1/runs` with the operator's admin token (kept in
sessionStorage), so the page needs no authentication of its own and exposes nothing the admin API
does not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from aiohttp import web

from gateway.problem import problem

# Only these files are served; a name is looked up here, never joined onto a path, so no request
# can reach anything else in the package.
_ASSETS: Final = {
    "ui.css": "text/css; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_PAGE: Final = "index.html"

# Everything the page loads or calls is same-origin. No inline script or style is allowed, so data
# that slipped past the script's escaping still could not run; frames and <base> are refused.
CSP: Final = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
    "object-src 'none'"
)
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (the ETag makes that cheap), so an upgraded gateway never serves a
    # page with a stale script.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _load(name: str, content_type: str) -> _File:
    body = (resources.files("gateway") / "static" / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return _File(body, content_type, etag)


def _serve(request: web.Request, file: _File) -> web.Response:
    headers = {**_SECURITY_HEADERS, "ETag": file.etag}
    if file.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers=headers | {"Content-Type": file.content_type})


class _Files:
    """The page and its assets, read from the package once when the routes are added."""

    def __init__(self) -> None:
        self.page = _load(_PAGE, "text/html; charset=utf-8")
        self.assets = {name: _load(name, kind) for name, kind in _ASSETS.items()}

    async def index(self, request: web.Request) -> web.StreamResponse:
        return _serve(request, self.page)

    async def asset(self, request: web.Request) -> web.StreamResponse:
        file = self.assets.get(request.match_info["name"])
        if file is None:
            return problem(404, detail="no such file")
        return _serve(request, file)


async def _to_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/ui")


def add_routes(app: web.Application) -> None:
    files = _Files()
    app.router.add_get("/ui", files.index)
    app.router.add_get("/ui/", _to_page)
    app.router.add_get("/ui/static/{name:.*}", files.asset)

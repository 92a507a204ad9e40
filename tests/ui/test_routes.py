"""The timeline page's HTTP surface, without a browser: what is served, where, with what."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory

STATIC = Path(__file__).resolve().parents[2] / "gateway" / "static"


async def test_page_is_html_with_a_restrictive_csp(gateway: GatewayFactory) -> None:
    gw = await gateway([])
    async with gw.session.get(gw.internal + "/ui") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp
        assert "unsafe" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        page = await resp.text()
    assert '<script src="/ui/static/ui.js"' in page


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("ui.js", "text/javascript; charset=utf-8"),
        ("ui.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
async def test_assets_have_their_content_types_and_revalidate(
    gateway: GatewayFactory, name: str, content_type: str
) -> None:
    gw = await gateway([])
    async with gw.session.get(gw.internal + "/ui/static/" + name) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == content_type
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert await resp.read() == (STATIC / name).read_bytes()
        etag = resp.headers["ETag"]
    async with gw.session.get(
        gw.internal + "/ui/static/" + name, headers={"If-None-Match": etag}
    ) as resp:
        assert resp.status == 304
        assert await resp.read() == b""


async def test_everything_the_page_loads_is_served_by_the_gateway(gateway: GatewayFactory) -> None:
    gw = await gateway([])
    page = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert len(refs) >= 3  # icon, stylesheet, script
    for ref in refs:
        assert ref.startswith("/ui/static/"), ref  # no CDN, nothing off-origin
        async with gw.session.get(gw.internal + ref) as resp:
            assert resp.status == 200, ref


@pytest.mark.parametrize(
    "path",
    [
        "/ui/static/nope.js",
        "/ui/static/index.html",
        "/ui/static/..%2Fui.py",
        "/ui/static/%2E%2E%2F__init__.py",
        "/ui/static/",
        "/ui/static/a/ui.js",
    ],
)
async def test_only_known_files_are_served(gateway: GatewayFactory, path: str) -> None:
    gw = await gateway([])
    async with gw.session.get(gw.internal + path) as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/problem+json"
        body = await resp.read()
    assert b"import" not in body


async def test_page_is_not_on_the_public_listener(gateway: GatewayFactory) -> None:
    gw = await gateway([])
    for path in ("/ui", "/ui/static/ui.js"):
        async with gw.session.get(gw.url + path) as resp:
            assert resp.status == 404
            assert resp.headers["Content-Type"] == "application/problem+json"


async def test_trailing_slash_redirects_to_the_page(gateway: GatewayFactory) -> None:
    gw = await gateway([])
    async with gw.session.get(gw.internal + "/ui/", allow_redirects=False) as resp:
        assert resp.status == 308
        assert resp.headers["Location"] == "/ui"


def test_script_never_parses_data_as_html() -> None:
    # Escaping is structural: every value goes through textContent or setAttribute. These sinks
    # would turn a step output into markup, so the script must not use them at all.
    script = (STATIC / "ui.js").read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ):
        assert sink not in script, sink

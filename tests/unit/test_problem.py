from __future__ import annotations

import json

from aiohttp import web

from gateway.problem import CONTENT_TYPE, problem, reason_phrase


def _body(response: web.Response) -> dict[str, object]:
    assert isinstance(response.body, bytes)
    data = json.loads(response.body)
    assert isinstance(data, dict)
    return data


def test_defaults_follow_rfc9457_about_blank() -> None:
    response = problem(404)
    assert response.status == 404
    assert response.content_type == CONTENT_TYPE == "application/problem+json"
    assert _body(response) == {"type": "about:blank", "title": "Not Found", "status": 404}


def test_title_detail_extensions_and_headers() -> None:
    response = problem(
        405, "Nope", "use GET", headers={"Allow": "GET, HEAD"}, run_id="r1", allowed=["GET"]
    )
    assert response.headers["Allow"] == "GET, HEAD"
    assert _body(response) == {
        "type": "about:blank",
        "title": "Nope",
        "status": 405,
        "detail": "use GET",
        "run_id": "r1",
        "allowed": ["GET"],
    }


def test_type_may_be_overridden_and_body_is_compact_utf8() -> None:
    response = problem(409, detail="déjà fini", type="https://stepgate.dev/problems/ended")
    assert isinstance(response.body, bytes)
    assert b": " not in response.body and b", " not in response.body
    assert "déjà".encode() in response.body
    assert _body(response)["type"] == "https://stepgate.dev/problems/ended"


def test_unregistered_status_gets_a_placeholder_title() -> None:
    assert reason_phrase(599) == "Unknown"
    assert _body(problem(599))["title"] == "Unknown"
    assert reason_phrase(502) == "Bad Gateway"

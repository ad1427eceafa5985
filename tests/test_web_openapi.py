"""``{mount}/api/openapi.json``: served by every framework, and listing exactly what it serves.

The routes are read from the apps' own routers (Starlette's and FastAPI's mounted app, Flask's
URL map), not from llm-tally's route table: a route registered in an adapter without an
entry in the document fails here.
"""

from __future__ import annotations

import re
from typing import Any

import flask
import jsonschema_rs
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from llm_tally import Tally
from llm_tally.web.openapi import SCHEMAS, VERSION, document
from llm_tally.web.routes import ROUTES

from .web_support import ADMIN, MOUNT, SECURED, fastapi_app, flask_app, starlette_app

FRAMEWORKS = ("starlette", "fastapi", "flask")


def build(framework: str, tally: Tally, **init: Any) -> Any:
    makers = {"starlette": starlette_app, "fastapi": fastapi_app, "flask": flask_app}
    return makers[framework](tally, **init)


def get(app: Any, path: str, headers: dict[str, str] | None = None, **environ: Any) -> Any:
    """(status, JSON or text) of ``GET path`` on a Flask or ASGI app, in process."""
    if isinstance(app, flask.Flask):
        # The app as mounted under SCRIPT_NAME (e.g. by a WSGI server or a dispatcher).
        base = f"http://localhost{environ.get('SCRIPT_NAME', '')}"
        response = app.test_client().get(path, headers=headers or {}, base_url=base)
        return response.status_code, response.get_json(silent=True) or response.get_data(True)
    with TestClient(app, raise_server_exceptions=False, **environ) as client:
        answer = client.get(path, headers=headers or {})
        try:
            return answer.status_code, answer.json()
        except ValueError:
            return answer.status_code, answer.text


def served_routes(app: Any, mount: str = MOUNT) -> dict[str, set[str]]:
    """Path template (OpenAPI syntax, relative to the mount) -> methods, from the app's router."""
    if isinstance(app, flask.Flask):
        served: dict[str, set[str]] = {}
        for rule in app.url_map.iter_rules():
            if not rule.endpoint.startswith("llm_tally."):
                continue
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule).removeprefix(mount)
            served[path] = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
        return served
    [mounted] = [r for r in app.routes if isinstance(r, Mount) and r.path == mount]
    return {
        route.path_format: set(route.methods or ()) - {"HEAD"}
        for route in mounted.routes  # type: ignore[attr-defined]
    }


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_document_lists_exactly_the_routes_the_app_serves(tally: Tally, framework: str) -> None:
    app = build(framework, tally, **SECURED)
    status, doc = get(app, f"{MOUNT}/api/openapi.json", ADMIN)
    assert status == 200
    assert doc["openapi"] == VERSION
    served = served_routes(app)
    assert set(doc["paths"]) == set(served), "a route is served without documentation, or not"
    for path, methods in served.items():
        assert methods == {"GET"}, path
        assert set(doc["paths"][path]) == {"get"}, path
    assert doc == document(MOUNT), "the same document on every framework"


def test_the_document_is_valid_openapi_with_valid_json_schemas() -> None:
    doc = document(MOUNT)
    ids = [op["get"]["operationId"] for op in doc["paths"].values()]
    assert len(ids) == len(set(ids)) == len(ROUTES)
    for name, schema in SCHEMAS.items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for path, item in doc["paths"].items():
        operation = item["get"]
        placeholders = set(re.findall(r"{([^}]+)}", path))
        parameters = operation.get("parameters", [])
        in_path = {p["name"] for p in parameters if p["in"] == "path"}
        assert in_path == placeholders, path
        for parameter in parameters:
            assert parameter["in"] in ("query", "path")
            assert parameter["description"], (path, parameter["name"])
            assert jsonschema_rs.meta.is_valid(parameter["schema"]), (path, parameter["name"])
            if parameter["in"] == "path":
                assert parameter["required"] is True
        assert "200" in operation["responses"], path
        access = "401" if operation["x-llm-tally-access"] == "caller" else "403"
        assert access in operation["responses"], path
        for status, response in operation["responses"].items():
            for media in response["content"].values():
                ref = media["schema"].get("$ref")
                if ref is not None:
                    assert ref.removeprefix("#/components/schemas/") in SCHEMAS, (path, status)
    # Only /api/me is answered on the caller's own sign-in instead of authorize().
    callers = [
        p for p, item in doc["paths"].items() if item["get"]["x-llm-tally-access"] != "authorize"
    ]
    assert callers == ["/api/me"]


def test_documented_limits_are_the_ones_the_endpoint_enforces(tally: Tally) -> None:
    """The numbers in the document are those the handlers check (one source for both)."""
    app = starlette_app(tally, **SECURED)
    doc = document(MOUNT)

    def schema(path: str, name: str) -> dict[str, Any]:
        [found] = [p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == name]
        return dict(found["schema"])

    limit = schema("/api/users", "limit")
    for value, ok in ((limit["maximum"], True), (limit["maximum"] + 1, False), (0, False)):
        status, _ = get(app, f"{MOUNT}/api/users?limit={value}", ADMIN)
        assert (status == 200) is ok, value
    user_id = schema("/api/users/{user_id}", "user_id")
    for length, ok in ((user_id["maxLength"], True), (user_id["maxLength"] + 1, False)):
        status, _ = get(app, f"{MOUNT}/api/users/{'u' * length}", ADMIN)
        assert (status == 200) is ok, length
    order_by = schema("/api/users", "order_by")
    for value in order_by["enum"]:
        assert get(app, f"{MOUNT}/api/users?order_by={value}", ADMIN)[0] == 200
    assert get(app, f"{MOUNT}/api/users?order_by=name", ADMIN)[0] == 400
    key = schema("/api/by/{dimension}", "dimension")
    assert get(app, f"{MOUNT}/api/by/{'k' * key['maxLength']}", ADMIN)[0] == 200
    assert get(app, f"{MOUNT}/api/by/{'k' * (key['maxLength'] + 1)}", ADMIN)[0] == 400
    assert get(app, f"{MOUNT}/api/by/a%22b", ADMIN)[0] == 400  # '"' is outside the pattern
    assert not re.search(key["pattern"], 'a"b')


def test_server_url_is_the_mount_the_request_came_through(tally: Tally) -> None:
    moved = starlette_app(tally, **SECURED, mount_path="/usage/v2")
    assert get(moved, "/usage/v2/api/openapi.json", ADMIN)[1]["servers"] == [{"url": "/usage/v2"}]

    by_hand = Starlette()
    by_hand.mount("/internal/usage", tally.asgi_app(authorize=SECURED["authorize"]))
    doc = get(by_hand, "/internal/usage/api/openapi.json", ADMIN)[1]
    assert doc["servers"] == [{"url": "/internal/usage"}]
    root_path = get(moved, "/proxy/usage/v2/api/openapi.json", ADMIN, root_path="/proxy")[1]
    assert root_path["servers"] == [{"url": "/proxy/usage/v2"}]

    app = flask_app(tally, **SECURED)
    status, doc = get(app, "/llm-usage/api/openapi.json", ADMIN, SCRIPT_NAME="/shop")
    assert status == 200
    assert doc["servers"] == [{"url": "/shop/llm-usage"}]

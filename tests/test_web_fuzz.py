"""Fuzzing every route of ``/llm-usage`` from its own OpenAPI document (schemathesis).

Schemathesis reads ``{mount}/api/openapi.json`` from a real Starlette app, a real FastAPI app
and a real Flask app (each with ``init_app``, over a store full of awkward data), generates
requests for every route from the documented parameters, valid ones and invalid ones, sends
them in process, and checks each answer: never a 5xx, a documented status and media type,
and a body that matches the documented schema.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llm_tally import Tally
from llm_tally.web.routes import ROUTES

from .web_support import ADMIN, MOUNT, SECURED, fastapi_app, flask_app, seed, starlette_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Per route and per mode (valid / invalid input): 14 routes x 2 modes x this many requests.
EXAMPLES = 10


def load_schema(framework: str, tally: Tally) -> Any:
    path = f"{MOUNT}/api/openapi.json"
    if framework == "flask":
        return schemathesis.openapi.from_wsgi(path, flask_app(tally, **SECURED), headers=ADMIN)
    build = starlette_app if framework == "starlette" else fastapi_app
    return schemathesis.openapi.from_asgi(path, build(tally, **SECURED), headers=ADMIN)


def operations(schema: Any) -> Iterator[Any]:
    for result in schema.get_all_operations():
        yield result.ok()


def fuzz(schema: Any, examples: int) -> dict[str, int]:
    """Every operation in both modes; the statuses seen per operation, for the caller to check
    that the fuzzing reached the handlers."""
    seen: dict[str, int] = {}
    for operation in operations(schema):
        has_parameters = bool(operation.path_parameters or operation.query)
        modes = [GenerationMode.POSITIVE]
        if has_parameters:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            _runner(operation, mode, examples, seen)()
    return seen


def _runner(
    operation: Any, mode: GenerationMode, examples: int, seen: dict[str, int]
) -> Callable[[], None]:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        # /api/me answers the signed-in caller: half the time nobody is (401, documented).
        headers = (
            ADMIN
            if operation.path != "/api/me"
            else {"Authorization": "Bearer user:ann@example.com"}
        )
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        key = f"{operation.path} {response.status_code}"
        seen[key] = seen.get(key, 0) + 1

    return run


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_fuzzing_every_route_never_errors_and_matches_the_document(
    tally: Tally, framework: str
) -> None:
    seed(tally)
    schema = load_schema(framework, tally)
    seen = fuzz(schema, EXAMPLES)
    paths = {operation.path for operation in operations(schema)}
    # Schemathesis leaves out the document it was read from; reading it was the first request.
    assert paths == {route.path for route in ROUTES} - {"/api/openapi.json"}
    # Every route answered 200 at least once, and every route with parameters a 400 too.
    for path in paths:
        assert seen.get(f"{path} 200"), (path, seen)
    assert sum(count for key, count in seen.items() if key.endswith(" 400")) > 50, seen


@pytest.mark.postgres
def test_fuzzing_on_postgres(pg_url: str) -> None:
    with Tally(pg_url) as tally:
        seed(tally)
        seen = fuzz(load_schema("starlette", tally), 8)
    assert any(key.endswith(" 200") for key in seen)


# Values that random generation rarely reaches, each of which once answered 500: times that
# overflow once moved to UTC or to the next month, numbers longer than int() parses.
EDGE_VALUES = (
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0001-01-01",
    "9999-12-31",
    "2026-02-30",
    "2026-11-01T25:00",
    "\x00",
    "1e999999999",
    "NaN",
    "-0",
    "9" * 5000,
    "",
)


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_edge_values_of_every_documented_parameter_are_never_a_server_error(
    tally: Tally, framework: str
) -> None:
    seed(tally)
    build = flask_app if framework == "flask" else starlette_app
    app = build(tally, **SECURED)
    client = flask_client(app) if framework == "flask" else asgi_client(app)
    answered = 0
    for route in ROUTES:
        path = route.path.replace("{user_id}", "ann@example.com").replace("{dimension}", "plan")
        headers = (
            {"Authorization": "Bearer user:ann@example.com"} if route.access == "caller" else ADMIN
        )
        for param in route.params:
            if param.where != "query":
                continue
            for value in EDGE_VALUES:
                query = {"since": "2026-01-01", "until": "2026-12-01", param.name: value}
                status = client(f"{MOUNT}{path}", query, headers)
                assert status < 500, (framework, path, param.name, value[:40])
                answered += 1
    assert answered > 300


def flask_client(app: Any) -> Callable[[str, dict[str, str], dict[str, str]], int]:
    client = app.test_client()
    return lambda path, query, headers: (
        client.get(path, query_string=query, headers=headers).status_code
    )


def asgi_client(app: Any) -> Callable[[str, dict[str, str], dict[str, str]], int]:
    from starlette.testclient import TestClient

    client = TestClient(app, raise_server_exceptions=False)
    return lambda path, query, headers: client.get(path, params=query, headers=headers).status_code

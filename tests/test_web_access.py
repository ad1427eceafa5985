"""Who can read ``/llm-usage``: every route, from the OpenAPI document's own route list.

- Every route but ``/api/me`` (dashboard pages, JSON API, CSV export, ``/api/health``,
  ``/api/openapi.json``) refuses, with a 403 that carries no data, a client that is not on
  loopback, a loopback client that came through a proxy, and anyone a custom ``authorize``
  refuses (false, async false, or raising).
- ``/api/me`` answers the caller's own usage, and only theirs, whatever query parameters,
  headers or path tricks come with the request.

The servers are real (uvicorn, werkzeug) wherever the client's address matters.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import flask
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.testclient import TestClient

from llm_tally import Tally
from llm_tally.demo.serve import BackgroundServer
from llm_tally.web.openapi import document

from .conftest import serve_wsgi
from .web_support import (
    ADMIN,
    MOUNT,
    REVENUE,
    SECURED,
    XSS_USER,
    caller_of,
    fastapi_app,
    flask_app,
    seed,
    starlette_app,
)

FRAMEWORKS = ("starlette", "fastapi", "flask")
ALICE = "ann@example.com"
BOB = "bob/ops"
SAMPLE_PATH_VALUES = {"user_id": BOB, "dimension": "plan"}
PERIOD = "since=2000-01-01&until=2100-01-01"
PROXY_HEADERS = (
    {"X-Forwarded-For": "203.0.113.7"},
    {"Forwarded": "for=203.0.113.7"},
    {"X-Real-IP": "203.0.113.7"},
)


def build(framework: str, tally: Tally, **init: Any) -> Any:
    makers = {"starlette": starlette_app, "fastapi": fastapi_app, "flask": flask_app}
    return makers[framework](tally, **init)


def documented_routes() -> list[tuple[str, str]]:
    """(URL path under the mount with sample values, access) of every documented route."""
    routes = []
    for template, item in document(MOUNT)["paths"].items():
        path = template
        for name, value in SAMPLE_PATH_VALUES.items():
            path = path.replace(f"{{{name}}}", value.replace("/", "%2F"))
        routes.append((f"{MOUNT}{path}?{PERIOD}", item["get"]["x-llm-tally-access"]))
    return routes


ROUTES = documented_routes()
GUARDED = [path for path, access in ROUTES if access == "authorize"]
ME = [path for path, access in ROUTES if access == "caller"]


@contextmanager
def served(framework: str, app: Any) -> Iterator[str]:
    if framework == "flask":
        with serve_wsgi(app) as url:
            yield url
    else:
        with BackgroundServer(app) as server:
            yield server.url


def assert_refused(response: Any, status: int, secret: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and body["error"]
    assert secret not in response.text


@pytest.fixture
def store(tally: Tally) -> Tally:
    seed(tally)
    return tally


def test_every_documented_route_is_in_the_access_table() -> None:
    assert len(ROUTES) == len(document(MOUNT)["paths"]) >= 14
    assert any("/api/openapi.json" in path for path in GUARDED)
    assert any("/api/export.csv" in path for path in GUARDED)
    assert any("/api/health" in path for path in GUARDED)
    assert any(path.startswith(f"{MOUNT}/users/") for path in GUARDED)
    assert [path.split("?")[0] for path in ME] == [f"{MOUNT}/api/me"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_by_default_only_loopback_clients_through_no_proxy_get_in(
    store: Tally, framework: str
) -> None:
    app = build(framework, store, revenue=REVENUE)
    with served(framework, app) as url, httpx2.Client(base_url=url, timeout=30) as http:
        for path in GUARDED:
            # Direct from loopback: in (so the refusals below are the headers' doing).
            assert http.get(path).status_code == 200, path
            for headers in PROXY_HEADERS:
                assert_refused(http.get(path, headers=headers), 403, "bob")
        for path in ME:
            # Nobody signed in: 401 whatever the client's address.
            assert_refused(http.get(path), 401, "bob")
            assert_refused(http.get(path, headers=PROXY_HEADERS[0]), 401, "bob")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_by_default_a_client_off_loopback_is_refused_everywhere(
    store: Tally, framework: str
) -> None:
    app = build(framework, store, revenue=REVENUE)
    for address, status in (("203.0.113.9", 403), ("10.0.0.2", 403), ("127.0.0.1", 200)):
        get = client_from(app, address)
        for path in GUARDED:
            response = get(path, {})
            if status == 200:
                assert response.status_code == 200, path
            else:
                assert_refused(response, status, "bob")


def client_from(app: Any, address: str) -> Callable[[str, dict[str, str]], Any]:
    """``get(path, headers)`` on ``app`` in process, as the client at ``address``."""
    if isinstance(app, flask.Flask):
        client = app.test_client()
        return lambda path, headers: _FlaskAnswer(
            client.get(path, headers=headers, environ_base={"REMOTE_ADDR": address})
        )
    test_client = TestClient(app, raise_server_exceptions=True, client=(address, 50000))
    return lambda path, headers: test_client.get(path, headers=headers)


class _FlaskAnswer:
    """A werkzeug test response read like an httpx one."""

    def __init__(self, response: Any) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.text = response.get_data(as_text=True)

    def json(self) -> Any:
        return json.loads(self.text)


async def async_refuse(request: Request) -> bool:
    return False


def raising(request: Any) -> bool:
    raise PermissionError("the session store is down")


REFUSALS = [lambda request: False, raising, lambda request: 1]  # 1 is not True


@pytest.mark.parametrize(
    ("framework", "refuse"),
    [(f, r) for f in FRAMEWORKS for r in REFUSALS]
    + [("starlette", async_refuse), ("fastapi", async_refuse)],
)
def test_a_custom_authorize_that_refuses_closes_every_route_but_me(
    store: Tally, framework: str, refuse: Callable[[Any], Any]
) -> None:
    app = build(framework, store, authorize=refuse, identify=caller_of, revenue=REVENUE)
    get = client_from(app, "127.0.0.1")
    for path in GUARDED:
        assert_refused(get(path, {}), 403, "bob")
        assert_refused(get(path, ADMIN), 403, "bob")
    for path in ME:
        # /api/me does not ask authorize: it answers the signed-in caller, and only them.
        response = get(path, {"Authorization": f"Bearer user:{ALICE}"})
        assert response.status_code == 200
        assert response.json()["user_id"] == ALICE
        assert_refused(get(path, {}), 401, "bob")


# -- /api/me never shows another user's data ---------------------------------------------------

SPOOF_HEADERS = (
    "X-User-Id",
    "X-Forwarded-User",
    "X-Remote-User",
    "Remote-User",
    "X-Auth-Request-User",
    "Helicone-User-Id",
    "X-Llm-Tally-User",
)
SPOOF_PARAMS = ("user_id", "user", "id", "key", "me", "uid", "dimension", "as")
OTHERS = (BOB, XSS_USER, "Carol Smith", "1234", "*", "%", "' OR '1'='1")
# Ids of other users with data, distinctive enough to search for in an answer.
OTHER_USERS = (BOB, XSS_USER, "Carol Smith")


def me_answer(tally: Tally, caller: str) -> dict[str, Any]:
    """What /api/me must answer ``caller`` (for the period of :data:`PERIOD`: all time)."""
    totals = tally.user_totals(caller)
    assert totals.requests > 0, "the caller must have data for the test to mean anything"
    return {
        "user_id": caller,
        "requests": totals.requests,
        "cost_usd": format(totals.cost_usd, "f"),
    }


def check_me(response: Any, expected: dict[str, Any] | None, others: tuple[str, ...]) -> None:
    """A 200 is the caller's own data; anything else is a refusal without data."""
    if response.status_code == 200 and expected is not None:
        body = response.json()
        assert {k: body[k] for k in expected} == expected
        for other in others:
            assert json.dumps(other)[1:-1] not in response.text.replace(expected["user_id"], "")
    else:
        assert response.status_code in (400, 401, 404, 405), response.text[:300]
        for other in others:
            assert json.dumps(other)[1:-1] not in response.text


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_me_answers_only_the_callers_data_whatever_the_request_says(
    store: Tally, framework: str
) -> None:
    app = build(framework, store, **SECURED)
    expected = me_answer(store, ALICE)
    get = client_from(app, "203.0.113.9")  # off loopback: /api/me does not care

    @given(
        params=st.dictionaries(st.sampled_from(SPOOF_PARAMS), st.sampled_from(OTHERS), max_size=4),
        headers=st.dictionaries(
            st.sampled_from(SPOOF_HEADERS), st.sampled_from(OTHERS[:4]), max_size=3
        ),
        signed_in=st.booleans(),
    )
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def ask(params: dict[str, str], headers: dict[str, str], signed_in: bool) -> None:
        sent = {**headers, **({"Authorization": f"Bearer user:{ALICE}"} if signed_in else {})}
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        path = f"{MOUNT}/api/me?{PERIOD}" + (f"&{query}" if query else "")
        response = get(path, sent)
        if signed_in:
            assert response.status_code == 200, response.text[:300]
        check_me(response, expected if signed_in else None, OTHER_USERS)

    ask()
    # The other way round: bob sees bob, never ann.
    response = get(
        f"{MOUNT}/api/me?{PERIOD}&user_id={ALICE}", {"Authorization": f"Bearer user:{BOB}"}
    )
    check_me(response, me_answer(store, BOB), (ALICE,))


# Raw request targets, sent byte for byte (HTTP clients would normalise some of them).
PATH_TRICKS = (
    "/api/me/bob%2Fops",
    "/api/me/../users/bob%2Fops",
    "/api/me/..%2Fusers%2Fbob%2Fops",
    "/api/me%2F..%2Fusers%2Fbob%2Fops",
    "/api/me;user_id=bob%2Fops",
    "/api//me?user_id=bob%2Fops",
    "/api/./me?user_id=bob%2Fops",
    "/api/me?user_id=bob%2Fops&user_id=bob%2Fops",
    "/api/me?user_id[]=bob%2Fops",
    "/api/me%3Fuser_id=bob%2Fops",
    "/api/me%00bob%2Fops",
    "/api/me/",
)


def raw_get(url: str, target: str, headers: dict[str, str]) -> tuple[int, str]:
    """GET ``target`` exactly as written (no client-side normalisation) on a real server."""
    parts = urlsplit(url)
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_path_tricks_never_reach_another_users_data_through_me(
    store: Tally, framework: str
) -> None:
    app = build(framework, store, **SECURED)
    expected = me_answer(store, ALICE)
    alice = {"Authorization": f"Bearer user:{ALICE}"}
    with served(framework, app) as url:
        status, body = raw_get(url, f"{MOUNT}/api/me", alice)
        assert status == 200 and json.loads(body)["user_id"] == ALICE  # the baseline works
        for trick in PATH_TRICKS:
            status, body = raw_get(url, MOUNT + trick, alice)
            if status == 200:
                # Only the caller's own data (or a route that authorize already let in: none
                # here, alice is not the admin).
                answer = json.loads(body)
                assert {k: answer[k] for k in expected} == expected, (trick, body[:200])
            else:
                # A redirect (to /api/me, dropping a trailing slash) or a refusal.
                assert status in (307, 308, 400, 401, 403, 404, 405), (trick, status)
                assert '"bob/ops"' not in body and "bob/ops</" not in body, trick

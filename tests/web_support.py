"""A store full of awkward data, and the usage endpoint on real Starlette, FastAPI and Flask apps:
shared by the OpenAPI, fuzzing, access and XSS tests of ``/llm-usage``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import flask
from fastapi import FastAPI
from sqlalchemy import update
from starlette.applications import Starlette

from llm_tally import Tally
from llm_tally.storage.models import usage_table

MOUNT = "/llm-usage"
ADMIN_TOKEN = "Bearer admin-token"
ADMIN = {"Authorization": ADMIN_TOKEN}
REVENUE = {"free": 0, "pro": "20.00", "team": "99.00"}

# Values that an attacker who signs up, or an app that passes request data through, can put
# into the store: markup, attribute breakouts, script URLs, spreadsheet formulas, SQL.
XSS_USER = "<script>alert('user')</script>"
ATTR_USER = '"><img src=x onerror=alert("attr")>'
JS_USER = "javascript:alert('href')"
FORMULA_USER = '=HYPERLINK("http://evil.example/","x")'
SQL_USER = "x'); DROP TABLE llm_tally_usage; --"
# A Cyrillic a and fullwidth letters that look like "admin admin", then markup.
UNICODE_USER = "\u0430dmin \uff41\uff44\uff4d\uff49\uff4e <svg onload=alert('u')>"
EVIL_USERS = (XSS_USER, ATTR_USER, JS_USER, FORMULA_USER, SQL_USER, UNICODE_USER)
EVIL_KEY = "<b onmouseover=alert('key')>k"
EVIL_VALUE = "</td><script>alert('value')</script>"
EVIL_PLAN = "<img src=x onerror=alert('plan')>"
EVIL_FEATURE = "'><iframe src=javascript:alert('feature')>"
EVIL_MODEL = "<svg/onload=alert('model')>"
EVIL_PROVIDER = "<style>body{display:none}</style>"
EVIL_OPERATION = "<a href=javascript:alert(1)>op"
EVIL_ERROR = "<script>alert('error')</script>"
EVIL_REQUEST_ID = "+cmd|' /C calc'!A0"
PLAIN_USERS = ("ann@example.com", "bob/ops", "Carol Smith", "1234")


def seed(tally: Tally, now: datetime | None = None) -> datetime:
    """Six weeks of calls by plain and hostile users, plus a burst in the last hour that the
    anomaly detector flags; returns the ``now`` it was built around."""
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    users: tuple[str | None, ...] = (*PLAIN_USERS, *EVIL_USERS, None)
    n = 0
    for day in range(42):
        for index, user in enumerate(users):
            if (day + index) % 3:
                continue
            n += 1
            evil = user in EVIL_USERS
            tally.record(
                user_id=user,
                model=EVIL_MODEL
                if evil and n % 2
                else ("gpt-4o", "gpt-4o-mini", "custom-x")[n % 3],
                provider=EVIL_PROVIDER if evil and n % 5 == 0 else "openai",
                operation=EVIL_OPERATION if evil and n % 4 == 0 else "chat",
                input_tokens=10 + n * 7,
                output_tokens=3 + n,
                cost_usd=None if n % 7 == 0 else Decimal(n * 13).scaleb(-7),
                ts=moment - timedelta(days=day, hours=index % 5, minutes=n % 60),
                properties={
                    "plan": EVIL_PLAN if evil else ("free", "pro", "team")[n % 3],
                    "feature": EVIL_FEATURE if evil and n % 2 else ("chat", "search")[n % 2],
                    **({EVIL_KEY: EVIL_VALUE} if evil else {}),
                },
                status="error" if n % 6 == 0 else "ok",
                latency_ms=100 + n % 900,
            )
    # A burst in the last hour by a hostile user: the anomalies page lists them.
    for i in range(30):
        tally.record(
            user_id=XSS_USER,
            model=EVIL_MODEL,
            input_tokens=500,
            output_tokens=100,
            cost_usd="0.05",
            ts=moment - timedelta(minutes=i + 1),
            properties={"plan": EVIL_PLAN, EVIL_KEY: EVIL_VALUE},
        )
    assert tally.flush(30)
    # Columns that only the instrumentation sets: as a compromised or hand-edited store has them.
    with tally.engine.begin() as conn:
        conn.execute(
            update(usage_table)
            .where(usage_table.c.status == "error")
            .values(error_type=EVIL_ERROR, request_id=EVIL_REQUEST_ID, response_model=EVIL_MODEL)
        )
    return moment


def admin_authorize(request: Any) -> bool:
    """The app's rule for the endpoint: its admin token (any framework's request)."""
    return request.headers.get("authorization") == ADMIN_TOKEN


def caller_of(request: Any) -> str | None:
    """The app's sign-in: ``Authorization: Bearer user:<id>``."""
    value = request.headers.get("authorization") or ""
    return value.removeprefix("Bearer user:") if value.startswith("Bearer user:") else None


def starlette_app(tally: Tally, **init: Any) -> Starlette:
    app = Starlette()
    tally.init_app(app, **init)
    return app


def fastapi_app(tally: Tally, **init: Any) -> FastAPI:
    app = FastAPI()
    tally.init_app(app, **init)
    return app


def flask_app(tally: Tally, **init: Any) -> flask.Flask:
    app = flask.Flask("llm_tally_web_test")
    if "identify" in init and init["identify"] is caller_of:
        init["identify"] = lambda: caller_of(flask.request)
    tally.init_app(app, **init)
    return app


SECURED = {"authorize": admin_authorize, "identify": caller_of, "revenue": REVENUE}

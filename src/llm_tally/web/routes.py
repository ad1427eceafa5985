"""Every route of the ``/llm-usage`` endpoint, described once.

:data:`ROUTES` is the one list: the Starlette app (:mod:`.asgi`) and the Flask blueprint
(:mod:`.flask`) register exactly these routes, and the OpenAPI document served at
``{mount}/api/openapi.json`` (:mod:`.openapi`) is built from the same list, with each query
and path parameter's real constraints. A route cannot be served without being documented.

Each route's handler is framework-neutral: what was asked (:class:`Asked`) in, an
:class:`Answer` (status, media type, body) out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .._validation import (
    MAX_PROPERTY_KEY_LENGTH,
    MAX_USER_ID_LENGTH,
    check_user_id,
)
from ..storage.queries import ORDER_BY_VALUES
from . import api, dashboard, export

if TYPE_CHECKING:
    from .._tally import Tally
    from ..storage.insights import Revenue

JSON = "application/json"
HTML = "text/html; charset=utf-8"
CSV = "text/csv; charset=utf-8"

#: Who may call a route: the app's ``authorize(request)`` (loopback clients not behind a
#: proxy by default), or the signed-in caller, for their own data only (``/api/me``).
Access = Literal["authorize", "caller"]

#: The name both routers know the path converter by that matches any text, "/", a leading
#: "/" and line breaks included (their own "path" converters stop at a line break or refuse
#: a leading "/"): an id that cannot be valid gets a 400 that says why, never a 404.
ANY_PATH = "llm_tally_any"


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter, with the JSON Schema of its value."""

    name: str
    description: str
    schema: dict[str, Any]
    where: Literal["query", "path"] = "query"
    required: bool = False
    #: A path parameter that may hold anything, ``/`` included (user ids, property names):
    #: the routers' :data:`ANY_PATH` converter. Others stop at ``/``.
    slashes: bool = False


@dataclass(frozen=True, slots=True)
class Asked:
    """What a request asks: its path and query parameters (the last of a repeated one), the
    signed-in caller (for ``caller`` routes), and the mount's path as the client sees it."""

    path: Mapping[str, str]
    params: Mapping[str, str]
    caller: str | None = None
    base: str = ""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    media_type: str
    #: Text, or pieces of text to stream (the CSV export).
    body: str | Iterator[str]

    @property
    def headers(self) -> dict[str, str]:
        """What every answer carries: usage is private (never cached by a proxy), and no
        browser may read a JSON or CSV answer as HTML; pages may not be framed, run no script
        (the HTTP form of their Content-Security-Policy) and send no referrer."""
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if self.media_type == HTML:
            headers["Content-Security-Policy"] = f"{dashboard.CSP}; frame-ancestors 'none'"
            headers["X-Frame-Options"] = "DENY"
            headers["Referrer-Policy"] = "no-referrer"
        elif self.media_type == CSV:
            headers["Content-Disposition"] = 'attachment; filename="llm-usage.csv"'
        return headers


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What the handlers read: the store, and the plan prices of ``/api/profitability``."""

    tally: Tally
    revenue: Revenue | None = None


Handler = Callable[[Endpoint, Asked], Answer]


@dataclass(frozen=True, slots=True)
class Route:
    """One ``GET`` route of the endpoint."""

    #: Relative to the mount, as an OpenAPI path template: ``/api/users/{user_id}``.
    path: str
    #: The OpenAPI ``operationId``, and the Flask endpoint name.
    name: str
    summary: str
    description: str
    #: The media type of a successful answer.
    media_type: str
    #: The component schema of a successful JSON answer (see :mod:`.openapi`).
    schema: str | None
    handle: Handler
    params: tuple[Param, ...] = ()
    access: Access = "authorize"
    #: Error statuses besides the access ones (403, or 401 for ``caller`` routes).
    errors: tuple[int, ...] = (400,)
    tags: tuple[str, ...] = field(default=("api",))

    def template(self, style: Literal["starlette", "flask"]) -> str:
        """The path in the router syntax of ``style``."""
        path = self.path
        for param in self.params:
            if param.where != "path":
                continue
            if style == "starlette":
                routed = f"{{{param.name}:{ANY_PATH}}}" if param.slashes else f"{{{param.name}}}"
            else:
                routed = f"<{ANY_PATH}:{param.name}>" if param.slashes else f"<{param.name}>"
            path = path.replace(f"{{{param.name}}}", routed)
        return path


def error_answer(status: int, message: str) -> Answer:
    return Answer(status, JSON, json_text({"error": message}))


def json_text(body: Any) -> str:
    """Compact JSON, non-ASCII kept (UTF-8), as both frameworks answer it."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def forbidden() -> Answer:
    return error_answer(403, api.FORBIDDEN_MESSAGE)


def no_user() -> Answer:
    return error_answer(401, api.NO_USER_MESSAGE)


def _json(build: Callable[[Endpoint, Asked], dict[str, Any]]) -> Handler:
    def handle(endpoint: Endpoint, asked: Asked) -> Answer:
        try:
            return Answer(200, JSON, json_text(build(endpoint, asked)))
        except api.ApiError as exc:
            return error_answer(exc.status, exc.message)

    return handle


def _page(render: Callable[[Endpoint, Asked], tuple[int, str]]) -> Handler:
    def handle(endpoint: Endpoint, asked: Asked) -> Answer:
        status, body = render(endpoint, asked)
        return Answer(status, HTML, body)

    return handle


def _me(endpoint: Endpoint, asked: Asked) -> dict[str, Any]:
    # The adapters answer 401 before calling this when nobody is signed in.
    return api.user_detail(endpoint.tally, asked.caller or "", asked.params)


def _export(endpoint: Endpoint, asked: Asked) -> Answer:
    try:
        since, until = api.parse_period(asked.params)
        user = asked.params.get("user_id") or None
        checked = check_user_id(user)
    except api.ApiError as exc:
        return error_answer(exc.status, exc.message)
    except ValueError as exc:
        return error_answer(400, str(exc))
    records = endpoint.tally.iter_records(since, until, user_id=checked)
    return Answer(200, CSV, export.export_csv(records))


def _openapi(endpoint: Endpoint, asked: Asked) -> dict[str, Any]:
    from .openapi import document

    return document(asked.base)


# -- parameters --------------------------------------------------------------------------------

_TIME = {
    "type": "string",
    "anyOf": [{"format": "date"}, {"format": "date-time"}],
    "maxLength": 64,
    "examples": ["2026-11-01", "2026-11-01T00:00:00Z"],
}
_DAYS = "Days are UTC; a datetime without a time zone is UTC."
SINCE = Param(
    "since", f"Start of the period (included): a date or an ISO-8601 datetime. {_DAYS}", _TIME
)
UNTIL = Param(
    "until",
    "End of the period (excluded): a date or an ISO-8601 datetime; not before since.",
    _TIME,
)
PERIOD = (SINCE, UNTIL)

USER_ID_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_USER_ID_LENGTH,
    "description": f"1 to {MAX_USER_ID_LENGTH} printable characters (str.isprintable()).",
}
PROPERTY_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_PROPERTY_KEY_LENGTH,
    "pattern": r'^[^"\\]+$',
    "description": (
        f"A property name such as plan or feature: 1 to {MAX_PROPERTY_KEY_LENGTH} printable "
        'characters without " or \\.'
    ),
}


def _limit(default: int) -> Param:
    return Param(
        "limit",
        f"How many rows (default {default}).",
        {"type": "integer", "minimum": 1, "maximum": api.MAX_LIMIT, "default": default},
    )


OFFSET = Param(
    "offset",
    "How many rows to skip (paging).",
    {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0},
)
ORDER_BY = Param(
    "order_by",
    "Sort order, largest first.",
    {"type": "string", "enum": list(ORDER_BY_VALUES), "default": "cost"},
)
PRESET = Param(
    "period",
    "A preset period (ignored when since or until is given).",
    {"type": "string", "enum": list(dashboard.PRESETS), "default": dashboard.DEFAULT_PRESET},
)
PAGE_PERIOD = (PRESET, *PERIOD)
USER_PATH = Param(
    "user_id",
    "The user id, percent-encoded (a / as %2F).",
    USER_ID_SCHEMA,
    where="path",
    required=True,
    slashes=True,
)

# -- the routes --------------------------------------------------------------------------------

ROUTES: tuple[Route, ...] = (
    Route(
        "/",
        "users_page",
        "Dashboard: usage by user",
        "The HTML page of every user's totals for a period, with filters, the plan and feature "
        "breakdowns and the costliest (model, feature) pairs. A bad parameter gets a 400 page.",
        HTML,
        None,
        _page(lambda e, a: dashboard.users_page(e.tally, a.params)),
        (
            *PAGE_PERIOD,
            Param("q", "Only user ids containing this text (any case).", {"type": "string"}),
            Param(
                "property",
                "Only calls whose property has the value given by value.",
                PROPERTY_SCHEMA,
            ),
            Param(
                "value",
                "The property value to filter on (with property).",
                {"type": "string", "maxLength": 256},
            ),
            ORDER_BY,
            _limit(dashboard.PAGE_SIZE),
            OFFSET,
        ),
        tags=("dashboard",),
    ),
    Route(
        "/anomalies",
        "anomalies_page",
        "Dashboard: anomalies",
        "The HTML page of the users far above their own baseline or the other users, in the last "
        "hour and the last day.",
        HTML,
        None,
        _page(lambda e, a: dashboard.anomalies_page(e.tally, a.params)),
        PAGE_PERIOD,
        tags=("dashboard",),
    ),
    Route(
        "/users/{user_id}",
        "user_page",
        "Dashboard: one user",
        "The HTML page of one user's totals, daily charts, models, activity and last calls.",
        HTML,
        None,
        _page(lambda e, a: dashboard.user_page(e.tally, a.path["user_id"], a.params)),
        (USER_PATH, *PAGE_PERIOD),
        tags=("dashboard",),
    ),
    Route(
        "/api/me",
        "me",
        "The caller's own usage",
        "Totals, by model and by day, of the user signed in to the host app (its identify, "
        "bind_user, Flask-Login or Starlette authentication). Takes no user id: nobody can read "
        "another user's usage here. 401 when nobody is signed in; authorize does not apply.",
        JSON,
        "UserDetail",
        _json(_me),
        PERIOD,
        access="caller",
    ),
    Route(
        "/api/users",
        "users",
        "Every user's totals",
        "Per-user totals for a period, sorted and paged; total is how many users the period has.",
        JSON,
        "UserList",
        _json(lambda e, a: api.users_page(e.tally, a.params)),
        (*PERIOD, ORDER_BY, _limit(api.DEFAULT_LIMIT), OFFSET),
    ),
    Route(
        "/api/users/{user_id}",
        "user_detail",
        "One user's usage",
        "One user's totals, by model and by day, for a period.",
        JSON,
        "UserDetail",
        _json(lambda e, a: api.user_detail(e.tally, a.path["user_id"], a.params)),
        (USER_PATH, *PERIOD),
    ),
    Route(
        "/api/health",
        "health",
        "Health of the writer and the store",
        "Queue depth, records written and dropped, write errors, whether the store answers.",
        JSON,
        "Health",
        _json(lambda e, a: api.health_page(e.tally, a.params)),
        errors=(),
    ),
    Route(
        "/api/activity",
        "activity",
        "Cadence, call size, errors and speed per user or model",
        "Per user (or model): active days, requests per active day, tokens per request, error "
        "rate, latency percentiles.",
        JSON,
        "ActivityList",
        _json(lambda e, a: api.activity_page(e.tally, a.params)),
        (
            *PERIOD,
            Param(
                "by",
                "Group by user or by model.",
                {"type": "string", "enum": ["user", "model"], "default": "user"},
            ),
            Param(
                "key",
                "Only this user (or model).",
                {"type": "string", "maxLength": MAX_USER_ID_LENGTH},
            ),
        ),
    ),
    Route(
        "/api/anomalies",
        "anomalies",
        "Users far above their baseline",
        "Users whose requests or cost in the last hour or day are far above their own history "
        "or the other users', by a robust z-score.",
        JSON,
        "AnomalyList",
        _json(lambda e, a: api.anomalies_page(e.tally, a.params)),
        (
            Param(
                "window",
                "The recent window.",
                {"type": "string", "enum": ["hour", "day"], "default": "hour"},
            ),
            Param(
                "threshold",
                "The smallest robust z-score reported: a positive decimal number (default 5).",
                {
                    "type": "string",
                    "pattern": r"^[0-9]{1,9}(\.[0-9]{1,9})?$",
                    "default": "5",
                },
            ),
            Param(
                "min_requests",
                "Users with fewer requests in the window are not scored.",
                {"type": "integer", "minimum": 1, "maximum": 10**9, "default": 5},
            ),
        ),
    ),
    Route(
        "/api/expensive",
        "expensive",
        "The costliest calls and (model, property) pairs",
        "The most expensive calls of the period and the (model, property value) pairs that cost "
        "the most, of one user if user_id is given.",
        JSON,
        "Expensive",
        _json(lambda e, a: api.expensive_page(e.tally, a.params)),
        (
            *PERIOD,
            _limit(20),
            Param("by", "The property paired with the model (default feature).", PROPERTY_SCHEMA),
            Param("user_id", "Only this user's calls.", USER_ID_SCHEMA),
        ),
    ),
    Route(
        "/api/profitability",
        "profitability",
        "Revenue, cost and margin per user",
        "Needs the plan prices given to init_app(revenue=...): 404 without them. Least "
        "profitable users first.",
        JSON,
        "Profitability",
        _json(lambda e, a: api.profitability_page(e.tally, e.revenue, a.params)),
        (
            Param(SINCE.name, SINCE.description, SINCE.schema, required=True),
            Param(UNTIL.name, UNTIL.description, UNTIL.schema, required=True),
            Param("by", "The property holding each user's plan (default plan).", PROPERTY_SCHEMA),
        ),
        errors=(400, 404),
    ),
    Route(
        "/api/by/{dimension}",
        "totals_by",
        "Totals per value of a property",
        "Every call of the period grouped by a property (plan, feature...) or by user, model, "
        "provider or operation, with averages per user and per request.",
        JSON,
        "GroupList",
        _json(lambda e, a: api.totals_by_page(e.tally, a.path["dimension"], a.params)),
        (
            Param(
                "dimension",
                "user, model, provider, operation, or a property name (percent-encoded).",
                PROPERTY_SCHEMA,
                where="path",
                required=True,
                slashes=True,
            ),
            *PERIOD,
        ),
    ),
    Route(
        "/api/export.csv",
        "export_csv",
        "Every stored call of a period, as CSV",
        "One row per call, oldest first: the columns of llm-tally export (time in ISO-8601 UTC, "
        "exact cost_usd, properties as JSON). A cell starting with =, +, -, @, a tab or a "
        "carriage return that is not a number gets a leading ' so that no spreadsheet runs it.",
        CSV,
        None,
        _export,
        (*PERIOD, Param("user_id", "Only this user's calls.", USER_ID_SCHEMA)),
    ),
    Route(
        "/api/openapi.json",
        "openapi",
        "This OpenAPI document",
        "The OpenAPI 3.1 description of every route of the endpoint.",
        JSON,
        "OpenAPI",
        _json(_openapi),
        errors=(),
    ),
)

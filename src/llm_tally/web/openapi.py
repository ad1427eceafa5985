"""The OpenAPI 3.1 document of the ``/llm-usage`` endpoint, built from :data:`.routes.ROUTES`.

Served at ``{mount}/api/openapi.json`` behind the same ``authorize`` as the rest of the
endpoint. Its server URL is the mount path the request came through, so clients and API
tools resolve the paths wherever the endpoint is mounted.
"""

from __future__ import annotations

from typing import Any

from .routes import ROUTES, Param, Route

VERSION = "3.1.0"

_INT = {"type": "integer", "minimum": 0}
#: Exact decimal amounts are strings: JSON numbers are floats to most clients.
_DECIMAL = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}
_TIME = {"type": "string", "format": "date-time"}
_MAYBE_TIME = {"type": ["string", "null"], "format": "date-time"}
_MAYBE_TEXT = {"type": ["string", "null"]}
_MAYBE_DECIMAL = {"type": ["string", "null"], "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}


def _object(properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
    }
    if description:
        schema["description"] = description
    return schema


def _list_of(name: str) -> dict[str, Any]:
    return {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}


_TOKENS = {
    "input_tokens": _INT,
    "output_tokens": _INT,
    "cached_input_tokens": _INT,
    "reasoning_tokens": _INT,
}
_TOTALS = {
    "user_id": {"type": "string"},
    "requests": _INT,
    "errors": _INT,
    **_TOKENS,
    "cost_usd": _DECIMAL,
    "unpriced_requests": _INT,
    "first_seen": _MAYBE_TIME,
    "last_seen": _MAYBE_TIME,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object({"error": {"type": "string"}}, "What was wrong, and what to do about it."),
    "UserTotals": _object(_TOTALS, "A user's totals for the period. Money in exact USD."),
    "UserList": _object(
        {"users": _list_of("UserTotals"), "total": _INT},
    ),
    "ModelTotals": _object(
        {
            "model": _MAYBE_TEXT,
            "requests": _INT,
            "input_tokens": _INT,
            "output_tokens": _INT,
            "cost_usd": _DECIMAL,
        }
    ),
    "DayTotals": _object(
        {
            "date": {"type": "string", "format": "date"},
            "requests": _INT,
            "input_tokens": _INT,
            "output_tokens": _INT,
            "tokens": _INT,
            "cost_usd": _DECIMAL,
        }
    ),
    "UserDetail": _object(
        {**_TOTALS, "by_model": _list_of("ModelTotals"), "daily": _list_of("DayTotals")},
        "A user's totals, by model (most expensive first) and by UTC day.",
    ),
    "Health": {
        **_object(
            {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "queue_depth": _INT,
                "max_queue": _INT,
                "written": _INT,
                "dropped": _INT,
                "write_errors": _INT,
                "last_write_error": _MAYBE_TEXT,
                "last_write_at": {"type": ["number", "null"]},
                "last_write_error_at": {"type": ["number", "null"]},
                "open_streams": _INT,
                "spilled": _INT,
                "replayed": _INT,
                "journal_dir": _MAYBE_TEXT,
                "journal_bytes": _INT,
                "journal_errors": _INT,
                "last_journal_error": _MAYBE_TEXT,
                "internal_errors": {"type": "object", "additionalProperties": _INT},
                "rollup_backlog": {"type": ["integer", "null"], "minimum": 0},
                "store_error": _MAYBE_TEXT,
            },
            "Tally.health(): times are Unix seconds.",
        ),
    },
    "Activity": _object(
        {
            "key": _MAYBE_TEXT,
            "requests": _INT,
            "first_seen": _TIME,
            "last_seen": _TIME,
            "active_days": _INT,
            "avg_requests_per_active_day": _DECIMAL,
            "avg_tokens_per_request": _DECIMAL,
            "error_rate": _DECIMAL,
            "latency_p50_ms": _MAYBE_DECIMAL,
            "latency_p95_ms": _MAYBE_DECIMAL,
            "ttft_p50_ms": _MAYBE_DECIMAL,
        }
    ),
    "ActivityList": _object(
        {"by": {"type": "string", "enum": ["user", "model"]}, "rows": _list_of("Activity")}
    ),
    "Anomaly": _object(
        {
            "user_id": {"type": "string"},
            "metric": {"type": "string", "enum": ["requests", "cost"]},
            "compared_to": {"type": "string", "enum": ["self", "population"]},
            "recent": _DECIMAL,
            "baseline_median": _DECIMAL,
            "score": _DECIMAL,
            "reason": {"type": "string"},
        }
    ),
    "AnomalyList": _object(
        {"window": {"type": "string", "enum": ["hour", "day"]}, "anomalies": _list_of("Anomaly")}
    ),
    "ExpensiveCall": _object(
        {
            "id": {"type": "string", "description": "The stored record's id."},
            "time": _TIME,
            "user_id": _MAYBE_TEXT,
            "model": _MAYBE_TEXT,
            "properties": {"type": "object", "additionalProperties": {"type": "string"}},
            "input_tokens": _INT,
            "output_tokens": _INT,
            "cost_usd": _DECIMAL,
        }
    ),
    "ExpensivePair": _object(
        {
            "model": _MAYBE_TEXT,
            "value": _MAYBE_TEXT,
            "requests": _INT,
            "cost_usd": _DECIMAL,
            "avg_cost_per_request": _DECIMAL,
            "unpriced_requests": _INT,
        }
    ),
    "Expensive": _object(
        {
            "calls": _list_of("ExpensiveCall"),
            "by": {"type": "string"},
            "pairs": _list_of("ExpensivePair"),
        }
    ),
    "UserProfit": _object(
        {
            "user_id": {"type": "string"},
            "plan": _MAYBE_TEXT,
            "requests": _INT,
            "revenue_usd": _DECIMAL,
            "cost_usd": _DECIMAL,
            "margin_usd": _DECIMAL,
        }
    ),
    "Profitability": _object(
        {
            "by": {"type": "string"},
            "users": _list_of("UserProfit"),
            "totals": _object(
                {"revenue_usd": _DECIMAL, "cost_usd": _DECIMAL, "margin_usd": _DECIMAL}
            ),
        }
    ),
    "GroupTotals": _object(
        {
            "value": _MAYBE_TEXT,
            "users": _INT,
            "requests": _INT,
            "errors": _INT,
            **_TOKENS,
            "cost_usd": _DECIMAL,
            "avg_cost_per_user": _DECIMAL,
            "avg_cost_per_request": _DECIMAL,
            "unpriced_requests": _INT,
        }
    ),
    "GroupList": _object({"dimension": {"type": "string"}, "groups": _list_of("GroupTotals")}),
    "OpenAPI": _object(
        {
            "openapi": {"type": "string"},
            "info": {"type": "object"},
            "paths": {"type": "object"},
        },
        "An OpenAPI 3.1 document.",
    ),
}

_ERRORS = {
    400: "A bad parameter: the message names it.",
    401: "Nobody is signed in to the host app for this request.",
    403: "Not authorized: authorize(request) said no (by default, only loopback clients that "
    "came through no proxy are let in).",
    404: "Not available: the message says what is missing.",
}


def _parameter(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "required": param.required or param.where == "path",
        "description": param.description,
        "schema": param.schema,
    }


def _operation(route: Route) -> dict[str, Any]:
    if route.schema is not None:
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{route.schema}"}}
        }
    else:
        content = {route.media_type.split(";")[0]: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {"200": {"description": route.summary, "content": content}}
    access = 401 if route.access == "caller" else 403
    for status in sorted({*route.errors, access}):
        error = {"$ref": "#/components/schemas/Error"}
        if route.media_type.startswith("text/html") and status == 400:
            # A dashboard page answers a bad parameter with a page that names it.
            body = {"text/html": {"schema": {"type": "string"}}}
        else:
            body = {"application/json": {"schema": error}}
        responses[str(status)] = {"description": _ERRORS[status], "content": body}
    operation: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "description": route.description,
        "tags": list(route.tags),
        "responses": responses,
        "x-llm-tally-access": route.access,
    }
    if route.params:
        operation["parameters"] = [_parameter(p) for p in route.params]
    return operation


def document(base: str = "/llm-usage") -> dict[str, Any]:
    """The OpenAPI document, for the endpoint mounted at the URL path ``base``."""
    return {
        "openapi": VERSION,
        "info": {
            "title": "llm-tally usage endpoint",
            "version": "1",
            "description": (
                "Per-user LLM usage and exact cost recorded by llm-tally: a JSON API, a CSV "
                "export and HTML dashboard pages. Every route but /api/me is guarded by the "
                "app's authorize(request) (by default: loopback clients that came through no "
                "proxy). Money is exact, as decimal strings in US dollars."
            ),
        },
        "servers": [{"url": base or "/"}],
        "paths": {route.path: {"get": _operation(route)} for route in ROUTES},
        "components": {"schemas": SCHEMAS},
    }

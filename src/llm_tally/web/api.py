"""The ``/llm-usage`` JSON API, framework-neutral: query parameters in, JSON-ready dicts out.

The ASGI and Flask adapters only route, authorize and serialize; every number comes from
here, so both frameworks answer identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .._money import nano_to_usd
from .._time import EARLIEST, LATEST, TimeBound, from_epoch_us, parse_time_bound
from .._validation import check_user_id
from ..storage import insights
from ..storage.analytics import GroupTotals
from ..storage.queries import ORDER_BY_VALUES, DayTotals, ModelTotals, UserTotals

if TYPE_CHECKING:
    from .._tally import Tally

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

FORBIDDEN_MESSAGE = (
    "The llm-tally usage endpoint answers only loopback clients (127.0.0.1, ::1) that came "
    "through no proxy unless you configure access: pass authorize=<callable(request) -> bool> "
    "to tally.init_app(...) (see docs/fastapi.md or docs/flask.md)."
)
NO_USER_MESSAGE = (
    "No user is signed in for this request: /api/me needs identify=..., Starlette's "
    "AuthenticationMiddleware or Flask-Login to know who is asking."
)


def check_mount_path(mount_path: object) -> str:
    """A mount path such as ``/llm-usage`` (without a trailing slash), or ValueError."""
    if (
        not isinstance(mount_path, str)
        or not mount_path.startswith("/")
        or not mount_path.strip("/")
        or any(c.isspace() or c in "?#" for c in mount_path)
    ):
        raise ValueError(f"mount_path must be a path such as '/llm-usage', got {mount_path!r}")
    return mount_path.rstrip("/")


class ApiError(Exception):
    """A client error: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _parse_time(params: Mapping[str, str], name: str) -> TimeBound:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        parsed = parse_time_bound(raw, name)
        in_range = EARLIEST <= _as_utc(parsed) <= LATEST
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except OverflowError:  # an offset that moves the time out of datetime's range
        in_range = False
    if not in_range:
        raise ApiError(
            400, f"{name}: expected a time from 0001-01-02 to 9998-12-01 (UTC), got {raw[:64]!r}"
        )
    return parsed


def int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """The whole number ``name`` in ``[low, high]`` (``default`` when absent), or a 400."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    # isascii(): str.isdigit() also accepts '²' and '①', which int() rejects; the length
    # keeps int() away from its limit on digits (a ValueError of its own).
    if (
        not (raw.isascii() and raw.isdigit())
        or len(raw) > len(str(high)) + 1
        or not low <= int(raw) <= high
    ):
        raise ApiError(
            400, f"{name}: expected a whole number from {low} to {high}, got {raw[:64]!r}"
        )
    return int(raw)


def parse_period(params: Mapping[str, str]) -> tuple[TimeBound, TimeBound]:
    since, until = _parse_time(params, "since"), _parse_time(params, "until")
    if since is not None and until is not None and _as_utc(since) > _as_utc(until):
        raise ApiError(400, "until: must not be before since")
    return since, until


def _as_utc(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def money(amount: Decimal) -> str:
    """Exact decimal as a JSON string (JSON numbers are floats to most clients)."""
    return format(amount, "f")


def totals_json(totals: UserTotals) -> dict[str, Any]:
    return {
        "user_id": totals.user_id,
        "requests": totals.requests,
        "errors": totals.errors,
        "input_tokens": totals.input_tokens,
        "output_tokens": totals.output_tokens,
        "cached_input_tokens": totals.cached_input_tokens,
        "reasoning_tokens": totals.reasoning_tokens,
        "cost_usd": money(totals.cost_usd),
        "unpriced_requests": totals.unpriced_requests,
        "first_seen": iso(totals.first_seen),
        "last_seen": iso(totals.last_seen),
    }


def _model_json(row: ModelTotals) -> dict[str, Any]:
    return {
        "model": row.model,
        "requests": row.requests,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cost_usd": money(row.cost_usd),
    }


def _day_json(row: DayTotals) -> dict[str, Any]:
    return {
        "date": row.day.isoformat(),
        "requests": row.requests,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "tokens": row.input_tokens + row.output_tokens,
        "cost_usd": money(row.cost_usd),
    }


def health_page(tally: Tally, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/health``: :meth:`Tally.health`."""
    return tally.health()


def users_page(tally: Tally, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/users``: per-user totals for a period, sorted and paged."""
    since, until = parse_period(params)
    order_by = params.get("order_by") or "cost"
    if order_by not in ORDER_BY_VALUES:
        raise ApiError(
            400, f"order_by: expected one of {', '.join(ORDER_BY_VALUES)}, got {order_by[:64]!r}"
        )
    limit = int_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = int_param(params, "offset", 0, 0, 10**9)
    users = tally.users(since, until, order_by, limit, offset)  # type: ignore[arg-type]
    return {
        "users": [totals_json(t) for t in users],
        "total": tally.count_users(since, until),
    }


def user_detail(tally: Tally, user_id: str, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/users/{user_id}`` (and ``/api/me``): totals, by model, by day."""
    try:
        checked = check_user_id(user_id)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    since, until = parse_period(params)
    detail = totals_json(tally.user_totals(checked, since, until))
    detail["by_model"] = [_model_json(m) for m in tally.user_by_model(checked, since, until)]
    detail["daily"] = [_day_json(d) for d in tally.user_daily(checked, since, until)]
    return detail


def group_json(group: GroupTotals) -> dict[str, Any]:
    return {
        "value": group.value,
        "users": group.users,
        "requests": group.requests,
        "errors": group.errors,
        "input_tokens": group.input_tokens,
        "output_tokens": group.output_tokens,
        "cached_input_tokens": group.cached_input_tokens,
        "reasoning_tokens": group.reasoning_tokens,
        "cost_usd": money(group.cost_usd),
        "avg_cost_per_user": money(group.avg_cost_per_user),
        "avg_cost_per_request": money(group.avg_cost_per_request),
        "unpriced_requests": group.unpriced_requests,
    }


def totals_by_page(tally: Tally, dimension: str, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/by/{property}``: totals per value of a property (or user, model...)."""
    since, until = parse_period(params)
    try:
        groups = tally.totals_by(dimension, since, until)
    except ValueError as exc:
        raise ApiError(400, f"property: {exc}") from None
    return {"dimension": dimension, "groups": [group_json(g) for g in groups]}


def choice_param(
    params: Mapping[str, str], name: str, choices: tuple[str, ...], default: str
) -> str:
    """The parameter ``name``, one of ``choices`` (``default`` when absent), or a 400."""
    value = params.get(name) or default
    if value not in choices:
        raise ApiError(400, f"{name}: expected one of {', '.join(choices)}, got {value[:64]!r}")
    return value


def profitability_page(
    tally: Tally, revenue: insights.Revenue | None, params: Mapping[str, str]
) -> dict[str, Any]:
    """``GET {mount}/api/profitability``: revenue, cost and margin per user for a period."""
    if revenue is None:
        raise ApiError(
            404,
            "profitability needs prices: pass revenue={'free': 0, 'pro': '20.00'} (monthly "
            "price per plan) or a callable user_id -> monthly price to tally.init_app(...)",
        )
    since, until = parse_period(params)
    if since is None or until is None:
        raise ApiError(400, "since: profitability needs both since and until")
    by = params.get("by") or "plan"
    try:
        users = tally.profitability(revenue, since, until, by=by)
    except ValueError as exc:
        raise ApiError(400, f"by: {exc}") from None
    revenue_total = sum((u.revenue_usd for u in users), Decimal(0))
    cost_total = sum((u.cost_usd for u in users), Decimal(0))
    return {
        "by": by,
        "users": [
            {
                "user_id": u.user_id,
                "plan": u.plan,
                "requests": u.requests,
                "revenue_usd": money(u.revenue_usd),
                "cost_usd": money(u.cost_usd),
                "margin_usd": money(u.margin_usd),
            }
            for u in users
        ],
        "totals": {
            "revenue_usd": money(revenue_total),
            "cost_usd": money(cost_total),
            "margin_usd": money(revenue_total - cost_total),
        },
    }


def _ms(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def activity_page(tally: Tally, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/activity?by=user|model``: cadence, call size, errors, speed."""
    since, until = parse_period(params)
    by = choice_param(params, "by", ("user", "model"), "user")
    rows = tally.activity(
        by,  # type: ignore[arg-type]
        since,
        until,
        key=params.get("key") or None,
    )
    return {
        "by": by,
        "rows": [
            {
                "key": a.key,
                "requests": a.requests,
                "first_seen": iso(a.first_seen),
                "last_seen": iso(a.last_seen),
                "active_days": a.active_days,
                "avg_requests_per_active_day": format(a.avg_requests_per_active_day, "f"),
                "avg_tokens_per_request": format(a.avg_tokens_per_request, "f"),
                "error_rate": format(a.error_rate, "f"),
                "latency_p50_ms": _ms(a.latency_p50_ms),
                "latency_p95_ms": _ms(a.latency_p95_ms),
                "ttft_p50_ms": _ms(a.ttft_p50_ms),
            }
            for a in rows
        ],
    }


def anomalies_page(tally: Tally, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/anomalies?window=hour|day``: users far above their baseline."""
    window = choice_param(params, "window", ("hour", "day"), "hour")
    threshold = params.get("threshold") or "5"
    try:
        parsed = Decimal(threshold)
        if not parsed.is_finite() or parsed <= 0:
            raise ValueError
    except (ArithmeticError, ValueError):
        raise ApiError(
            400, f"threshold: expected a positive number, got {threshold[:64]!r}"
        ) from None
    min_requests = int_param(params, "min_requests", 5, 1, 10**9)
    found = tally.anomalies(
        window,  # type: ignore[arg-type]
        threshold=parsed,
        min_requests=min_requests,
    )
    return {
        "window": window,
        "anomalies": [
            {
                "user_id": a.user_id,
                "metric": a.metric,
                "compared_to": a.compared_to,
                "recent": format(a.recent, "f"),
                "baseline_median": format(a.baseline_median, "f"),
                "score": format(a.score, "f"),
                "reason": a.reason,
            }
            for a in found
        ],
    }


def expensive_page(tally: Tally, params: Mapping[str, str]) -> dict[str, Any]:
    """``GET {mount}/api/expensive``: the costliest calls and (model, property) pairs."""
    since, until = parse_period(params)
    limit = int_param(params, "limit", 20, 1, MAX_LIMIT)
    by = params.get("by") or "feature"
    user = params.get("user_id") or None
    try:
        calls = tally.expensive_calls(since, until, user_id=user, limit=limit)
        pairs = tally.expensive_pairs(by, since, until, user_id=user, limit=limit)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return {
        "calls": [
            {
                "id": c["id"],
                "time": iso(from_epoch_us(c["ts"])),
                "user_id": c["user_id"],
                "model": c["response_model"] or c["request_model"],
                "properties": c["properties"],
                "input_tokens": c["input_tokens"],
                "output_tokens": c["output_tokens"],
                "cost_usd": money(nano_to_usd(c["cost_nano_usd"])),
            }
            for c in calls
        ],
        "by": by,
        "pairs": [
            {
                "model": p.model,
                "value": p.value,
                "requests": p.requests,
                "cost_usd": money(p.cost_usd),
                "avg_cost_per_request": money(p.avg_cost_per_request),
                "unpriced_requests": p.unpriced_requests,
            }
            for p in pairs
        ],
    }

"""Read-side queries: per-user totals. Framework-neutral; every surface calls these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, Engine, Select, func, select

from .._money import nano_to_usd
from .._time import from_epoch_us
from .models import MEASURES, monthly_users_table, usage_table
from .source import (
    SOME_USER,
    parts_source,
    reading,
    seen_of,
    source,
    split_period,
    totals_of,
    within,
)

OrderBy = Literal["cost", "requests", "tokens", "last_seen"]
ORDER_BY_VALUES: tuple[str, ...] = ("cost", "requests", "tokens", "last_seen")


@dataclass(frozen=True, slots=True)
class UserTotals:
    """What one user's calls added up to in a period. ``cost_usd`` is exact."""

    user_id: str | None
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    #: Calls whose model had no known price: not included in ``cost_usd``.
    unpriced_requests: int
    first_seen: datetime | None
    last_seen: datetime | None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


_c = usage_table.c
_m = monthly_users_table.c


def period_conditions(since_us: int | None, until_us: int | None) -> list[ColumnElement[bool]]:
    """The conditions of calls in ``[since, until)`` (epoch microseconds; None: open-ended)."""
    return within(_c.ts, (since_us, until_us))


def user_totals_of(user_id: str | None, row: Any) -> UserTotals:
    return UserTotals(
        user_id=user_id,
        requests=int(row.requests),
        # "errors" counts every call that did not complete: API errors and aborted streams.
        errors=int(row.errors),
        input_tokens=int(row.input_tokens),
        output_tokens=int(row.output_tokens),
        cached_input_tokens=int(row.cached_input_tokens),
        reasoning_tokens=int(row.reasoning_tokens),
        cost_usd=nano_to_usd(int(row.cost_nano_usd)),
        unpriced_requests=int(row.unpriced),
        first_seen=from_epoch_us(row.first_ts) if row.first_ts is not None else None,
        last_seen=from_epoch_us(row.last_ts) if row.last_ts is not None else None,
    )


def user_totals(
    engine: Engine, user_id: str | None, since_us: int | None, until_us: int | None
) -> UserTotals:
    """Totals of one user (``None``: calls made outside any user context)."""
    calls = source(since_us, until_us, user_id, detail=False)
    with reading(engine) as conn:
        row = conn.execute(select(*totals_of(calls), *seen_of(calls))).one()
    return user_totals_of(user_id, row)


def users(
    engine: Engine,
    since_us: int | None,
    until_us: int | None,
    order_by: OrderBy,
    limit: int,
    offset: int = 0,
) -> list[UserTotals]:
    """Per-user totals, largest first (ties by user id); calls without a user are left out."""
    parts = split_period(since_us, until_us)
    month = parts.single_month
    query: Select[Any]
    if month is not None:
        # One UTC month: one rollup row per user, and "by cost" walks the cost index.
        sort_keys: dict[str, ColumnElement[Any]] = {
            "cost": _m.cost_nano_usd,
            "requests": _m.requests,
            "tokens": _m.input_tokens + _m.output_tokens,
            "last_seen": _m.last_ts,
        }
        query = (
            select(
                _m.user_key.label("user_id"),
                *(_m[name].label(name) for name in MEASURES),
            )
            .where(_m.month == month, _m.user_key != "")
            .order_by(sort_keys[order_by].desc(), _m.user_key)
        )
    else:
        calls = parts_source(parts, SOME_USER)
        totals = totals_of(calls)
        grouped_keys: dict[str, ColumnElement[Any]] = {
            "cost": func.sum(calls.c.cost_nano_usd),
            "requests": func.sum(calls.c.requests),
            "tokens": func.sum(calls.c.input_tokens + calls.c.output_tokens),
            "last_seen": func.max(calls.c.last_ts),
        }
        query = (
            select(calls.c.user_id, *totals, *seen_of(calls))
            .group_by(calls.c.user_id)
            .order_by(grouped_keys[order_by].desc(), calls.c.user_id)
        )
    with reading(engine) as conn:
        rows = conn.execute(query.limit(limit).offset(offset))
        return [user_totals_of(row.user_id, row) for row in rows]


def count_users(engine: Engine, since_us: int | None, until_us: int | None) -> int:
    """How many distinct users made calls in the period."""
    parts = split_period(since_us, until_us)
    month = parts.single_month
    query: Select[Any]
    if month is not None:
        query = select(func.count()).where(_m.month == month, _m.user_key != "")
    else:
        calls = parts_source(parts, SOME_USER)
        query = select(func.count(func.distinct(calls.c.user_id)))
    with reading(engine) as conn:
        return int(conn.execute(query).scalar() or 0)


@dataclass(frozen=True, slots=True)
class ModelTotals:
    """One model's share of a user's usage."""

    model: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


@dataclass(frozen=True, slots=True)
class DayTotals:
    """One UTC day of a user's usage."""

    day: date
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


_US_PER_DAY = 86_400_000_000


def user_condition(user_id: str | None) -> ColumnElement[bool]:
    """One user's calls (``None``: the calls made outside any user context)."""
    column: ColumnElement[str | None] = _c.user_id
    return column.is_(None) if user_id is None else column == user_id


def by_model(
    engine: Engine, user_id: str | None, since_us: int | None, until_us: int | None
) -> list[ModelTotals]:
    """A user's totals per model (the model that answered, else the one asked for)."""
    calls = source(since_us, until_us, user_id)
    cost = func.sum(calls.c.cost_nano_usd)
    query = (
        select(
            calls.c.model,
            func.sum(calls.c.requests).label("requests"),
            func.sum(calls.c.input_tokens).label("input_tokens"),
            func.sum(calls.c.output_tokens).label("output_tokens"),
            cost.label("cost"),
        )
        .group_by(calls.c.model)
        # Calls without a model last among equals on every database.
        .order_by(cost.desc(), calls.c.model.is_(None), calls.c.model)
    )
    with reading(engine) as conn:
        return [
            ModelTotals(
                row.model,
                int(row.requests),
                int(row.input_tokens),
                int(row.output_tokens),
                nano_to_usd(int(row.cost)),
            )
            for row in conn.execute(query)
        ]


def daily(
    engine: Engine, user_id: str | None, since_us: int | None, until_us: int | None
) -> list[DayTotals]:
    """A user's totals per UTC day, oldest first (days without calls are left out)."""
    calls = source(since_us, until_us, user_id)
    day = (calls.c.at // _US_PER_DAY).label("day")
    query = (
        select(
            day,
            func.sum(calls.c.requests).label("requests"),
            func.sum(calls.c.input_tokens).label("input_tokens"),
            func.sum(calls.c.output_tokens).label("output_tokens"),
            func.sum(calls.c.cost_nano_usd).label("cost"),
        )
        .group_by(day)
        .order_by(day)
    )
    with reading(engine) as conn:
        return [
            DayTotals(
                from_epoch_us(int(row.day) * _US_PER_DAY).date(),
                int(row.requests),
                int(row.input_tokens),
                int(row.output_tokens),
                nano_to_usd(int(row.cost)),
            )
            for row in conn.execute(query)
        ]

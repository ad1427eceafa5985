"""Group-by totals and raw record export: what billing and per-plan questions are answered from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, Subquery, and_, func, select

from .._money import average_usd, nano_to_usd
from .models import (
    monthly_groups_table,
    monthly_pairs_table,
    monthly_users_table,
    monthly_values_table,
    usage_table,
)
from .queries import UserTotals, period_conditions, user_totals_of
from .rollups import BUILT_IN_DIMENSIONS
from .source import (
    SOME_USER,
    SUMMED,
    Range,
    one_month,
    reading,
    seen_of,
    source,
    split_period,
    totals_of,
    within,
)

_c = usage_table.c


@dataclass(frozen=True, slots=True)
class GroupTotals:
    """Totals of the calls sharing one value of a dimension (a property, the model...)."""

    #: The value; None groups the calls that lack the property.
    value: str | None
    users: int
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal
    unpriced_requests: int

    @property
    def avg_cost_per_user(self) -> Decimal:
        """``cost_usd / users``, rounded half-even to the nano-dollar (0 without users)."""
        return average_usd(self.cost_usd, self.users)

    @property
    def avg_cost_per_request(self) -> Decimal:
        """``cost_usd / requests``, rounded half-even to the nano-dollar."""
        return average_usd(self.cost_usd, self.requests)


def dimension_column(dimension: str) -> ColumnElement[Any]:
    """The SQL expression of a dimension: a built-in column or a property of the calls."""
    column: ColumnElement[Any]
    if dimension == "user":
        column = _c.user_id
    elif dimension == "model":
        column = func.coalesce(_c.response_model, _c.request_model)
    elif dimension in ("provider", "operation"):
        column = _c[dimension]
    else:
        column = _c.properties[dimension].as_string()
    return column


def dimension_of(calls: Subquery, dimension: str) -> ColumnElement[Any]:
    """The dimension's expression over the rows of a :func:`~.source.source`."""
    column: ColumnElement[Any]
    if dimension == "user":
        column = calls.c.user_id
    elif dimension in ("model", "provider", "operation"):
        column = calls.c[dimension]
    else:
        column = calls.c.properties[dimension].as_string()
    return column


def _group(value: str | None, row: Any) -> GroupTotals:
    return GroupTotals(
        value=value,
        users=int(row.users),
        requests=int(row.requests),
        errors=int(row.errors),
        input_tokens=int(row.input_tokens),
        output_tokens=int(row.output_tokens),
        cached_input_tokens=int(row.cached_input_tokens),
        reasoning_tokens=int(row.reasoning_tokens),
        cost_usd=nano_to_usd(int(row.cost_nano_usd)),
        unpriced_requests=int(row.unpriced),
    )


def period_totals(engine: Engine, since_us: int | None, until_us: int | None) -> GroupTotals:
    """Everything in the period as one group (``value`` None): users, requests, cost..."""
    parts = split_period(since_us, until_us)
    if parts.only_months and parts.months is not None:
        p = monthly_pairs_table.c
        m = monthly_users_table.c
        user = func.nullif(m.user_key, "")
        count = (
            func.count(user)
            if one_month(parts.months) is not None
            else func.count(func.distinct(user))
        )
        query = select(
            select(count).where(*within(m.month, parts.months)).scalar_subquery().label("users"),
            *(func.coalesce(func.sum(p[name]), 0).label(name) for name in SUMMED),
        ).where(p.dimension == "", *within(p.month, parts.months))
    else:
        calls = source(since_us, until_us, detail=False)
        query = select(func.count(func.distinct(calls.c.user_id)).label("users"), *totals_of(calls))
    with reading(engine) as conn:
        return _group(None, conn.execute(query).one())


def users_with_property(
    engine: Engine, name: str, value: str, since_us: int | None, until_us: int | None
) -> list[UserTotals]:
    """Per-user totals of the calls whose property ``name`` is ``value`` (any order)."""
    parts = split_period(since_us, until_us)
    query: Select[Any]
    if parts.only_months and parts.months is not None and name not in BUILT_IN_DIMENSIONS:
        g = monthly_groups_table.c
        query = (
            select(
                g.user_key.label("user_id"),
                *(func.sum(g[measure]).label(measure) for measure in SUMMED),
                func.min(g.first_ts).label("first_ts"),
                func.max(g.last_ts).label("last_ts"),
            )
            .where(
                *within(g.month, parts.months),
                g.dimension == name,
                g.value == value,
                g.user_key != "",
            )
            .group_by(g.user_key)
        )
    else:
        calls = source(since_us, until_us, SOME_USER)
        query = (
            select(calls.c.user_id, *totals_of(calls), *seen_of(calls))
            .where(dimension_of(calls, name) == value)
            .group_by(calls.c.user_id)
        )
    with reading(engine) as conn:
        return [user_totals_of(row.user_id, row) for row in conn.execute(query)]


#: Dimensions without a monthly rollup of their own ("user" has the per-user one).
_HOURLY_ONLY = ("user", "provider", "operation")


def totals_by(
    engine: Engine, dimension: str, since_us: int | None, until_us: int | None
) -> list[GroupTotals]:
    """Totals per value of ``dimension``, most expensive first (the None group last of equals)."""
    parts = split_period(since_us, until_us)
    if dimension not in _HOURLY_ONLY and parts.only_months and parts.months is not None:
        return _monthly_totals_by(engine, dimension, parts.months)
    calls = source(since_us, until_us, detail=dimension != "user")
    key = dimension_of(calls, dimension).label("value")
    cost = func.sum(calls.c.cost_nano_usd)
    query = (
        select(key, func.count(func.distinct(calls.c.user_id)).label("users"), *totals_of(calls))
        .group_by(key)
        # The None group last on every database (SQLite sorts NULL first, PostgreSQL last).
        .order_by(cost.desc(), key.is_(None), key)
    )
    with reading(engine) as conn:
        return [_group(row.value, row) for row in conn.execute(query)]


def _monthly_totals_by(engine: Engine, dimension: str, months: Range) -> list[GroupTotals]:
    """``totals_by`` over whole UTC months, from the monthly rollups: each value's totals
    from the pairs rollup (a few rows per model), its distinct users from the groups rollup.

    Calls without the property have no rows: their group is the months' totals minus the
    other groups, and its users are those with more calls than their grouped calls.
    """
    g = monthly_groups_table.c
    p = monthly_pairs_table.c
    m = monthly_users_table.c
    cost = func.sum(p.cost_nano_usd)
    if dimension == "model":
        value, of_dimension = p.model, p.dimension == ""
        # '' is how rollups store "no model": the None group, last among equal costs.
        order = (cost.desc(), value == "", value)
    else:
        value, of_dimension = p.value, p.dimension == dimension
        order = (cost.desc(), value == value, value)
    sums = tuple(func.coalesce(func.sum(p[name]), 0).label(name) for name in SUMMED)
    values = (
        select(value.label("value"), *sums)
        .where(of_dimension, *within(p.month, months))
        .group_by(value)
        .order_by(*order)
    )
    in_groups = [g.dimension == dimension, *within(g.month, months)]
    users: Select[Any]
    if one_month(months) is not None:
        v = monthly_values_table.c
        users = select(v.value, v.users).where(v.dimension == dimension, *within(v.month, months))
    else:
        # A user of two months counts once.
        count = func.count(func.distinct(func.nullif(g.user_key, "")))
        users = select(g.value, count.label("users")).where(*in_groups).group_by(g.value)
    everything = select(*sums).where(p.dimension == "", *within(p.month, months))
    with reading(engine) as conn:
        rows = list(conn.execute(values))
        user_counts: dict[str, int] = {row[0]: int(row[1]) for row in conn.execute(users)}
        total = conn.execute(everything).one()
        found = [
            _group(
                None if dimension == "model" and row.value == "" else row.value,
                SimpleNamespace(users=user_counts.get(row.value, 0), **row._mapping),
            )
            for row in rows
        ]
        rest = {
            name: int(getattr(total, name)) - sum(int(getattr(row, name)) for row in rows)
            for name in SUMMED
        }
        if rest["requests"] <= 0:
            return found
        per_user = (
            select(g.month, g.user_key, func.sum(g.requests).label("grouped"))
            .where(*in_groups)
            .group_by(g.month, g.user_key)
            .subquery()
        )
        users_without = (
            select(func.count(func.distinct(func.nullif(m.user_key, ""))))
            .select_from(
                monthly_users_table.outerjoin(
                    per_user, and_(per_user.c.month == m.month, per_user.c.user_key == m.user_key)
                )
            )
            .where(*within(m.month, months), m.requests > func.coalesce(per_user.c.grouped, 0))
        )
        missing_users = int(conn.execute(users_without).scalar() or 0)
    none = _group(None, SimpleNamespace(users=missing_users, **rest))
    # After the groups that cost more or as much: the None group sorts last among equals.
    position = sum(1 for group in found if group.cost_usd >= none.cost_usd)
    found.insert(position, none)
    return found


def has_property(engine: Engine, key: str) -> bool:
    """Whether any stored call carries the property ``key``."""
    query = select(_c.id).where(_c.properties[key].as_string().is_not(None)).limit(1)
    with engine.connect() as conn:
        return conn.execute(query).first() is not None


def iter_records(
    engine: Engine,
    since_us: int | None,
    until_us: int | None,
    user_id: str | None = None,
    batch: int = 5_000,
) -> Iterator[dict[str, Any]]:
    """Stored records in time order, streamed from the database in batches."""
    query = select(usage_table).where(*period_conditions(since_us, until_us))
    if user_id is not None:
        query = query.where(_c.user_id == user_id)
    query = query.order_by(_c.ts, _c.id)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch).execute(query)
        for row in result:
            yield dict(row._mapping)


def latest_records(
    engine: Engine, user_id: str, since_us: int | None, until_us: int | None, count: int
) -> list[dict[str, Any]]:
    """A user's last ``count`` calls of the period, newest first (through the user index)."""
    query = (
        select(usage_table)
        .where(_c.user_id == user_id, *period_conditions(since_us, until_us))
        .order_by(_c.ts.desc(), _c.id.desc())
        .limit(count)
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def count_records(
    engine: Engine, since_us: int | None, until_us: int | None, user_id: str | None = None
) -> int:
    query = (
        select(func.count()).select_from(usage_table).where(*period_conditions(since_us, until_us))
    )
    if user_id is not None:
        query = query.where(_c.user_id == user_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)

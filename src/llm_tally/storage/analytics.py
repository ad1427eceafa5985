"""Group-by totals and raw record export: what billing and per-plan questions are answered from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, select

from .._money import average_usd, nano_to_usd
from .models import usage_table
from .queries import COST, TOTALS, period_conditions

_c = usage_table.c

#: Dimensions that are columns of a record rather than properties.
BUILT_IN_DIMENSIONS = ("user", "model", "provider", "operation")


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


def totals_by(
    engine: Engine, dimension: str, since_us: int | None, until_us: int | None
) -> list[GroupTotals]:
    """Totals per value of ``dimension``, most expensive first."""
    key = dimension_column(dimension).label("value")
    query = (
        select(key, func.count(func.distinct(_c.user_id)).label("users"), *TOTALS)
        .where(*period_conditions(since_us, until_us))
        .group_by(key)
        # The None group last on every database (SQLite sorts NULL first, PostgreSQL last).
        .order_by(COST.desc(), key.is_(None), key)
    )
    with engine.connect() as conn:
        return [
            GroupTotals(
                value=row.value,
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
            for row in conn.execute(query)
        ]


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

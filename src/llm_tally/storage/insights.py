"""Profitability, activity, anomalies and expensive operations, answered from the store.

These read raw rows of the period asked for. Percentiles (latency, time to first token)
can only come from raw rows; the totals will move to rollups as the store grows.
"""

from __future__ import annotations

import calendar
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal

from sqlalchemy import Engine, func, select

from .._money import average_usd, nano_to_usd, round_usd
from .._time import from_epoch_us, to_epoch_us
from .analytics import dimension_column, dimension_of
from .models import (
    monthly_groups_table,
    monthly_pairs_table,
    monthly_users_table,
    usage_table,
)
from .queries import period_conditions
from .rollups import BUILT_IN_DIMENSIONS
from .source import (
    ANYONE,
    SOME_USER,
    Range,
    parts_source,
    reading,
    source,
    split_period,
    split_windows,
    within,
)

_c = usage_table.c
_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000

Revenue = Mapping[str, Decimal | int | str] | Callable[[str], Decimal | int | str | None]


# -- profitability ---------------------------------------------------------------------------


def check_revenue(revenue: object) -> None:
    """Revenue must be a mapping of exact monthly prices, or a callable; else ValueError."""
    if callable(revenue):
        return
    if not isinstance(revenue, Mapping):
        raise ValueError(
            "revenue must be a mapping such as {'free': 0, 'pro': '20.00'} (monthly price per "
            f"plan) or a callable user_id -> monthly price, got {type(revenue).__name__}"
        )
    for plan, price in revenue.items():
        if isinstance(price, float | bool) or not isinstance(price, Decimal | int | str):
            raise ValueError(
                f"revenue[{plan!r}] must be a Decimal, int or str (floats are inexact)"
            )
        try:
            amount = Decimal(price)
        except ArithmeticError:
            raise ValueError(f"revenue[{plan!r}] is not a number: {price!r}") from None
        if not amount.is_finite() or amount < 0:
            raise ValueError(f"revenue[{plan!r}] must be >= 0, got {price!r}")


@dataclass(frozen=True, slots=True)
class UserProfit:
    """One user's revenue, cost and margin for a period (all exact USD)."""

    user_id: str
    #: The value of the revenue property (e.g. the plan) on the user's latest call.
    plan: str | None
    requests: int
    revenue_usd: Decimal
    cost_usd: Decimal

    @property
    def margin_usd(self) -> Decimal:
        return self.revenue_usd - self.cost_usd


def months_in_period(since: datetime, until: datetime) -> Decimal:
    """How many calendar months ``[since, until)`` spans, partial months pro rata by time.

    Months are those of ``since``'s time zone: a whole calendar month there is exactly 1,
    whatever its length or clock changes.
    """
    if until <= since:
        return Decimal(0)
    until = until.astimezone(since.tzinfo)
    total = Decimal(0)
    cursor = since
    while cursor < until:
        year, month = cursor.year, cursor.month
        start = cursor.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(year, month)[1]
        end = start + timedelta(days=days)
        covered = min(end, until) - cursor
        total += Decimal(covered // timedelta(microseconds=1)) / Decimal(days * _US_PER_DAY)
        cursor = end
    return total


def profitability(
    engine: Engine,
    revenue: Revenue,
    dimension: str,
    since: datetime,
    until: datetime,
) -> list[UserProfit]:
    """Each user's revenue (monthly price x months in the period), cost and margin.

    ``revenue`` maps a value of ``dimension`` (the user's plan on their latest call in the
    period) to a monthly price, or is a callable ``user_id -> monthly price``. Users with no
    price get revenue 0. Sorted by margin, least profitable first.
    """
    months = months_in_period(since, until)
    since_us = to_epoch_us(since, "since")
    until_us = to_epoch_us(until, "until")
    parts = split_period(since_us, until_us)
    if parts.only_months and parts.months is not None and dimension not in BUILT_IN_DIMENSIONS:
        plans, rows = _monthly_plans_and_costs(engine, dimension, parts.months)
    else:
        plans, rows = _plans_and_costs(engine, dimension, since_us, until_us)
    results = []
    for row in rows:
        plan = plans.get(row.user_id)
        if callable(revenue):
            monthly = revenue(row.user_id)
        else:
            monthly = revenue.get(plan) if plan is not None else None
        price = Decimal(monthly) if monthly is not None else Decimal(0)
        results.append(
            UserProfit(
                user_id=row.user_id,
                plan=plan,
                requests=int(row.requests),
                revenue_usd=round_usd(price * months),
                cost_usd=nano_to_usd(int(row.cost)),
            )
        )
    results.sort(key=lambda p: (p.margin_usd, p.user_id))
    return results


def _plans_and_costs(
    engine: Engine, dimension: str, since_us: int, until_us: int
) -> tuple[dict[str, str | None], list[Any]]:
    """Each user's ``dimension`` value on their latest call, and their requests and cost."""
    key = dimension_column(dimension)
    latest = (
        select(_c.user_id, func.max(_c.ts).label("ts"))
        .where(_c.user_id.is_not(None), *period_conditions(since_us, until_us))
        .group_by(_c.user_id)
        .subquery()
    )
    plan_query = (
        select(_c.user_id, key.label("plan"))
        .join(latest, (latest.c.user_id == _c.user_id) & (latest.c.ts == _c.ts))
        .where(*period_conditions(since_us, until_us))
    )
    calls = source(since_us, until_us, SOME_USER, detail=False)
    totals_query = select(
        calls.c.user_id,
        func.sum(calls.c.requests).label("requests"),
        func.sum(calls.c.cost_nano_usd).label("cost"),
    ).group_by(calls.c.user_id)
    with reading(engine) as conn:
        plans = {row.user_id: row.plan for row in conn.execute(plan_query)}
        return plans, list(conn.execute(totals_query))


def _monthly_plans_and_costs(
    engine: Engine, dimension: str, months: Range
) -> tuple[dict[str, str | None], list[Any]]:
    """As :func:`_plans_and_costs`, for whole UTC months, from the monthly rollups: the
    latest call's value is the value whose last call is the user's last call (None when the
    user's last call had no such property)."""
    m = monthly_users_table.c
    g = monthly_groups_table.c
    totals_query = (
        select(
            m.user_key.label("user_id"),
            func.sum(m.requests).label("requests"),
            func.sum(m.cost_nano_usd).label("cost"),
            func.max(m.last_ts).label("last_ts"),
        )
        .where(*within(m.month, months), m.user_key != "")
        .group_by(m.user_key)
    )
    values_query = (
        select(g.user_key, g.value, func.max(g.last_ts).label("last_ts"))
        .where(*within(g.month, months), g.dimension == dimension, g.user_key != "")
        .group_by(g.user_key, g.value)
        .order_by(g.user_key, g.value)
    )
    latest: dict[str, tuple[int, str]] = {}
    with reading(engine) as conn:
        rows = list(conn.execute(totals_query))
        for user_id, value, last_ts in conn.execute(values_query):
            if user_id not in latest or last_ts > latest[user_id][0]:
                latest[user_id] = (last_ts, value)
    plans: dict[str, str | None] = {}
    for row in rows:
        last_ts, value = latest.get(row.user_id, (None, None))
        plans[row.user_id] = value if last_ts == row.last_ts else None
    return plans, rows


# -- activity --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Activity:
    """How a user (or a model) is used: cadence, size of calls, errors, speed."""

    key: str | None
    requests: int
    first_seen: datetime
    last_seen: datetime
    #: Distinct UTC days with at least one call.
    active_days: int
    avg_requests_per_active_day: Decimal
    avg_tokens_per_request: Decimal
    error_rate: Decimal
    latency_p50_ms: Decimal | None
    latency_p95_ms: Decimal | None
    ttft_p50_ms: Decimal | None


def _percentile(values: list[int], percent: int) -> Decimal | None:
    """Nearest-rank percentile (the smallest value with ``percent`` % at or below it) of
    microsecond values, in milliseconds."""
    if not values:
        return None
    values.sort()
    rank = -(-percent * len(values) // 100)  # ceil(percent / 100 * n), in integers
    return (Decimal(values[max(rank, 1) - 1]) / 1000).quantize(Decimal("0.001"))


def activity(
    engine: Engine,
    by: Literal["user", "model"],
    since_us: int | None,
    until_us: int | None,
    key: str | None = None,
) -> list[Activity]:
    """Activity per user or per model (only ``key``'s when given), busiest first."""
    column = dimension_column(by)
    query = select(
        column.label("key"),
        _c.ts,
        _c.status,
        _c.input_tokens + _c.output_tokens,
        _c.latency_us,
        _c.ttft_us,
    ).where(*period_conditions(since_us, until_us))
    if key is not None:
        query = query.where(column == key)
    groups: dict[Any, dict[str, Any]] = defaultdict(
        lambda: {
            "n": 0,
            "errors": 0,
            "tokens": 0,
            "days": set(),
            "lat": [],
            "ttft": [],
            "first": None,
            "last": None,
        }
    )
    with engine.connect() as conn:
        for group_key, ts, status, tokens, latency, ttft in conn.execute(query):
            g = groups[group_key]
            g["n"] += 1
            g["errors"] += status != "ok"
            g["tokens"] += tokens
            g["days"].add(ts // _US_PER_DAY)
            g["first"] = ts if g["first"] is None else min(g["first"], ts)
            g["last"] = ts if g["last"] is None else max(g["last"], ts)
            if latency is not None:
                g["lat"].append(latency)
            if ttft is not None:
                g["ttft"].append(ttft)
    results = []
    for group_key, g in groups.items():
        n, days = g["n"], len(g["days"])
        results.append(
            Activity(
                key=group_key,
                requests=n,
                first_seen=from_epoch_us(g["first"]),
                last_seen=from_epoch_us(g["last"]),
                active_days=days,
                avg_requests_per_active_day=_ratio(n, days),
                avg_tokens_per_request=_ratio(g["tokens"], n),
                error_rate=_ratio(g["errors"], n, "0.0001"),
                latency_p50_ms=_percentile(g["lat"], 50),
                latency_p95_ms=_percentile(g["lat"], 95),
                ttft_p50_ms=_percentile(g["ttft"], 50),
            )
        )
    results.sort(key=lambda a: (-a.requests, a.key or ""))
    return results


def _ratio(numerator: int, denominator: int, places: str = "0.01") -> Decimal:
    if denominator == 0:
        return Decimal(0).quantize(Decimal(places))
    return (Decimal(numerator) / denominator).quantize(Decimal(places), rounding=ROUND_HALF_EVEN)


# -- anomalies -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A user whose recent usage is far above their own baseline or the population's."""

    user_id: str
    metric: Literal["requests", "cost"]
    #: "self" (against the user's own history) or "population" (against other users).
    compared_to: Literal["self", "population"]
    recent: Decimal
    baseline_median: Decimal
    #: Robust z-score: (recent - median) / (1.4826 * MAD), with a floor on the MAD.
    score: Decimal
    reason: str


_MAD_TO_SIGMA = Decimal("1.4826")
# The smallest spread a baseline is given, so a user who was idle (MAD 0) is not flagged
# for one call: 1 request, or 0.001 USD (in nano-USD).
_SPREAD_FLOOR = {"requests": Decimal(1), "cost": Decimal(1_000_000)}


def _spread(baseline: list[Decimal], floor: Decimal) -> tuple[Decimal, Decimal]:
    """(median, robust spread: 1.4826 x MAD, at least ``floor``) of ``baseline``."""
    median = Decimal(statistics.median(baseline)) if baseline else Decimal(0)
    deviations = [abs(b - median) for b in baseline]
    mad = Decimal(statistics.median(deviations)) if deviations else Decimal(0)
    return median, max(_MAD_TO_SIGMA * mad, floor)


def _score(value: Decimal, median: Decimal, spread: Decimal) -> Decimal:
    """The robust z-score of ``value``."""
    return ((value - median) / spread).quantize(Decimal("0.1"))


def anomalies(
    engine: Engine,
    window: Literal["hour", "day"],
    now: datetime,
    baseline_windows: int,
    threshold: Decimal,
    min_requests: int,
) -> list[Anomaly]:
    """Users whose last ``window`` is far above their own median window of the
    ``baseline_windows`` before it, or far above the other users' last window.

    Robust statistics (median and median absolute deviation), so that a few heavy users do
    not hide each other. Windows without calls count as zero in a user's own baseline.
    """
    size = _US_PER_HOUR if window == "hour" else _US_PER_DAY
    end = int(now.astimezone(UTC).timestamp() * 1_000_000)
    start = end - (baseline_windows + 1) * size
    calls = parts_source(split_windows(start, size, baseline_windows + 1), SOME_USER)
    bucket = ((calls.c.at - start) // size).label("bucket")
    query = select(
        calls.c.user_id,
        bucket,
        func.sum(calls.c.requests).label("requests"),
        func.sum(calls.c.cost_nano_usd).label("cost"),
    ).group_by(calls.c.user_id, bucket)
    # user -> metric -> one value per window, the last window being the recent one
    series: dict[str, dict[str, list[Decimal]]] = defaultdict(
        lambda: {m: [Decimal(0)] * (baseline_windows + 1) for m in _SPREAD_FLOOR}
    )
    with reading(engine) as conn:
        for user_id, index, requests, cost in conn.execute(query):
            series[user_id]["requests"][int(index)] = Decimal(requests)
            series[user_id]["cost"][int(index)] = Decimal(cost)
    found: list[Anomaly] = []
    for metric, floor in _SPREAD_FLOOR.items():
        # The same for every user: computed once.
        population = _spread([values[metric][-1] for values in series.values()], floor)
        for user_id, values in series.items():
            if values["requests"][-1] < min_requests:
                continue
            recent = values[metric][-1]
            for compared_to, (median, spread) in (
                ("self", _spread(values[metric][:-1], floor)),
                ("population", population),
            ):
                score = _score(recent, median, spread)
                if score >= threshold:
                    found.append(
                        _anomaly(
                            user_id,
                            metric,
                            compared_to,
                            recent,
                            median,
                            score,
                            window,
                            baseline_windows,
                        )
                    )
    found.sort(key=lambda a: (-a.score, a.user_id, a.metric, a.compared_to))
    return found


def _anomaly(
    user_id: str,
    metric: str,
    compared_to: str,
    recent: Decimal,
    median: Decimal,
    score: Decimal,
    window: str,
    baseline_windows: int,
) -> Anomaly:
    def show(value: Decimal) -> str:
        if metric == "requests":
            return f"{value.normalize():f} request{'' if value == 1 else 's'}"
        return f"${format(nano_to_usd(int(value)), 'f')}"

    against = (
        f"their own median over the previous {baseline_windows} {window}s"
        if compared_to == "self"
        else f"the median user in the same {window}"
    )
    return Anomaly(
        user_id=user_id,
        metric=metric,  # type: ignore[arg-type]
        compared_to=compared_to,  # type: ignore[arg-type]
        recent=recent if metric == "requests" else nano_to_usd(int(recent)),
        baseline_median=median if metric == "requests" else nano_to_usd(int(median)),
        score=score,
        reason=(
            f"{show(recent)} in the last {window}, against {show(median)} per {window} for "
            f"{against} (robust z-score {score})"
        ),
    )


# -- expensive operations --------------------------------------------------------------------


def expensive_calls(
    engine: Engine,
    since_us: int | None,
    until_us: int | None,
    user_id: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The costliest calls of the period (optionally of one user), most expensive first."""
    query = select(usage_table).where(
        _c.cost_nano_usd.is_not(None), *period_conditions(since_us, until_us)
    )
    if user_id is not None:
        query = query.where(_c.user_id == user_id)
    query = query.order_by(_c.cost_nano_usd.desc(), _c.ts).limit(limit)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


@dataclass(frozen=True, slots=True)
class PairTotals:
    """What one (model, property value) pair cost, e.g. (gpt-4o, feature=summarize)."""

    model: str | None
    value: str | None
    requests: int
    cost_usd: Decimal
    #: Calls whose model had no known price: counted in requests, not in cost_usd.
    unpriced_requests: int = 0

    @property
    def avg_cost_per_request(self) -> Decimal:
        """``cost_usd / requests`` (unpriced calls included), rounded to the nano-dollar."""
        return average_usd(self.cost_usd, self.requests)


def expensive_pairs(
    engine: Engine,
    dimension: str,
    since_us: int | None,
    until_us: int | None,
    user_id: str | None,
    limit: int,
) -> list[PairTotals]:
    """The costliest (model, ``dimension`` value) pairs, most expensive first."""
    parts = split_period(since_us, until_us)
    if (
        user_id is None
        and parts.only_months
        and parts.months is not None
        and dimension not in BUILT_IN_DIMENSIONS
    ):
        return _monthly_pairs(engine, dimension, parts.months, limit)
    calls = source(since_us, until_us, ANYONE if user_id is None else user_id)
    model = calls.c.model.label("model")
    value = dimension_of(calls, dimension).label("value")
    cost = func.sum(calls.c.cost_nano_usd)
    query = (
        select(
            model,
            value,
            func.sum(calls.c.requests).label("requests"),
            cost.label("cost"),
            func.sum(calls.c.unpriced).label("unpriced"),
        )
        .group_by(model, value)
        .order_by(cost.desc(), model.is_(None), model, value.is_(None), value)
        .limit(limit)
    )
    with reading(engine) as conn:
        return [_pair(row.model, row.value, row) for row in conn.execute(query)]


def _pair(model: str | None, value: str | None, row: Any) -> PairTotals:
    return PairTotals(
        model, value, int(row.requests), nano_to_usd(int(row.cost)), int(row.unpriced)
    )


def _monthly_pairs(engine: Engine, dimension: str, months: Range, limit: int) -> list[PairTotals]:
    """``expensive_pairs`` over whole UTC months: the pairs rollup, plus per model the calls
    without the property (the model's total minus its pairs)."""
    p = monthly_pairs_table.c
    measures = (
        func.sum(p.requests).label("requests"),
        func.sum(p.cost_nano_usd).label("cost"),
        func.sum(p.unpriced).label("unpriced"),
    )
    pairs = (
        select(p.model, p.value, *measures)
        .where(p.dimension == dimension, *within(p.month, months))
        .group_by(p.model, p.value)
    )
    # Dimension '' holds every call of each model.
    models = (
        select(p.model, *measures)
        .where(p.dimension == "", *within(p.month, months))
        .group_by(p.model)
    )
    with reading(engine) as conn:
        rows = list(conn.execute(pairs))
        rest = {
            row.model: [int(row.requests), int(row.cost), int(row.unpriced)]
            for row in conn.execute(models)
        }
    for row in rows:
        left = rest[row.model]
        left[0] -= int(row.requests)
        left[1] -= int(row.cost)
        left[2] -= int(row.unpriced)
    # '' is how rollups store "no model".
    found = [_pair(row.model or None, row.value, row) for row in rows]
    found.extend(
        PairTotals(model or None, None, requests, nano_to_usd(cost), unpriced)
        for model, (requests, cost, unpriced) in rest.items()
        if requests > 0
    )
    found.sort(key=_pair_order)
    return found[:limit]


def _pair_order(pair: PairTotals) -> tuple[Any, ...]:
    """The SQL order of pairs: cost, then model and value, None after any name."""
    return (
        -pair.cost_usd,
        pair.model is None,
        pair.model or "",
        pair.value is None,
        pair.value or "",
    )

"""Insights: profitability, activity, anomalies, expensive calls and (model, property) pairs.

Stores are seeded only through ``Tally.record()`` from seeded random generators, and every
expected number is computed here from those inputs with an independent implementation
(exact ``Fraction`` arithmetic, half-even rounding done by hand). The same answers are then
read through the JSON endpoints of a real uvicorn server (FastAPI) and a real werkzeug server
(Flask), and through the ``llm-tally`` command line run as subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import flask
import httpx2
import openai
import pytest
from fastapi import FastAPI

import llm_tally
from llm_tally import Tally
from llm_tally.demo.serve import BackgroundServer
from llm_tally.storage.insights import months_in_period
from tests.conftest import serve_wsgi, stored_rows

NANO = 10**9
PARIS = ZoneInfo("Europe/Paris")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
US = timedelta(microseconds=1)
MONEY = re.compile(r"^-?\d+\.\d{9}$")
MILLIS = re.compile(r"^\d+\.\d{3}$")
REVENUE: dict[str, Any] = {"free": 0, "pro": "20.00", "team": Decimal("49.99")}
CLI_PRICES: dict[str, Any] = {"free": 0, "pro": 20}
UNPRICED_MODEL = "acme-unpriced-1"
ENDPOINTS = ("/api/profitability", "/api/activity", "/api/anomalies", "/api/expensive")


# -- seeded inputs ---------------------------------------------------------------------------


@dataclass
class Call:
    """One call given to ``Tally.record()``; ``cost_nano`` None leaves it unpriced."""

    user: str | None
    model: str
    ts: datetime
    cost_nano: int | None
    properties: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    latency_ms: int | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    #: Give record() the same instant as a Paris wall-clock time.
    as_paris: bool = False
    id: str = ""


def seed(tally: Tally, calls: list[Call]) -> None:
    for call in calls:
        call.id = tally.record(
            user_id=call.user,
            model=call.model,
            ts=call.ts.astimezone(PARIS) if call.as_paris else call.ts,
            cost_usd=None if call.cost_nano is None else Decimal(call.cost_nano).scaleb(-9),
            properties=call.properties or None,
            status=call.status,
            latency_ms=call.latency_ms,
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
        )
    assert tally.flush(30), "records were not stored in time"


def random_moment(rng: random.Random, start: datetime, end: datetime) -> datetime:
    return start + US * rng.randrange((end - start) // US)


def random_cost(rng: random.Random, high_usd: int = 3) -> int:
    return rng.randrange(1, high_usd * NANO)


def profit_calls(rng: random.Random) -> list[Call]:
    """Calls around February 2024 with plans, for profitability."""
    start, end = datetime(2024, 1, 20, tzinfo=UTC), datetime(2024, 3, 31, tzinfo=UTC)
    calls: list[Call] = []
    for i in range(8):
        plan = rng.choice(("free", "pro", "team"))
        for _ in range(rng.randint(1, 15)):
            priced = rng.random() > 0.15
            calls.append(
                Call(
                    f"p{i}",
                    "gpt-4o" if priced else UNPRICED_MODEL,
                    random_moment(rng, start, end),
                    random_cost(rng) if priced else None,
                    {"plan": plan, "tier": f"t-{plan}"},
                    input_tokens=rng.randint(1, 500),
                )
            )

    def add(user: str | None, plan: str | None, moment: datetime) -> None:
        props = {} if plan is None else {"plan": plan, "tier": f"t-{plan}"}
        calls.append(Call(user, "gpt-4o-mini", moment, random_cost(rng), props))

    # Free until mid-February, then pro: pro is the plan of the latest call in February.
    for month, day in ((1, 25), (1, 28), (2, 3), (2, 9), (2, 14), (2, 15), (2, 20), (2, 27)):
        plan = "free" if (month, day) < (2, 15) else "pro"
        add("switcher", plan, datetime(2024, month, day, 10, tzinfo=UTC))
    # Pro in February, team after it: a call after `until` does not decide the plan.
    for moment in (datetime(2024, 2, 5), datetime(2024, 2, 22), datetime(2024, 3, 5)):
        add("upgrader", "team" if moment.month == 3 else "pro", moment.replace(tzinfo=UTC))
    for day in (2, 12, 24):
        add("planless", None, datetime(2024, 2, day, 8, tzinfo=UTC))
        add("legacy", "legacy", datetime(2024, 2, day, 9, tzinfo=UTC))
        add(None, "pro", datetime(2024, 2, day, 9, tzinfo=UTC))
    # Exactly on the bounds of February: `since` is in, `until` is out.
    add("edge", "pro", datetime(2024, 2, 1, tzinfo=UTC))
    add("edge", "team", datetime(2024, 3, 1, tzinfo=UTC))
    return calls


ACTIVITY_MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini")


def activity_calls(rng: random.Random) -> list[Call]:
    """May 2024: users with random statuses, sizes and latencies."""
    start, end = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 11, tzinfo=UTC)
    calls: list[Call] = []
    for user in ("a0", "a1", "a2", "a3", "a4", "a5", None):
        for _ in range(rng.randint(5, 60)):
            roll = rng.random()
            calls.append(
                Call(
                    user,
                    rng.choice(ACTIVITY_MODELS),
                    random_moment(rng, start, end),
                    random_cost(rng),
                    {"feature": rng.choice(("chat", "search"))},
                    status="ok" if roll < 0.8 else "error" if roll < 0.92 else "aborted",
                    latency_ms=None if rng.random() < 0.15 else rng.randint(20, 4000),
                    input_tokens=rng.randint(0, 3000),
                    output_tokens=rng.randint(0, 800),
                    as_paris=rng.random() < 0.3,
                )
            )
    # UTC days: the last microsecond of May 3rd, midnight of May 4th, and 01:30 in Paris on
    # May 5th (23:30 UTC on May 4th): two active days.
    for moment in (
        datetime(2024, 5, 3, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2024, 5, 4, tzinfo=UTC),
        datetime(2024, 5, 5, 1, 30, tzinfo=PARIS),
    ):
        calls.append(
            Call("edge", "gpt-4o", moment.astimezone(UTC), 1_000, latency_ms=7, as_paris=True)
        )
    return calls


EXPENSIVE_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")


def expensive_calls_seed(rng: random.Random) -> list[Call]:
    """July 2024: priced calls of several models and features, and unpriced ones."""
    start, end = datetime(2024, 7, 1, tzinfo=UTC), datetime(2024, 7, 20, tzinfo=UTC)
    calls: list[Call] = []
    for _ in range(260):
        priced = rng.random() > 0.12
        feature = rng.choice(("summarize", "chat", "search", None))
        props = {"plan": rng.choice(("free", "pro"))}
        if feature is not None:
            props["feature"] = feature
        calls.append(
            Call(
                rng.choice(("x0", "x1", "x2", "x3", None)),
                rng.choice(EXPENSIVE_MODELS) if priced else UNPRICED_MODEL,
                random_moment(rng, start, end),
                random_cost(rng, 5) if priced else None,
                props,
                input_tokens=rng.randint(1, 9000),
                output_tokens=rng.randint(1, 2000),
            )
        )
    return calls


def anomaly_calls(
    rng: random.Random, now: datetime, size: timedelta, baseline: int, *, edges: bool
) -> list[Call]:
    """``baseline`` windows of steady users before ``now``, then the last window with:
    a burst, a newcomer, a consistently heavy user, a quiet expensive user, users gone quiet
    and anonymous calls.

    Every call sits in the middle 40 % of its window, so the answer does not move while the
    test runs when ``now`` is the current time. ``edges`` adds calls on the window bounds.
    """
    start = now - (baseline + 1) * size
    calls: list[Call] = []

    def put(user: str | None, window: int, count: int, cost: int | None = None) -> None:
        for _ in range(count):
            moment = start + window * size + size * rng.uniform(0.3, 0.7)
            price = cost if cost is not None else rng.randrange(1_500_000, 3_000_001)
            calls.append(Call(user, "gpt-4o-mini", moment, price))

    for window in range(baseline + 1):
        for i in range(12):
            put(f"steady-{i:02d}", window, rng.randint(3, 6))
        put("heavy", window, rng.randint(20, 24))
        if window < baseline:
            put("burst", window, rng.randint(3, 6))
            # Users gone quiet: zeros in the population of the last window.
            for i in range(4):
                put(f"gone-{i}", window, rng.randint(0, 2))
    put("burst", baseline, 60)
    put("newcomer", baseline, 40)
    put("quiet", baseline, 3, cost=2_500_000_000)
    put(None, baseline, 30)
    if edges:
        # `now` is excluded and so is the microsecond before the first window; the first
        # window's first microsecond is in.
        calls.append(Call("burst", "gpt-4o", now, 100 * NANO))
        calls.append(Call("burst", "gpt-4o", start - US, 100 * NANO))
        calls.append(Call("steady-01", "gpt-4o", start, 2_000_000))
    return calls


# -- independent expectations ----------------------------------------------------------------


def usd(nano: int) -> Decimal:
    return Decimal(nano).scaleb(-9)


def round_half_even(value: Fraction, places: int) -> Decimal:
    """``value`` rounded half to even at ``places`` decimals (``round`` of a Fraction is)."""
    return Decimal(round(value * 10**places)).scaleb(-places)


def in_period(call: Call, since: datetime | None, until: datetime | None) -> bool:
    return (since is None or call.ts >= since) and (until is None or call.ts < until)


def expected_months(since: datetime, until: datetime) -> Fraction:
    """The overlap of ``[since, until)`` with each calendar month, over that month's length."""
    total = Fraction(0)
    year, month = since.year, since.month
    while True:
        start = datetime(year, month, 1, tzinfo=since.tzinfo)
        if start >= until:
            return total
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        end = datetime(year, month, 1, tzinfo=since.tzinfo)
        low, high = max(start, since), min(end, until)
        if high > low:
            total += Fraction((high - low) // US, (end - start) // US)


ProfitRow = tuple[str, str | None, int, Decimal, Decimal, Decimal]


def expected_profitability(
    calls: list[Call],
    revenue: Mapping[str, Any] | Callable[[str], Any],
    since: datetime,
    until: datetime,
    by: str = "plan",
) -> list[ProfitRow]:
    months = expected_months(since, until)
    mine: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        if call.user is not None and in_period(call, since, until):
            mine[call.user].append(call)
    rows: list[ProfitRow] = []
    for user, theirs in mine.items():
        plan = max(theirs, key=lambda c: c.ts).properties.get(by)
        if callable(revenue):
            price = revenue(user)
        else:
            price = revenue.get(plan) if plan is not None else None
        income = round_half_even(Fraction(str(price if price is not None else 0)) * months, 9)
        cost = usd(sum(c.cost_nano or 0 for c in theirs))
        rows.append((user, plan, len(theirs), income, cost, income - cost))
    rows.sort(key=lambda r: (r[5], r[0]))
    return rows


def profit_rows(profits: list[Any]) -> list[ProfitRow]:
    return [
        (p.user_id, p.plan, p.requests, p.revenue_usd, p.cost_usd, p.margin_usd) for p in profits
    ]


def nearest_rank(values: list[int], percent: int) -> Decimal | None:
    """The smallest value with at least ``percent`` % of the values at or below it."""
    for candidate in sorted(values):
        if sum(v <= candidate for v in values) * 100 >= percent * len(values):
            return Decimal(candidate).quantize(Decimal("0.001"))
    return None


ActivityRow = tuple[Any, ...]


def expected_activity(
    calls: list[Call],
    by: str,
    since: datetime | None = None,
    until: datetime | None = None,
    key: str | None = None,
) -> list[ActivityRow]:
    groups: dict[str | None, list[Call]] = defaultdict(list)
    for call in calls:
        group = call.user if by == "user" else call.model
        if in_period(call, since, until) and (key is None or group == key):
            groups[group].append(call)
    rows = []
    for group, theirs in groups.items():
        n = len(theirs)
        days = len({c.ts.astimezone(UTC).date() for c in theirs})
        latencies = [c.latency_ms for c in theirs if c.latency_ms is not None]
        rows.append(
            (
                group,
                n,
                min(c.ts for c in theirs),
                max(c.ts for c in theirs),
                days,
                round_half_even(Fraction(n, days), 2),
                round_half_even(
                    Fraction(sum(c.input_tokens + c.output_tokens for c in theirs), n), 2
                ),
                round_half_even(Fraction(sum(c.status != "ok" for c in theirs), n), 4),
                nearest_rank(latencies, 50),
                nearest_rank(latencies, 95),
                None,
            )
        )
    rows.sort(key=lambda r: (-r[1], r[0] or ""))
    return rows


def activity_rows(found: list[Any]) -> list[ActivityRow]:
    return [
        (
            a.key,
            a.requests,
            a.first_seen,
            a.last_seen,
            a.active_days,
            a.avg_requests_per_active_day,
            a.avg_tokens_per_request,
            a.error_rate,
            a.latency_p50_ms,
            a.latency_p95_ms,
            a.ttft_p50_ms,
        )
        for a in found
    ]


def median(values: list[Fraction]) -> Fraction:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


@dataclass(frozen=True)
class Score:
    user: str
    metric: str
    compared_to: str
    recent: Decimal
    median: Decimal
    score: Decimal


def all_scores(
    calls: list[Call], now: datetime, size: timedelta, baseline: int, min_requests: int
) -> list[Score]:
    """Every robust z-score (recent - median) / max(1.4826 * MAD, floor), unfiltered."""
    start = now - (baseline + 1) * size
    series: dict[str, dict[str, list[Fraction]]] = {}
    for call in calls:
        if call.user is None or not start <= call.ts < now:
            continue
        window = (call.ts - start) // size
        mine = series.setdefault(
            call.user, {m: [Fraction(0)] * (baseline + 1) for m in ("requests", "cost")}
        )
        mine["requests"][window] += 1
        mine["cost"][window] += call.cost_nano or 0
    scores = []
    for metric, floor in (("requests", Fraction(1)), ("cost", Fraction(1_000_000))):
        population = [mine[metric][-1] for mine in series.values()]
        for user, mine in series.items():
            if mine["requests"][-1] < min_requests:
                continue
            recent = mine[metric][-1]
            for compared_to, base in (("self", mine[metric][:-1]), ("population", population)):
                middle = median(base)
                spread = max(Fraction("1.4826") * median([abs(b - middle) for b in base]), floor)
                score = round_half_even((recent - middle) / spread, 1)
                if metric == "requests":
                    shown = (Decimal(int(recent)), Decimal(middle.numerator) / middle.denominator)
                else:
                    # A cost median shows whole nano-dollars (a half is cut off).
                    shown = (usd(int(recent)), usd(int(middle)))
                scores.append(Score(user, metric, compared_to, *shown, score))
    return scores


def expected_anomalies(
    calls: list[Call],
    now: datetime,
    size: timedelta,
    baseline: int,
    threshold: Decimal = Decimal(5),
    min_requests: int = 5,
) -> list[Score]:
    found = [
        s for s in all_scores(calls, now, size, baseline, min_requests) if s.score >= threshold
    ]
    found.sort(key=lambda s: (-s.score, s.user, s.metric, s.compared_to))
    return found


def anomaly_rows(found: list[Any]) -> list[Score]:
    return [
        Score(a.user_id, a.metric, a.compared_to, a.recent, a.baseline_median, a.score)
        for a in found
    ]


def expected_expensive_calls(
    calls: list[Call],
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    limit: int,
) -> list[tuple[Any, ...]]:
    chosen = [
        c
        for c in calls
        if c.cost_nano is not None
        and in_period(c, since, until)
        and (user is None or c.user == user)
    ]
    chosen.sort(key=lambda c: (-(c.cost_nano or 0), c.ts))
    return [(c.id, c.ts, c.user, c.model, c.properties, c.cost_nano) for c in chosen[:limit]]


def expensive_call_rows(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r["id"],
            EPOCH + r["ts"] * US,
            r["user_id"],
            r["response_model"],
            r["properties"],
            r["cost_nano_usd"],
        )
        for r in rows
    ]


PairRow = tuple[str, str | None, int, Decimal, Decimal]


def expected_pairs(
    calls: list[Call],
    dimension: str,
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    limit: int,
) -> list[PairRow]:
    totals: dict[tuple[str, str | None], list[int]] = defaultdict(lambda: [0, 0])
    for call in calls:
        if in_period(call, since, until) and (user is None or call.user == user):
            pair = totals[call.model, call.properties.get(dimension)]
            pair[0] += 1
            pair[1] += call.cost_nano or 0
    rows = [
        (model, value, n, usd(cost), round_half_even(Fraction(cost, n * NANO), 9))
        for (model, value), (n, cost) in totals.items()
    ]
    # Most expensive first, then model and value, a missing value after the others.
    rows.sort(key=lambda r: (-r[3], r[0], r[1] is None, r[1] or ""))
    return rows[:limit]


def pair_rows(pairs: list[Any]) -> list[PairRow]:
    return [(p.model, p.value, p.requests, p.cost_usd, p.avg_cost_per_request) for p in pairs]


# -- profitability ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "until", "months"),
    [
        (datetime(2026, 2, 1), datetime(2026, 3, 1), 1),  # 28 days
        (datetime(2024, 2, 1), datetime(2024, 3, 1), 1),  # 29 days
        (datetime(2026, 1, 1), datetime(2026, 2, 1), 1),  # 31 days
        (datetime(2026, 4, 1), datetime(2026, 5, 1), 1),  # 30 days
        (datetime(2026, 4, 1), datetime(2026, 6, 1), 2),
        (datetime(2025, 12, 1), datetime(2026, 2, 1), 2),
        (datetime(2026, 4, 1), datetime(2026, 4, 16), Fraction(1, 2)),
        (datetime(2026, 4, 10, 12), datetime(2026, 4, 25, 12), Fraction(1, 2)),
        (datetime(2026, 1, 15), datetime(2026, 3, 1), Fraction(17, 31) + 1),
        (datetime(2026, 3, 1), datetime(2026, 3, 1), 0),
        (datetime(2026, 3, 1), datetime(2026, 2, 1), 0),
    ],
)
def test_months_in_period_counts_calendar_months(
    since: datetime, until: datetime, months: Fraction | int
) -> None:
    since, until = since.replace(tzinfo=UTC), until.replace(tzinfo=UTC)
    found = months_in_period(since, until)
    assert isinstance(found, Decimal)
    if Fraction(months).denominator in (1, 2):
        assert found == Decimal(Fraction(months).numerator) / Fraction(months).denominator
    else:
        assert abs(Fraction(found) - Fraction(months)) < Fraction(1, 10**26)
    assert abs(Fraction(found) - expected_months(since, until)) < Fraction(1, 10**26)


def test_months_in_period_matches_the_overlap_of_each_calendar_month() -> None:
    rng = random.Random(20260301)
    for _ in range(300):
        since = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**9 // 4))
        until = since + timedelta(seconds=rng.randrange(1, 450 * 86_400))
        found = Fraction(months_in_period(since, until))
        assert abs(found - expected_months(since, until)) < Fraction(1, 10**24), (since, until)


def test_months_in_period_is_exact_to_the_microsecond() -> None:
    since = datetime(2026, 4, 1, tzinfo=UTC)
    covered = timedelta(days=25, hours=9, minutes=51, seconds=38, microseconds=572_849)
    found = months_in_period(since, since + covered)
    assert found == Decimal(covered // US) / Decimal(30 * DAY // US)


def test_a_paris_month_is_one_month() -> None:
    now = datetime.now(PARIS)
    for year, month in ((None, None), (2026, 3), (2026, 10), (2026, 2)):
        since, until = llm_tally.month_period(year, month, tz="Europe/Paris")
        assert (since.tzinfo, until.tzinfo) == (PARIS, PARIS)
        assert (since.day, since.hour, until.day, until.hour) == (1, 0, 1, 0)
        if year is None:
            assert (since.year, since.month) == (now.year, now.month)
        assert months_in_period(since, until) == 1


def test_profitability_of_a_paris_month_charges_one_monthly_price(tally: Tally) -> None:
    calls = [
        Call("alice", "gpt-4o", datetime(2026, month, 10, tzinfo=UTC), 1_000, {"plan": "pro"})
        for month in (2, 3, 10)
    ]
    seed(tally, calls)
    for month in (2, 3, 10):
        since, until = llm_tally.month_period(2026, month, tz="Europe/Paris")
        [profit] = tally.profitability({"pro": "20"}, since, until)
        assert profit.revenue_usd == 20, (month, profit)


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        (datetime(2024, 2, 10, tzinfo=UTC), datetime(2024, 3, 20, 6, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize(
    ("by", "revenue"),
    [("plan", REVENUE), ("tier", {"t-free": "0", "t-pro": 15, "t-team": "39.999999999"})],
)
def test_profitability_revenue_cost_and_margin_per_user(
    tally: Tally, since: datetime, until: datetime, by: str, revenue: dict[str, Any]
) -> None:
    calls = profit_calls(random.Random(11))
    seed(tally, calls)
    found = tally.profitability(revenue, since, until, by=by)
    expected = expected_profitability(calls, revenue, since, until, by)
    assert profit_rows(found) == expected
    margins = [p.margin_usd for p in found]
    assert margins == sorted(margins), "least profitable first"
    byuser = {p.user_id: p for p in found}
    months = expected_months(since, until)
    # The plan of the latest call in the period decides the price.
    assert byuser["switcher"].plan == ("pro" if by == "plan" else "t-pro")
    price = Fraction(str(revenue[byuser["switcher"].plan]))
    assert byuser["switcher"].revenue_usd == round_half_even(price * months, 9)
    in_feb = until.month == 3 and until.day == 1
    upgraded = "pro" if in_feb else "team"
    assert byuser["upgrader"].plan == (upgraded if by == "plan" else f"t-{upgraded}")
    # No price: no revenue, the cost still counts.
    for user in ("planless", "legacy"):
        assert byuser[user].revenue_usd == 0
        assert byuser[user].margin_usd == -byuser[user].cost_usd < 0
    assert byuser["planless"].plan is None
    assert None not in byuser
    # `since` is in, `until` is out.
    edges = [c.ts for c in calls if c.user == "edge" and in_period(c, since, until)]
    assert byuser["edge"].requests == len(edges) == 1
    assert edges == ([since] if in_feb else [datetime(2024, 3, 1, tzinfo=UTC)])
    for profit in found:
        assert profit.margin_usd == profit.revenue_usd - profit.cost_usd
        assert profit.cost_usd.as_tuple().exponent == -9


def test_profitability_revenue_callable_per_user(tally: Tally) -> None:
    calls = profit_calls(random.Random(12))
    seed(tally, calls)
    prices: dict[str, Any] = {"p0": "12.50", "p1": 7, "switcher": Decimal("3.333333333")}
    asked: list[str] = []

    def revenue(user_id: str) -> Any:
        asked.append(user_id)
        return prices.get(user_id)

    since, until = datetime(2024, 2, 10, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)
    found = tally.profitability(revenue, since, until)
    assert profit_rows(found) == expected_profitability(calls, prices.get, since, until)
    assert sorted(asked) == sorted(p.user_id for p in found)
    assert {p.user_id for p in found if p.revenue_usd} == set(prices) & {p.user_id for p in found}


@pytest.mark.parametrize(
    ("revenue", "message"),
    [
        ({"pro": 20.0}, "floats are inexact"),
        ({"pro": True}, "floats are inexact"),
        ({"pro": -1}, ">= 0"),
        ({"pro": "-0.01"}, ">= 0"),
        ({"pro": "NaN"}, ">= 0"),
        ({"pro": "twenty"}, "not a number"),
        ([("pro", 20)], "must be a mapping"),
        ("pro=20", "must be a mapping"),
        (20, "must be a mapping"),
    ],
)
def test_profitability_rejects_bad_revenue(tally: Tally, revenue: Any, message: str) -> None:
    since, until = date(2024, 2, 1), date(2024, 3, 1)
    with pytest.raises(ValueError, match=re.escape(message)):
        tally.profitability(revenue, since, until)
    with pytest.raises(ValueError, match=re.escape(message)):
        tally.init_app(FastAPI(), revenue=revenue)
    with pytest.raises(ValueError, match=re.escape(message)):
        tally.init_app(flask.Flask("bad_revenue"), revenue=revenue)


def test_profitability_needs_since_and_until(tally: Tally) -> None:
    for since, until in ((None, date(2024, 3, 1)), (date(2024, 2, 1), None), (None, None)):
        with pytest.raises(ValueError, match="since and until"):
            tally.profitability(REVENUE, since, until)


# -- activity --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (None, None),
        (datetime(2024, 5, 3, tzinfo=UTC), datetime(2024, 5, 7, 12, tzinfo=UTC)),
        (datetime(2024, 5, 4, tzinfo=UTC), None),
    ],
)
def test_activity_by_user_and_by_model(
    tally: Tally, since: datetime | None, until: datetime | None
) -> None:
    calls = activity_calls(random.Random(21))
    seed(tally, calls)
    for by in ("user", "model"):
        found = tally.activity(by, since, until)  # type: ignore[arg-type]
        expected = expected_activity(calls, by, since, until)
        assert activity_rows(found) == expected
        assert len(found) >= 3
        for row in found:
            assert row.latency_p50_ms is None or row.latency_p50_ms <= row.latency_p95_ms
            assert row.ttft_p50_ms is None, "manual records have no time to first token"
    byuser = {a.key: a for a in tally.activity("user", since, until)}
    assert None in byuser, "calls outside any user are their own row"
    if since is None:
        assert byuser["edge"].active_days == 2
        assert byuser["edge"].requests == 3


def test_activity_key_limits_the_answer_to_one_user_or_model(tally: Tally) -> None:
    calls = activity_calls(random.Random(22))
    seed(tally, calls)
    since = datetime(2024, 5, 2, tzinfo=UTC)
    for by, key in (("user", "a3"), ("user", "edge"), ("model", "gpt-4o-mini")):
        found = tally.activity(by, since=since, key=key)  # type: ignore[arg-type]
        assert activity_rows(found) == expected_activity(calls, by, since, key=key)
        assert [a.key for a in found] == [key]
    assert tally.activity("user", key="nobody") == []
    with pytest.raises(ValueError, match="by must be 'user' or 'model'"):
        tally.activity("weekday")  # type: ignore[arg-type]


def test_activity_nearest_rank_percentiles_of_known_latencies(tally: Tally) -> None:
    rng = random.Random(23)
    moment = datetime(2024, 6, 1, tzinfo=UTC)
    for n in (1, 2, 3, 19, 20, 21, 40):
        latencies = [rng.randint(1, 10_000) for _ in range(n)]
        user = f"n{n}"
        seed(
            tally,
            [
                Call(user, "gpt-4o", moment + i * US, 1, latency_ms=v)
                for i, v in enumerate(latencies)
            ],
        )
        [row] = tally.activity("user", key=user)
        ordered = sorted(latencies)
        # Nearest rank: the ceil(p * n / 100)-th smallest value.
        assert row.latency_p50_ms == ordered[-(-50 * n // 100) - 1]
        assert row.latency_p95_ms == ordered[-(-95 * n // 100) - 1]
        assert row.latency_p50_ms == nearest_rank(latencies, 50)
        assert row.latency_p95_ms == nearest_rank(latencies, 95)
        assert str(row.latency_p95_ms).endswith(".000")


def test_activity_time_to_first_token_of_real_streams(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user("streamer"):
        for words in (3, 5, 8):
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "tell me " * words}],
                stream=True,
                stream_options={"include_usage": True},
                max_completion_tokens=words,
            )
            for _ in stream:
                pass
    tally.record(user_id="streamer", model="gpt-4o-mini", latency_ms=60_000, cost_usd="0.01")
    rows = [r for r in stored_rows(tally) if r["user_id"] == "streamer"]
    assert len(rows) == 4
    streamed = [r for r in rows if r["ttft_us"] is not None]
    assert len(streamed) == 3
    for row in streamed:
        assert 0 < row["ttft_us"] <= row["latency_us"]
    [found] = tally.activity("user", key="streamer")

    def ms(values: list[int], percent: int) -> Decimal:
        ordered = sorted(values)
        chosen = next(v for v in ordered if sum(x <= v for x in ordered) * 100 >= percent * 4)
        return Decimal(chosen).scaleb(-3)

    latencies = [r["latency_us"] for r in rows]
    assert found.requests == 4
    assert found.latency_p50_ms == ms(latencies, 50)
    assert found.latency_p95_ms == Decimal(60_000)
    ttfts = sorted(r["ttft_us"] for r in streamed)
    assert found.ttft_p50_ms == Decimal(ttfts[1]).scaleb(-3)
    assert found.ttft_p50_ms.as_tuple().exponent == -3
    # The streams are grouped under the model that answered.
    [answered] = {r["response_model"] for r in streamed}
    [model] = tally.activity("model", key=answered)
    assert model.requests == 3
    assert model.ttft_p50_ms == found.ttft_p50_ms


# -- anomalies -------------------------------------------------------------------------------

FIXED_NOW = datetime(2026, 5, 20, 12, 17, 3, 250_000, tzinfo=UTC)


def test_anomalies_last_hour_against_self_and_population(tally: Tally) -> None:
    calls = anomaly_calls(random.Random(31), FIXED_NOW, HOUR, 24, edges=True)
    seed(tally, calls)
    found = tally.anomalies(now=FIXED_NOW)
    expected = expected_anomalies(calls, FIXED_NOW, HOUR, 24)
    assert anomaly_rows(found) == expected
    flagged = {(a.user_id, a.metric, a.compared_to): a for a in found}
    # (a) a burst far above the user's own history, in requests and in cost
    burst = flagged["burst", "requests", "self"]
    assert burst.recent == 60
    assert 3 <= burst.baseline_median <= 6
    assert ("burst", "cost", "self") in flagged
    # (b) a newcomer far above the other users in the last hour
    newcomer = flagged["newcomer", "requests", "population"]
    assert newcomer.recent == 40
    assert flagged["newcomer", "requests", "self"].baseline_median == 0
    # a heavy user is heavy every hour: far above the others, never above themself
    assert ("heavy", "requests", "population") in flagged
    assert not [k for k in flagged if k[0] == "heavy" and k[2] == "self"]
    # (c) steady users and (d) a quiet user under min_requests are never flagged
    assert not [a for a in found if a.user_id.startswith("steady-") or a.user_id == "quiet"]
    # the calls at `now` and before the first window are out
    assert flagged["burst", "cost", "self"].recent < 1
    for anomaly in found:
        assert anomaly.metric in ("requests", "cost")
        assert anomaly.compared_to in ("self", "population")
        assert anomaly.score >= 5
        assert f"robust z-score {anomaly.score}" in anomaly.reason
        assert "in the last hour" in anomaly.reason
        against = (
            "their own median over the previous 24 hours"
            if anomaly.compared_to == "self"
            else "the median user in the same hour"
        )
        assert against in anomaly.reason
        if anomaly.metric == "requests":
            assert anomaly.reason.startswith(f"{int(anomaly.recent)} requests in the last hour")
            assert f"against {anomaly.baseline_median.normalize():f} requests" in anomaly.reason
        else:
            assert anomaly.reason.startswith(f"${anomaly.recent:f} in the last hour")
            assert f"against ${anomaly.baseline_median:f} per hour" in anomaly.reason
            assert anomaly.recent.as_tuple().exponent == -9


def test_anomaly_scores_are_median_and_mad_robust_z_scores(tally: Tally) -> None:
    calls = anomaly_calls(random.Random(32), FIXED_NOW, HOUR, 24, edges=False)
    seed(tally, calls)
    scores = all_scores(calls, FIXED_NOW, HOUR, 24, 1)
    # Nearly every score at once: each (user, metric, baseline) scoring at least 0.1, among
    # users with at least one request in the last hour.
    low = Decimal("0.1")
    found = tally.anomalies(now=FIXED_NOW, threshold=low, min_requests=1)
    assert anomaly_rows(found) == expected_anomalies(calls, FIXED_NOW, HOUR, 24, low, 1)
    assert len(found) == len([s for s in scores if s.score >= low]) > 20
    distinct = sorted({s.score for s in scores})
    for threshold in (distinct[len(distinct) // 2], distinct[-1], distinct[-1] + Decimal("0.1")):
        found = tally.anomalies(now=FIXED_NOW, threshold=str(threshold))
        assert anomaly_rows(found) == expected_anomalies(calls, FIXED_NOW, HOUR, 24, threshold)
    assert tally.anomalies(now=FIXED_NOW, threshold=distinct[-1] + Decimal("0.1")) == []
    # min_requests=3 lets the quiet user in: $7.50 in an hour, against $0 for everyone else.
    found = tally.anomalies(now=FIXED_NOW, min_requests=3)
    assert anomaly_rows(found) == expected_anomalies(calls, FIXED_NOW, HOUR, 24, min_requests=3)
    quiet = {(a.metric, a.compared_to) for a in found if a.user_id == "quiet"}
    assert ("cost", "self") in quiet
    assert ("cost", "population") in quiet
    # A naive `now` is UTC.
    naive = tally.anomalies(now=FIXED_NOW.replace(tzinfo=None))
    assert anomaly_rows(naive) == expected_anomalies(calls, FIXED_NOW, HOUR, 24)


def test_anomalies_by_day_over_fourteen_days(tally: Tally) -> None:
    calls = anomaly_calls(random.Random(33), FIXED_NOW, DAY, 14, edges=True)
    seed(tally, calls)
    found = tally.anomalies(window="day", now=FIXED_NOW)
    assert anomaly_rows(found) == expected_anomalies(calls, FIXED_NOW, DAY, 14)
    assert {("burst", "self"), ("newcomer", "population")} <= {
        (a.user_id, a.compared_to) for a in found if a.metric == "requests"
    }
    for anomaly in found:
        assert "in the last day" in anomaly.reason
        if anomaly.compared_to == "self":
            assert "over the previous 14 days" in anomaly.reason
    # Another baseline length.
    found = tally.anomalies(window="day", now=FIXED_NOW, baseline_windows=6)
    assert anomaly_rows(found) == expected_anomalies(calls, FIXED_NOW, DAY, 6)


def test_anomalies_validate_their_parameters(tally: Tally) -> None:
    with pytest.raises(ValueError, match="window must be 'hour' or 'day'"):
        tally.anomalies(window="week")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_requests"):
        tally.anomalies(min_requests=0)
    with pytest.raises(ValueError, match="baseline_windows"):
        tally.anomalies(baseline_windows=1)
    with pytest.raises(ValueError, match="threshold"):
        tally.anomalies(threshold=2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", ["x", "0", "-1"])
def test_anomalies_reject_a_threshold_the_json_api_rejects(tally: Tally, threshold: str) -> None:
    seed(tally, [Call("u", "gpt-4o", FIXED_NOW - HOUR / 2, 1_000)])
    with pytest.raises(ValueError, match="threshold"):
        tally.anomalies(now=FIXED_NOW, threshold=threshold, min_requests=1)


# -- expensive calls and pairs ---------------------------------------------------------------

JULY = (datetime(2024, 7, 1, tzinfo=UTC), datetime(2024, 7, 20, tzinfo=UTC))


@pytest.mark.parametrize(
    ("since", "until", "user", "limit"),
    [
        (None, None, None, 20),
        (datetime(2024, 7, 5, tzinfo=UTC), datetime(2024, 7, 12, tzinfo=UTC), None, 7),
        (None, None, "x1", 5),
        (datetime(2024, 7, 3, tzinfo=UTC), None, "x2", 1000),
        (None, None, None, 10_000),
    ],
)
def test_expensive_calls(
    tally: Tally, since: datetime | None, until: datetime | None, user: str | None, limit: int
) -> None:
    calls = expensive_calls_seed(random.Random(41))
    seed(tally, calls)
    found = tally.expensive_calls(since, until, user_id=user, limit=limit)
    expected = expected_expensive_calls(calls, since, until, user, limit)
    assert expensive_call_rows(found) == expected
    every = expected_expensive_calls(calls, since, until, user, 10**9)
    assert len(found) == min(limit, len(every)) > 0
    unpriced = {c.id for c in calls if c.cost_nano is None}
    assert unpriced, "the seed has unpriced calls"
    assert not unpriced & {r["id"] for r in found}
    costs = [r["cost_nano_usd"] for r in found]
    assert costs == sorted(costs, reverse=True)


@pytest.mark.parametrize(
    ("dimension", "since", "until", "user", "limit"),
    [
        ("feature", None, None, None, 100),
        ("feature", datetime(2024, 7, 5, tzinfo=UTC), datetime(2024, 7, 12, tzinfo=UTC), None, 5),
        ("feature", None, None, "x3", 100),
        ("plan", datetime(2024, 7, 10, tzinfo=UTC), None, "x0", 3),
    ],
)
def test_expensive_pairs(
    tally: Tally,
    dimension: str,
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    limit: int,
) -> None:
    calls = expensive_calls_seed(random.Random(42))
    seed(tally, calls)
    found = tally.expensive_pairs(dimension, since, until, user_id=user, limit=limit)
    assert pair_rows(found) == expected_pairs(calls, dimension, since, until, user, limit)
    assert found
    for pair in found:
        assert pair.cost_usd.as_tuple().exponent == -9
        assert pair.avg_cost_per_request.as_tuple().exponent == -9
    if limit == 100:
        assert sum(p.requests for p in found) == sum(
            1 for c in calls if in_period(c, since, until) and (user is None or c.user == user)
        )
        assert None in {p.value for p in found}, "calls without the property are a pair too"
    for bad in (0, 10_001, True):
        with pytest.raises(ValueError, match="limit"):
            tally.expensive_pairs(dimension, limit=bad)
        with pytest.raises(ValueError, match="limit"):
            tally.expensive_calls(limit=bad)


# -- JSON endpoints through real servers -----------------------------------------------------


@dataclass
class SharedStore:
    url: str
    profit: list[Call]
    activity: list[Call]
    expensive: list[Call]
    anomalies: list[Call]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> SharedStore:
    """One store with every kind of seed; anomalies relative to the current time."""
    url = f"sqlite:///{tmp_path_factory.mktemp('insights') / 'usage.db'}"
    rng = random.Random(51)
    store = SharedStore(
        url,
        profit_calls(rng),
        activity_calls(rng),
        expensive_calls_seed(rng),
        anomaly_calls(rng, datetime.now(UTC), HOUR, 24, edges=False),
    )
    with Tally(url, instrument=False) as tally:
        seed(tally, store.profit + store.activity + store.expensive + store.anomalies)
    return store


@dataclass
class Servers:
    tally: Tally
    clients: dict[str, httpx2.Client]


@contextmanager
def running(url: str, revenue: Any) -> Iterator[Servers]:
    """The store behind FastAPI on uvicorn and Flask on werkzeug, both with ``revenue``."""
    with Tally(url, instrument=False) as tally:
        fast = FastAPI()
        tally.init_app(fast, revenue=revenue)
        app = flask.Flask("insights")
        tally.init_app(app, revenue=revenue)
        with (
            BackgroundServer(fast) as uvicorn_server,
            serve_wsgi(app) as werkzeug_url,
            httpx2.Client(base_url=f"{uvicorn_server.url}/llm-usage", timeout=15) as one,
            httpx2.Client(base_url=f"{werkzeug_url}/llm-usage", timeout=15) as two,
        ):
            yield Servers(tally, {"uvicorn": one, "werkzeug": two})


@pytest.fixture
def servers(shared: SharedStore) -> Iterator[Servers]:
    with running(shared.url, REVENUE) as both:
        yield both


def get_both(servers: Servers, path: str, params: dict[str, str]) -> tuple[int, Any]:
    """GET from both servers: they must answer the same status and the same JSON."""
    answers = {name: c.get(path, params=params) for name, c in servers.clients.items()}
    one, two = answers["uvicorn"], answers["werkzeug"]
    assert one.status_code == two.status_code, (path, params, one.text, two.text)
    assert one.json() == two.json(), (path, params)
    return one.status_code, one.json()


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def optional(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def parse_bound(text: str | None) -> datetime | None:
    if not text:
        return None
    if len(text) == 10:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    return datetime.fromisoformat(text)


def check_formats(path: str, body: dict[str, Any]) -> None:
    """Money as exact strings of 9 decimals, milliseconds with 3, times in UTC with Z."""
    if path == "/api/profitability":
        for row in [*body["users"], body["totals"]]:
            for name in ("revenue_usd", "cost_usd", "margin_usd"):
                assert MONEY.match(row[name]), row
    elif path == "/api/activity":
        for row in body["rows"]:
            for name in ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms"):
                assert row[name] is None or MILLIS.match(row[name]), row
            assert row["first_seen"].endswith("Z") and row["last_seen"].endswith("Z")
    elif path == "/api/anomalies":
        for row in body["anomalies"]:
            assert re.match(r"^\d+\.\d$", row["score"]), row
            if row["metric"] == "cost":
                assert MONEY.match(row["recent"]) and MONEY.match(row["baseline_median"])
    else:
        for row in body["calls"]:
            assert MONEY.match(row["cost_usd"]) and row["time"].endswith("Z"), row
        for row in body["pairs"]:
            assert MONEY.match(row["cost_usd"]) and MONEY.match(row["avg_cost_per_request"])


def json_numbers(path: str, body: dict[str, Any], params: dict[str, str]) -> Any:
    """The numbers of a JSON answer, parsed, in the shape of the Python API's numbers."""
    if path == "/api/profitability":
        users = [
            (
                u["user_id"],
                u["plan"],
                u["requests"],
                Decimal(u["revenue_usd"]),
                Decimal(u["cost_usd"]),
                Decimal(u["margin_usd"]),
            )
            for u in body["users"]
        ]
        totals = {k: Decimal(v) for k, v in body["totals"].items()}
        return users, totals
    if path == "/api/activity":
        return [
            (
                r["key"],
                r["requests"],
                moment(r["first_seen"]),
                moment(r["last_seen"]),
                r["active_days"],
                Decimal(r["avg_requests_per_active_day"]),
                Decimal(r["avg_tokens_per_request"]),
                Decimal(r["error_rate"]),
                optional(r["latency_p50_ms"]),
                optional(r["latency_p95_ms"]),
                optional(r["ttft_p50_ms"]),
            )
            for r in body["rows"]
        ]
    if path == "/api/anomalies":
        return [
            (
                Score(
                    a["user_id"],
                    a["metric"],
                    a["compared_to"],
                    Decimal(a["recent"]),
                    Decimal(a["baseline_median"]),
                    Decimal(a["score"]),
                ),
                a["reason"],
            )
            for a in body["anomalies"]
        ]
    assert body["by"] == (params.get("by") or "feature")
    calls = [
        (
            c["id"],
            moment(c["time"]),
            c["user_id"],
            c["model"],
            c["properties"],
            Decimal(c["cost_usd"]),
            c["input_tokens"],
            c["output_tokens"],
        )
        for c in body["calls"]
    ]
    pairs = [
        (
            p["model"],
            p["value"],
            p["requests"],
            Decimal(p["cost_usd"]),
            Decimal(p["avg_cost_per_request"]),
        )
        for p in body["pairs"]
    ]
    return calls, pairs


def python_numbers(tally: Tally, path: str, params: dict[str, str], revenue: Any) -> Any:
    """The same question asked of the Python API."""
    since, until = parse_bound(params.get("since")), parse_bound(params.get("until"))
    if path == "/api/profitability":
        found = tally.profitability(revenue, since, until, by=params.get("by", "plan"))
        totals = {
            "revenue_usd": sum((p.revenue_usd for p in found), Decimal(0)),
            "cost_usd": sum((p.cost_usd for p in found), Decimal(0)),
        }
        totals["margin_usd"] = totals["revenue_usd"] - totals["cost_usd"]
        return profit_rows(found), totals
    if path == "/api/activity":
        by = params.get("by", "user")
        return activity_rows(tally.activity(by, since, until, key=params.get("key")))  # type: ignore[arg-type]
    if path == "/api/anomalies":
        found = tally.anomalies(
            params.get("window", "hour"),  # type: ignore[arg-type]
            threshold=params.get("threshold", "5"),
            min_requests=int(params.get("min_requests", "5")),
        )
        return [(row, a.reason) for row, a in zip(anomaly_rows(found), found, strict=True)]
    limit, user = int(params.get("limit", "20")), params.get("user_id")
    calls = [
        (
            r["id"],
            EPOCH + r["ts"] * US,
            r["user_id"],
            r["response_model"] or r["request_model"],
            r["properties"],
            usd(r["cost_nano_usd"]),
            r["input_tokens"],
            r["output_tokens"],
        )
        for r in tally.expensive_calls(since, until, user_id=user, limit=limit)
    ]
    pairs = tally.expensive_pairs(params.get("by", "feature"), since, until, user, limit)
    return calls, pair_rows(pairs)


QUERIES: list[tuple[str, dict[str, str]]] = [
    ("/api/profitability", {"since": "2024-02-01", "until": "2024-03-01"}),
    ("/api/profitability", {"since": "2024-02-10T00:00:00Z", "until": "2024-03-20", "by": "tier"}),
    ("/api/activity", {}),
    ("/api/activity", {"by": "model"}),
    ("/api/activity", {"since": "2024-05-03", "until": "2024-05-07T12:00:00+00:00"}),
    ("/api/activity", {"by": "user", "key": "a2"}),
    ("/api/anomalies", {}),
    ("/api/anomalies", {"window": "day", "threshold": "2.5", "min_requests": "3"}),
    ("/api/anomalies", {"threshold": "1", "min_requests": "1"}),
    ("/api/expensive", {}),
    ("/api/expensive", {"since": "2024-07-05", "until": "2024-07-12", "limit": "5"}),
    ("/api/expensive", {"by": "plan", "user_id": "x1", "limit": "1000"}),
]


def test_json_endpoints_answer_the_python_api_numbers(
    servers: Servers, shared: SharedStore
) -> None:
    for path, params in QUERIES:
        status, body = get_both(servers, path, params)
        assert status == 200, (path, params, body)
        check_formats(path, body)
        numbers = json_numbers(path, body, params)
        assert numbers == python_numbers(servers.tally, path, params, REVENUE), (path, params)
        assert numbers[0] if isinstance(numbers, tuple) else numbers, (path, params, "empty")
    # And the Python API agrees with the numbers computed from the seeds.
    status, body = get_both(servers, "/api/anomalies", {})
    expected = expected_anomalies(shared.anomalies, datetime.now(UTC), HOUR, 24)
    assert [row for row, _ in json_numbers("/api/anomalies", body, {})] == expected
    since, until = datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)
    status, body = get_both(
        servers, "/api/profitability", {"since": "2024-02-01", "until": "2024-03-01"}
    )
    users, totals = json_numbers("/api/profitability", body, {})
    assert users == expected_profitability(shared.profit, REVENUE, since, until)
    assert totals["margin_usd"] == sum((u[5] for u in users), Decimal(0))
    status, body = get_both(servers, "/api/expensive", {"by": "feature", "limit": "3"})
    assert json_numbers("/api/expensive", body, {})[1] == expected_pairs(
        shared.expensive + shared.profit + shared.activity + shared.anomalies,
        "feature",
        None,
        None,
        None,
        3,
    )


def test_profitability_endpoint_without_revenue_says_how_to_configure_it(
    shared: SharedStore,
) -> None:
    with running(shared.url, None) as both:
        status, body = get_both(both, "/api/profitability", {"since": "2024-02-01"})
    assert status == 404
    assert "revenue=" in body["error"] and "tally.init_app(" in body["error"]


BAD_PARAMETERS: list[tuple[str, dict[str, str], str]] = [
    ("/api/anomalies", {"window": "week"}, "window"),
    ("/api/anomalies", {"threshold": "-1"}, "threshold"),
    ("/api/anomalies", {"threshold": "x"}, "threshold"),
    ("/api/anomalies", {"threshold": "NaN"}, "threshold"),
    ("/api/anomalies", {"min_requests": "0"}, "min_requests"),
    ("/api/activity", {"by": "weekday"}, "by"),
    ("/api/activity", {"since": "yesterday"}, "since"),
    ("/api/expensive", {"limit": "0"}, "limit"),
    ("/api/expensive", {"limit": "1001"}, "limit"),
    ("/api/expensive", {"since": "2024-07-12", "until": "2024-07-05"}, "until"),
    ("/api/profitability", {}, "since"),
    ("/api/profitability", {"since": "2024-02-01"}, "since"),
    ("/api/profitability", {"until": "2024-03-01"}, "since"),
    ("/api/profitability", {"since": "2024-02-01", "until": "x"}, "until"),
]


def test_bad_parameters_answer_400_naming_the_parameter(servers: Servers) -> None:
    for path, params, name in BAD_PARAMETERS:
        status, body = get_both(servers, path, params)
        assert status == 400, (path, params, body)
        assert body["error"].startswith(f"{name}: "), (path, params, body)
        bad = params.get(name)
        if bad and name not in ("since", "until"):
            assert repr(bad) in body["error"], (path, params, body)


def test_endpoints_refuse_proxied_clients(servers: Servers) -> None:
    for path in ENDPOINTS:
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            answers = [
                c.get(
                    path,
                    params={"since": "2024-02-01", "until": "2024-03-01"},
                    headers={header: "203.0.113.9"},
                )
                for c in servers.clients.values()
            ]
            for answer in answers:
                assert answer.status_code == 403, (path, header, answer.text)
                assert "authorize=" in answer.json()["error"]


def test_endpoints_follow_a_custom_authorize(shared: SharedStore) -> None:
    with Tally(shared.url, instrument=False) as tally:
        fast = FastAPI()
        tally.init_app(
            fast, revenue=REVENUE, authorize=lambda r: r.headers.get("x-key") == "s3cret"
        )
        app = flask.Flask("authorized")
        tally.init_app(app, revenue=REVENUE, authorize=lambda r: r.headers.get("x-key") == "s3cret")
        with BackgroundServer(fast) as server, serve_wsgi(app) as werkzeug_url:
            for base in (server.url, werkzeug_url):
                with httpx2.Client(base_url=f"{base}/llm-usage", timeout=15) as http:
                    for path in ENDPOINTS:
                        params = {"since": "2024-02-01", "until": "2024-03-01"}
                        assert http.get(path, params=params).status_code == 403
                        proxied = {"x-key": "s3cret", "X-Forwarded-For": "203.0.113.9"}
                        assert http.get(path, params=params, headers=proxied).status_code == 200


# -- the command line ------------------------------------------------------------------------

FEB = ("--since", "2024-02-01", "--until", "2024-03-01")
CLI_RUNS: dict[str, tuple[list[str], str, dict[str, str], str]] = {
    # name: (command line, endpoint, its parameters, the endpoint's list)
    "activity": (
        ["activity", "--since", "2024-05-03", "--until", "2024-05-08"],
        "/api/activity",
        {"since": "2024-05-03", "until": "2024-05-08"},
        "rows",
    ),
    "activity-model": (
        ["activity", "--by", "model", "--key", "gpt-4o"],
        "/api/activity",
        {"by": "model", "key": "gpt-4o"},
        "rows",
    ),
    "anomalies": (["anomalies"], "/api/anomalies", {}, "anomalies"),
    "anomalies-day": (
        ["anomalies", "--window", "day", "--threshold", "2.5", "--min-requests", "3"],
        "/api/anomalies",
        {"window": "day", "threshold": "2.5", "min_requests": "3"},
        "anomalies",
    ),
    "expensive": (
        ["expensive", "--user", "x1", "--limit", "5", "--since", "2024-07-03"],
        "/api/expensive",
        {"user_id": "x1", "limit": "5", "since": "2024-07-03"},
        "pairs",
    ),
    "expensive-calls": (
        ["expensive", "--calls", "--since", "2024-07-05", "--until", "2024-07-12", "--limit", "7"],
        "/api/expensive",
        {"since": "2024-07-05", "until": "2024-07-12", "limit": "7"},
        "calls",
    ),
    "profitability": (
        ["profitability", "--price", "free=0", "--price", "pro=20", *FEB],
        "/api/profitability",
        {"since": "2024-02-01", "until": "2024-03-01"},
        "users",
    ),
}
CLI_ERRORS: dict[str, tuple[list[str], str]] = {
    "price-without-usd": (["profitability", "--price", "pro", *FEB], "--price: expected PLAN=USD"),
    "no-price": (["profitability", *FEB], "--price: give the monthly price"),
    "price-not-a-number": (["profitability", "--price", "pro=20x", *FEB], "is not a number"),
    "threshold": (["anomalies", "--threshold", "x"], "threshold: expected a positive number"),
    "limit": (["expensive", "--limit", "0"], "limit: expected a whole number from 1 to 1000"),
}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli(shared: SharedStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliResult]:
    """Every command line of CLI_RUNS and CLI_ERRORS, run at once as subprocesses."""
    cwd = tmp_path_factory.mktemp("cli")
    env = {k: v for k, v in os.environ.items() if k != "LLM_TALLY_DATABASE_URL"}
    runs = {name: args for name, (args, *_) in CLI_RUNS.items()}
    runs |= {f"error:{name}": args for name, (args, _) in CLI_ERRORS.items()}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llm_tally",
                *args,
                "--database-url",
                shared.url,
                "--format",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        for name, args in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = CliResult(proc.returncode, out, err)
    assert not (Path(cwd) / "llm_tally.db").exists()
    return results


def test_cli_commands_print_the_json_endpoints_lists(
    cli: dict[str, CliResult], shared: SharedStore
) -> None:
    with running(shared.url, CLI_PRICES) as both:
        for name, (_, path, params, key) in CLI_RUNS.items():
            result = cli[name]
            assert result.returncode == 0, (name, result.stderr)
            assert result.stderr == "", name
            printed = json.loads(result.stdout)
            status, body = get_both(both, path, params)
            assert status == 200
            assert printed, f"{name}: nothing to compare"
            if name == "expensive-calls":
                # Compared exactly in the test below; here the rest of each call.
                printed = [
                    {**row, "properties": json.loads(row["properties"])}
                    if isinstance(row["properties"], str)
                    else row
                    for row in printed
                ]
            assert printed == body[key], name
        # The CLI's prices: pro users pay 20 a month, team users (no price given) nothing.
        users = json.loads(cli["profitability"].stdout)
        since, until = datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)
        expected = expected_profitability(shared.profit, CLI_PRICES, since, until)
        assert [
            (
                u["user_id"],
                u["plan"],
                u["requests"],
                Decimal(u["revenue_usd"]),
                Decimal(u["cost_usd"]),
                Decimal(u["margin_usd"]),
            )
            for u in users
        ] == expected
        assert {u["revenue_usd"] for u in users if u["plan"] == "pro"} == {"20.000000000"}
        assert {u["revenue_usd"] for u in users if u["plan"] == "team"} == {"0.000000000"}


def test_cli_expensive_calls_json_equals_the_endpoint_exactly(
    cli: dict[str, CliResult], shared: SharedStore
) -> None:
    _, path, params, key = CLI_RUNS["expensive-calls"]
    with running(shared.url, CLI_PRICES) as both:
        _, body = get_both(both, path, params)
    assert json.loads(cli["expensive-calls"].stdout) == body[key]


@pytest.mark.parametrize("name", list(CLI_ERRORS))
def test_cli_bad_input_exits_2_with_a_message(cli: dict[str, CliResult], name: str) -> None:
    result = cli[f"error:{name}"]
    command, message = CLI_ERRORS[name]
    assert result.returncode == 2, (name, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith(f"llm-tally {command[0]}: error: ")
    assert message in result.stderr


# -- the same answers from PostgreSQL --------------------------------------------------------


@pytest.mark.postgres
def test_insights_on_postgres(pg_url: str) -> None:
    rng = random.Random(61)
    profit, activity = profit_calls(rng), activity_calls(rng)
    expensive = expensive_calls_seed(rng)
    anomalies = anomaly_calls(rng, FIXED_NOW, HOUR, 24, edges=True)
    everything = profit + activity + expensive + anomalies
    with Tally(pg_url, instrument=False) as tally:
        assert tally.engine.dialect.name == "postgresql"
        seed(tally, everything)
        since, until = datetime(2024, 2, 10, tzinfo=UTC), datetime(2024, 3, 20, tzinfo=UTC)
        assert profit_rows(tally.profitability(REVENUE, since, until)) == (
            expected_profitability(profit, REVENUE, since, until)
        )
        may = (datetime(2024, 5, 3, tzinfo=UTC), datetime(2024, 5, 8, tzinfo=UTC))
        for by in ("user", "model"):
            assert activity_rows(tally.activity(by, *may)) == expected_activity(  # type: ignore[arg-type]
                everything, by, *may
            )
        assert anomaly_rows(tally.anomalies(now=FIXED_NOW)) == expected_anomalies(
            anomalies, FIXED_NOW, HOUR, 24
        )
        assert expensive_call_rows(tally.expensive_calls(*JULY, limit=15)) == (
            expected_expensive_calls(everything, *JULY, None, 15)
        )
        # PostgreSQL sorts a missing value last: compare the pairs as a set.
        pairs = tally.expensive_pairs("feature", *JULY, limit=1000)
        assert sorted(pair_rows(pairs), key=repr) == sorted(
            expected_pairs(everything, "feature", *JULY, None, 1000), key=repr
        )

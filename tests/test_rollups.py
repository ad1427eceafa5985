"""Rollups: reports read from rollup tables must answer exactly what the raw calls say.

Stores are filled through ``Tally.record()`` (and ``Tally.submit()`` for calls without a
model, or whose response model differs from the model asked for), from seeded random
generators plus calls placed on purpose on month and hour boundaries, 1 µs around them and
on the bounds of the periods asked about. Every expected number is recomputed here in plain
Python from those inputs; the rollup tables themselves are compared with a re-aggregation
of the raw ``llm_tally_usage`` rows.

Everything runs on SQLite (lazy roll-up by watermark) and on the real PostgreSQL (roll-up in
each insert transaction).
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, func, insert, select, text, update
from sqlalchemy.exc import OperationalError

import llm_tally
from llm_tally import Tally
from llm_tally._record import CallRecord, new_record_id
from llm_tally.storage import rollups
from llm_tally.storage.engine import create_store_engine
from llm_tally.storage.models import (
    ROLLUP_TABLES,
    hourly_table,
    meta_table,
    monthly_groups_table,
    monthly_pairs_table,
    monthly_users_table,
    monthly_values_table,
    usage_table,
)
from llm_tally.storage.writer import COLUMNS, _insert_sqlite, row_of
from tests.conftest import open_tally
from tests.stores_0_1 import create_store
from tests.test_insights import Call as InsightCall
from tests.test_insights import anomaly_calls, anomaly_rows, expected_anomalies
from tests.test_insights import seed as seed_insight_calls

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
US_PER_HOUR = 3_600_000_000

#: Property names that are also built-in dimensions: never rolled up as properties.
BUILT_IN = ("user", "model", "provider", "operation")
MEASURES = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "unpriced",
    "first_ts",
    "last_ts",
)


def to_us(moment: datetime) -> int:
    return (moment - EPOCH) // US


def from_us(us: int) -> datetime:
    return EPOCH + us * US


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def month_start(us: int) -> int:
    moment = from_us(us)
    return to_us(utc(moment.year, moment.month, 1))


# -- calls -----------------------------------------------------------------------------------

USERS = ("u01", "u02", "u03", "u04", "u05", "u06", "u07", "u08", "42")
PLANS = ("free", "pro", "team")
PLAN_OF = {user: PLANS[i % len(PLANS)] for i, user in enumerate(USERS)}
FEATURES = ("chat", "search", "résumé", "agent")
PRICED = {"gpt-4o-mini": "openai", "gpt-4o": "openai", "claude-3-5-sonnet": "anthropic"}
# Names genai-prices cannot know: recorded without a cost, they are stored unpriced.
UNPRICED = ("tally-unknown-a", "tally-unknown-b")
# (request model, response model) of calls stored through submit(): no model at all, only
# the model asked for, or an answer from another model than asked.
SUBMITTED_MODELS = ((None, None), ("tally-unknown-a", None), ("tally-asked", "tally-answered"))
OPERATIONS = ("chat", "responses", "embeddings", "manual")


@dataclass
class Call:
    ts: int  # epoch µs
    user: str | None
    request_model: str | None
    response_model: str | None
    provider: str
    operation: str
    properties: dict[str, str]
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    cost_nano: int | None
    status: str
    #: Stored through Tally.record() (else Tally.submit() of a CallRecord).
    via_record: bool

    @property
    def model(self) -> str | None:
        return self.response_model or self.request_model


def random_call(rng: random.Random, ts: int) -> Call:
    user = rng.choice(USERS) if rng.random() < 0.9 else None
    properties: dict[str, str] = {}
    draw = rng.random()
    if user is not None and draw < 0.75:
        properties["plan"] = PLAN_OF[user]
    elif draw < 0.82:
        properties["plan"] = ""  # an empty value is a value
    if rng.random() < 0.8:
        properties["feature"] = rng.choice(FEATURES)
    if rng.random() < 0.06:
        properties["équipe"] = rng.choice(("nord", "sud"))
    if rng.random() < 0.04:
        properties["model"] = "shadow"  # named like a built-in dimension: ignored by it
    if rng.random() < 0.03:
        properties["user"] = "shadow"
    kind = rng.random()
    via_record = True
    if kind < 0.08:
        request_model, response_model = rng.choice(SUBMITTED_MODELS)
        provider = "openai"
        # Priced (above 0): how calls without a model sort among groups of equal cost is
        # tested on its own (test_calls_without_a_model_sort_last_among_equal_costs).
        cost = rng.randrange(1, 30_000_000)
        via_record = False
    elif kind < 0.2:
        request_model = response_model = rng.choice(UNPRICED)
        provider = "openai"
        cost = None
    else:
        request_model = response_model = rng.choice(list(PRICED))
        provider = PRICED[request_model]
        cost = 0 if rng.random() < 0.05 else rng.randrange(0, 40_000_000)
    status = rng.choices(("ok", "error", "aborted"), weights=(85, 10, 5))[0]
    input_tokens = rng.randrange(0, 6_000)
    output_tokens = rng.randrange(0, 2_000)
    return Call(
        ts=ts,
        user=user,
        request_model=request_model,
        response_model=response_model,
        provider=provider,
        operation=rng.choice(OPERATIONS),
        properties=properties,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=rng.randrange(0, input_tokens + 1),
        reasoning_tokens=rng.randrange(0, output_tokens + 1),
        cost_nano=cost,
        status=status,
        via_record=via_record,
    )


def call_record(call: Call) -> CallRecord:
    """The record the integrations would submit for ``call``."""
    return CallRecord(
        id=new_record_id(),
        ts_us=call.ts,
        user_id=call.user,
        properties=dict(call.properties),
        provider=call.provider,
        operation=call.operation,
        request_model=call.request_model,
        response_model=call.response_model,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        cached_input_tokens=call.cached_input_tokens,
        reasoning_tokens=call.reasoning_tokens,
        cost_nano_usd=call.cost_nano,
        cost_source="given" if call.cost_nano is not None else "unknown",
        status=call.status,
    )


def store(tally: Tally, calls: Iterable[Call]) -> None:
    """Give the calls to the Tally (they are stored by its background writer)."""
    for call in calls:
        if not call.via_record:
            tally.submit(call_record(call))
            continue
        assert call.request_model is not None
        tally.record(
            # An int user id is stored as its text.
            user_id=int(call.user) if call.user == "42" else call.user,
            model=call.request_model,
            provider=call.provider,
            operation=call.operation,
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
            cached_input_tokens=call.cached_input_tokens,
            reasoning_tokens=call.reasoning_tokens,
            cost_usd=None if call.cost_nano is None else Decimal(call.cost_nano).scaleb(-9),
            ts=from_us(call.ts),
            properties=call.properties or None,
            status=call.status,
        )


def seed(tally: Tally, calls: list[Call]) -> None:
    store(tally, calls)
    assert tally.flush(60), "the calls were not stored in time"


def insert_raw(engine: Engine, calls: Iterable[Call]) -> None:
    """Store calls the way the writer inserts them, without rolling them up (what a writer
    stopped before its catch-up, or a version before rollups, leaves behind)."""
    rows = [row_of(call_record(call)) for call in calls]
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            _insert_sqlite(conn, rows)
        else:
            conn.execute(
                insert(usage_table), [dict(zip(COLUMNS, row, strict=True)) for row in rows]
            )


# -- periods and the seeded store ------------------------------------------------------------

START = utc(2026, 9, 20)
END = utc(2026, 12, 20)
SEP_1, OCT_1, NOV_1, DEC_1 = utc(2026, 9, 1), utc(2026, 10, 1), utc(2026, 11, 1), utc(2026, 12, 1)
BUSY_HOUR = utc(2026, 11, 3, 14)

Bound = datetime | None
PERIODS: dict[str, tuple[Bound, Bound]] = {
    "open": (None, None),
    "since-only": (utc(2026, 11, 15, 12, 34, 56, 789_012), None),
    "since-a-month": (NOV_1, None),
    "until-only": (None, utc(2026, 10, 20, 7, 8, 9, 1)),
    "until-a-month": (None, NOV_1),
    "one-utc-month": (OCT_1, NOV_1),
    "month-with-few-calls": (SEP_1, OCT_1),
    "month-without-calls": (utc(2027, 1, 1), utc(2027, 2, 1)),
    "two-utc-months": (OCT_1, DEC_1),
    "paris-month": llm_tally.month_period(2026, 11, tz="Europe/Paris"),
    "us-bounds-across-months": (
        utc(2026, 9, 29, 13, 14, 15, 161_718),
        utc(2026, 12, 2, 1, 2, 3, 40_506),
    ),
    "month-then-hours": (OCT_1, utc(2026, 11, 15, 6)),
    "hours-then-month": (utc(2026, 10, 15, 10), DEC_1),
    "one-hour": (BUSY_HOUR, BUSY_HOUR + HOUR),
    "sub-hour": (
        BUSY_HOUR + 10 * timedelta(minutes=1) + timedelta(milliseconds=500),
        BUSY_HOUR + 50 * timedelta(minutes=1),
    ),
    "hour-and-edges": (BUSY_HOUR - US, BUSY_HOUR + HOUR + US),
    "empty": (NOV_1, NOV_1),
    "reversed": (DEC_1, NOV_1),
}


def edge_moments(rng: random.Random) -> list[int]:
    """Moments on (and 1 µs around) the month starts, some hour starts and every period
    bound inside the seeded span, plus a busy hour."""
    marks = [OCT_1, NOV_1, DEC_1]
    marks += [bound for period in PERIODS.values() for bound in period if bound is not None]
    edges = {to_us(mark) + delta for mark in marks for delta in (-1, 0, 1)}
    span_hours = (END - START) // HOUR
    for _ in range(12):
        hour = to_us(START + rng.randrange(1, span_hours) * HOUR)
        edges |= {hour - 1, hour, hour + 1}
    edges |= {to_us(BUSY_HOUR) + rng.randrange(US_PER_HOUR) for _ in range(15)}
    return sorted(us for us in edges if to_us(START) <= us < to_us(END))


def seeded_calls(seed_value: int) -> list[Call]:
    rng = random.Random(seed_value)
    moments = edge_moments(rng)
    span = to_us(END) - to_us(START)
    moments += [to_us(START) + rng.randrange(span) for _ in range(rng.randint(300, 450))]
    # Boundary calls for several users at once: some share a moment.
    moments += moments[::7]
    rng.shuffle(moments)  # stored out of time order, as several app servers would
    return [random_call(rng, ts) for ts in moments]


# -- expectations, from the calls alone ------------------------------------------------------


def in_period(call: Call, since: Bound, until: Bound) -> bool:
    return (since is None or call.ts >= to_us(since)) and (until is None or call.ts < to_us(until))


def within(calls: Iterable[Call], since: Bound, until: Bound) -> list[Call]:
    return [c for c in calls if in_period(c, since, until)]


def usd(nano: int) -> Decimal:
    return Decimal(nano).scaleb(-9)


@dataclass
class Sums:
    users: set[str] = field(default_factory=set)
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0
    unpriced: int = 0
    first: int | None = None
    last: int | None = None

    def add(self, call: Call) -> Sums:
        if call.user is not None:
            self.users.add(call.user)
        self.requests += 1
        self.errors += call.status != "ok"
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.cached_input_tokens += call.cached_input_tokens
        self.reasoning_tokens += call.reasoning_tokens
        if call.cost_nano is None:
            self.unpriced += 1
        else:
            self.cost_nano += call.cost_nano
        self.first = call.ts if self.first is None else min(self.first, call.ts)
        self.last = call.ts if self.last is None else max(self.last, call.ts)
        return self

    def tokens(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }

    def as_user(self, user: str | None) -> dict[str, Any]:
        return {
            "user_id": user,
            "requests": self.requests,
            "errors": self.errors,
            **self.tokens(),
            "cost_usd": usd(self.cost_nano),
            "unpriced_requests": self.unpriced,
            "first_seen": None if self.first is None else from_us(self.first),
            "last_seen": None if self.last is None else from_us(self.last),
        }

    def as_group(self, value: str | None) -> dict[str, Any]:
        return {
            "value": value,
            "users": len(self.users),
            "requests": self.requests,
            "errors": self.errors,
            **self.tokens(),
            "cost_usd": usd(self.cost_nano),
            "unpriced_requests": self.unpriced,
        }


def sums(calls: Iterable[Call]) -> Sums:
    total = Sums()
    for call in calls:
        total.add(call)
    return total


def grouped(calls: Iterable[Call], key: Any) -> dict[Any, Sums]:
    groups: dict[Any, Sums] = {}
    for call in calls:
        groups.setdefault(key(call), Sums()).add(call)
    return groups


def value_of(call: Call, dimension: str) -> str | None:
    built_in = {
        "user": call.user,
        "model": call.model,
        "provider": call.provider,
        "operation": call.operation,
    }
    return built_in[dimension] if dimension in built_in else call.properties.get(dimension)


def none_last(value: str | None) -> tuple[bool, str]:
    return value is None, value or ""


USER_ORDER = {
    "cost": lambda s: s.cost_nano,
    "requests": lambda s: s.requests,
    "tokens": lambda s: s.input_tokens + s.output_tokens,
    "last_seen": lambda s: s.last,
}


def expected(calls: list[Call], report: str, arg: Any) -> Any:
    """What ``report(arg)`` must answer for the calls of its period."""
    if report == "user_totals":
        return sums(c for c in calls if c.user == arg).as_user(arg)
    if report == "users":
        order, limit, offset = arg
        per_user = grouped((c for c in calls if c.user is not None), lambda c: c.user)
        ordered = sorted(per_user.items(), key=lambda item: (-USER_ORDER[order](item[1]), item[0]))
        return [g.as_user(user) for user, g in ordered[offset : offset + limit]]
    if report == "count_users":
        return len({c.user for c in calls if c.user is not None})
    if report == "totals":
        return sums(calls).as_group(None)
    if report == "totals_by":
        groups = grouped(calls, lambda c: value_of(c, arg))
        ordered = sorted(groups.items(), key=lambda item: (-item[1].cost_nano, none_last(item[0])))
        return [g.as_group(value) for value, g in ordered]
    if report == "expensive_pairs":
        dimension, user, limit = arg
        chosen = [c for c in calls if user is None or c.user == user]
        pairs = grouped(chosen, lambda c: (c.model, c.properties.get(dimension)))
        ordered = sorted(
            pairs.items(),
            key=lambda item: (-item[1].cost_nano, none_last(item[0][0]), none_last(item[0][1])),
        )
        return [
            {
                "model": model,
                "value": value,
                "requests": g.requests,
                "cost_usd": usd(g.cost_nano),
                "unpriced_requests": g.unpriced,
            }
            for (model, value), g in ordered[:limit]
        ]
    if report == "user_daily":
        days = grouped((c for c in calls if c.user == arg), lambda c: from_us(c.ts).date())
        return [
            {
                "day": day,
                "requests": g.requests,
                "input_tokens": g.input_tokens,
                "output_tokens": g.output_tokens,
                "cost_usd": usd(g.cost_nano),
            }
            for day, g in sorted(days.items())
        ]
    if report == "user_by_model":
        models = grouped((c for c in calls if c.user == arg), lambda c: c.model)
        ordered = sorted(models.items(), key=lambda item: (-item[1].cost_nano, none_last(item[0])))
        return [
            {
                "model": model,
                "requests": g.requests,
                "input_tokens": g.input_tokens,
                "output_tokens": g.output_tokens,
                "cost_usd": usd(g.cost_nano),
            }
            for model, g in ordered
        ]
    raise AssertionError(report)


def actual(tally: Tally, report: str, arg: Any, since: Bound, until: Bound) -> Any:
    """The Tally's answer, as plain dicts."""
    if report == "user_totals":
        return asdict(tally.user_totals(arg, since, until))
    if report == "users":
        order, limit, offset = arg
        found = tally.users(since, until, order_by=order, limit=limit, offset=offset)
        return [asdict(u) for u in found]
    if report == "count_users":
        return tally.count_users(since, until)
    if report == "totals":
        return asdict(tally.totals(since, until))
    if report == "totals_by":
        return [asdict(g) for g in tally.totals_by(arg, since, until)]
    if report == "expensive_pairs":
        dimension, user, limit = arg
        pairs = tally.expensive_pairs(dimension, since, until, user_id=user, limit=limit)
        return [asdict(p) for p in pairs]
    if report == "user_daily":
        return [asdict(d) for d in tally.user_daily(arg, since, until)]
    if report == "user_by_model":
        return [asdict(m) for m in tally.user_by_model(arg, since, until)]
    raise AssertionError(report)


CHECKED_USERS: tuple[str | None, ...] = ("u01", "u02", "u05", "42", None, "nobody")
REPORTS: list[tuple[str, Any]] = [
    *(("user_totals", user) for user in CHECKED_USERS),
    *(
        ("users", (order, limit, offset))
        for order in USER_ORDER
        for limit, offset in ((10_000, 0), (3, 0), (3, 2), (4, 50))
    ),
    ("count_users", None),
    ("totals", None),
    *(
        ("totals_by", dimension)
        for dimension in ("user", "model", "provider", "operation", "plan", "feature", "équipe")
    ),
    ("totals_by", "nobody-has-this"),
    ("expensive_pairs", ("feature", None, 10_000)),
    ("expensive_pairs", ("feature", None, 3)),
    ("expensive_pairs", ("feature", "u01", 10_000)),
    ("expensive_pairs", ("plan", "42", 10_000)),
    ("expensive_pairs", ("nobody-has-this", None, 10_000)),
    *(("user_daily", user) for user in ("u01", "42", None)),
    *(("user_by_model", user) for user in ("u02", "u05", None)),
]


def mismatch(label: str, got: Any, want: Any) -> str:
    return f"{label}:\n    got  {got!r}\n    want {want!r}"


def check_reports(
    tally: Tally, calls: list[Call], periods: dict[str, tuple[Bound, Bound]] = PERIODS
) -> None:
    """Every report over every period equals the Python truth (all mismatches listed)."""
    problems: list[str] = []
    for name, (since, until) in periods.items():
        chosen = within(calls, since, until)
        for report, arg in REPORTS:
            got = actual(tally, report, arg, since, until)
            want = expected(chosen, report, arg)
            if got != want:
                problems.append(mismatch(f"[{name}] {report}({arg!r})", got, want))
    assert not problems, f"{len(problems)} report(s) differ:\n" + "\n".join(problems[:12])


# -- rollups recomputed from the raw rows ----------------------------------------------------

Key = tuple[Any, ...]
Measures = list[int]
#: The key columns of each rollup table, in the order the keys below are built.
KEYS = {
    hourly_table.name: ("hour", "user_key", "provider", "operation", "model", "properties"),
    monthly_users_table.name: ("month", "user_key"),
    monthly_groups_table.name: ("month", "dimension", "value", "user_key"),
    monthly_pairs_table.name: ("month", "model", "dimension", "value"),
    monthly_values_table.name: ("dimension", "month", "value"),
}
#: What each rollup table sums (the values rollup only counts users).
SUMS = {name: ("users",) if name == monthly_values_table.name else MEASURES for name in KEYS}


def merge(into: dict[Key, Measures], key: Key, values: Measures) -> None:
    old = into.get(key)
    if old is None:
        into[key] = list(values)
        return
    for i, name in enumerate(MEASURES[: len(values)]):
        if name == "first_ts":
            old[i] = min(old[i], values[i])
        elif name == "last_ts":
            old[i] = max(old[i], values[i])
        else:
            old[i] += values[i]


def canonical(properties: dict[str, str]) -> str:
    return json.dumps(properties, sort_keys=True, ensure_ascii=False)


def recomputed_rollups(conn: Connection) -> dict[str, dict[Key, Measures]]:
    """Each rollup table as it must be: a plain re-aggregation of the raw rows."""
    tables: dict[str, dict[Key, Measures]] = {t.name: {} for t in ROLLUP_TABLES}
    for row in conn.execute(select(usage_table)).mappings():
        cost = row["cost_nano_usd"]
        values = [
            1,
            int(row["status"] != "ok"),
            row["input_tokens"],
            row["output_tokens"],
            row["cached_input_tokens"],
            row["reasoning_tokens"],
            cost or 0,
            int(cost is None),
            row["ts"],
            row["ts"],
        ]
        user = row["user_id"] or ""
        model = row["response_model"] or row["request_model"] or ""
        month = month_start(row["ts"])
        hour = row["ts"] // US_PER_HOUR * US_PER_HOUR
        properties = row["properties"]
        hourly_key = (hour, user, row["provider"], row["operation"], model, canonical(properties))
        merge(tables[hourly_table.name], hourly_key, values)
        merge(tables[monthly_users_table.name], (month, user), values)
        merge(tables[monthly_groups_table.name], (month, "model", model, user), values)
        # Dimension '' and value '' (never a property's): each model's month.
        merge(tables[monthly_pairs_table.name], (month, model, "", ""), values)
        for name, value in properties.items():
            if name in BUILT_IN:
                continue
            merge(tables[monthly_groups_table.name], (month, name, value, user), values)
            merge(tables[monthly_pairs_table.name], (month, model, name, value), values)
    # Each (month, dimension, value) counts its distinct users, not "no user".
    for month, dimension, value, user in tables[monthly_groups_table.name]:
        if user:
            merge(tables[monthly_values_table.name], (dimension, month, value), [1])
    return tables


def rollup_contents(conn: Connection) -> dict[str, dict[Key, Measures]]:
    """Each rollup table as stored (hourly rows whose properties are equal are merged: SQLite
    keys them by their JSON text)."""
    tables: dict[str, dict[Key, Measures]] = {}
    for table in ROLLUP_TABLES:
        rows: dict[Key, Measures] = {}
        for row in conn.execute(select(table)).mappings():
            key = tuple(
                canonical(row[name]) if name == "properties" else row[name]
                for name in KEYS[table.name]
            )
            merge(rows, key, [int(row[name]) for name in SUMS[table.name]])
        tables[table.name] = rows
    return tables


def raw_table_rows(conn: Connection, skip: str = "") -> dict[str, list[tuple[Any, ...]]]:
    """Every rollup row as stored, unmerged, in a stable order (but the table ``skip``)."""
    return {
        table.name: sorted(
            tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in row)
            for row in conn.execute(select(table))
        )
        for table in ROLLUP_TABLES
        if table.name != skip
    }


def assert_rollups_match_raw(engine: Engine) -> None:
    rollups.catch_up(engine)
    with engine.connect() as conn:
        want = recomputed_rollups(conn)
        got = rollup_contents(conn)
    for name in want:
        missing = {k: v for k, v in want[name].items() if got[name].get(k) != v}
        extra = {k: v for k, v in got[name].items() if k not in want[name]}
        assert not missing and not extra, (
            f"{name}: {len(missing)} row(s) differ or are missing, {len(extra)} extra; "
            f"first differing: {next(iter(missing.items()), None)} "
            f"stored {got[name].get(next(iter(missing), None))}; extra: "
            f"{next(iter(extra.items()), None)}"
        )
    assert sum(v[0] for v in got[monthly_users_table.name].values()) == count_raw(engine)


def count_raw(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage_table)).scalar_one())


def meta(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(meta_table.c.key, meta_table.c.value))
        return {row.key: row.value for row in rows}


def max_rowid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT max(rowid) FROM llm_tally_usage")).scalar() or 0)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'usage.db'}"


# -- 1. reports equal the Python truth -------------------------------------------------------


@pytest.mark.parametrize("seed_value", [1, 2, 3])
def test_reports_equal_the_calls_over_every_kind_of_period(
    store_url: str, seed_value: int, opened: list[Tally]
) -> None:
    calls = seeded_calls(seed_value)
    tally = open_tally(opened, store_url)
    seed(tally, calls)
    # The seeded data covers what the rollups must get right.
    on_month = [c for c in calls if c.ts in {to_us(OCT_1), to_us(NOV_1), to_us(DEC_1)}]
    before_month = [c for c in calls if c.ts + 1 in {to_us(OCT_1), to_us(NOV_1), to_us(DEC_1)}]
    assert on_month and before_month
    assert [c for c in calls if c.user is None]
    assert [c for c in calls if c.model is None] and [c for c in calls if c.cost_nano is None]
    assert [c for c in calls if "plan" not in c.properties and c.user is not None]
    assert [c for c in calls if c.properties.get("plan") == ""]
    assert len({c.model for c in calls}) >= 6
    assert len(within(calls, *PERIODS["sub-hour"])) >= 3
    assert not within(calls, *PERIODS["month-without-calls"])
    check_reports(tally, calls)
    assert_rollups_match_raw(tally.engine)
    # A second Tally on the same store (another app process) reads the same.
    check_reports(open_tally(opened, store_url), calls, {"open": PERIODS["open"]})


def tied_calls() -> list[Call]:
    """Calls of u01 in October costing nothing: unpriced models, calls without a model and
    calls without a plan. Every group of totals_by("model") and ("plan"), and of
    expensive_pairs("plan") and user_by_model("u01"), costs 0."""
    rng = random.Random(7)
    calls = []
    for ts in (to_us(OCT_1), to_us(OCT_1 + DAY), to_us(OCT_1 + DAY + 30 * US)):
        for model in ((None, None), ("tally-unknown-a",) * 2, ("tally-unknown-b",) * 2):
            call = random_call(rng, ts)
            call.user = "u01"
            call.request_model, call.response_model = model
            call.via_record = model[0] is not None
            call.cost_nano = None
            call.properties = {"plan": "pro"} if model[0] == "tally-unknown-a" else {}
            calls.append(call)
    return calls


TIE_PERIODS = {"one-utc-month": PERIODS["one-utc-month"], "hours": (OCT_1, OCT_1 + 2 * DAY)}


@pytest.mark.parametrize("period", list(TIE_PERIODS))
def test_calls_without_a_model_sort_last_among_equal_costs(
    store_url: str, opened: list[Tally], period: str
) -> None:
    """The None group goes after the groups of the same cost ("the None group last of
    equals"), whether the period is read from the monthly rollups or from the hourly one."""
    tally = open_tally(opened, store_url)
    seed(tally, tied_calls())
    since, until = TIE_PERIODS[period]
    by_plan = tally.totals_by("plan", since, until)
    assert [g.value for g in by_plan] == ["pro", None]
    pairs = tally.expensive_pairs("plan", since, until)
    assert [(p.model, p.value) for p in pairs] == [
        ("tally-unknown-a", "pro"),
        ("tally-unknown-b", None),
        (None, None),
    ]
    by_model = tally.totals_by("model", since, until)
    assert [g.value for g in by_model] == ["tally-unknown-a", "tally-unknown-b", None]


@pytest.mark.parametrize("period", list(TIE_PERIODS))
def test_user_by_model_sorts_calls_without_a_model_last_among_equal_costs(
    store_url: str, opened: list[Tally], period: str
) -> None:
    """As totals_by and expensive_pairs do, and the same on SQLite and PostgreSQL."""
    tally = open_tally(opened, store_url)
    seed(tally, tied_calls())
    models = tally.user_by_model("u01", *TIE_PERIODS[period])
    assert [m.model for m in models] == ["tally-unknown-a", "tally-unknown-b", None]


# -- 2. anomalies ----------------------------------------------------------------------------


def window_edge_calls(
    rng: random.Random, now: datetime, size: timedelta, baseline: int
) -> list[InsightCall]:
    """Calls on every window bound and 1 µs before it, and on the bounds of the hours those
    bounds cut (read raw), next to the whole hours (read from the hourly rollup)."""
    start = now - (baseline + 1) * size
    moments = []
    for i in range(baseline + 2):
        bound = start + i * size
        hour = bound.replace(minute=0, second=0, microsecond=0)
        moments += [bound - US, bound, hour - US, hour, hour + HOUR - US, hour + HOUR]
    calls = []
    for moment in moments:
        for user in ("edge-a", "edge-b", "steady-00"):
            if rng.random() < 0.7:
                calls.append(InsightCall(user, "gpt-4o", moment, rng.randrange(1, 9_000_000)))
    # edge-b is busy in the last window, on its edges only.
    calls += [InsightCall("edge-b", "gpt-4o", now - US, 4_000_000) for _ in range(12)]
    calls += [InsightCall("edge-b", "gpt-4o", now - size, 4_000_000) for _ in range(12)]
    return calls


ANOMALY_NOWS = {
    "within-an-hour": utc(2026, 11, 1, 10, 37, 12, 500_000),
    "on-the-hour": utc(2026, 11, 1, 10),
    "just-after-the-hour": utc(2026, 11, 1, 10, 0, 0, 1),
}


@pytest.mark.parametrize("now_name", list(ANOMALY_NOWS))
@pytest.mark.parametrize(("window", "size", "baseline"), [("hour", HOUR, 24), ("day", DAY, 14)])
def test_anomalies_match_the_per_window_series_of_the_calls(
    store_url: str,
    opened: list[Tally],
    now_name: str,
    window: str,
    size: timedelta,
    baseline: int,
) -> None:
    now = ANOMALY_NOWS[now_name]
    rng = random.Random(f"{now_name}-{window}")
    calls = anomaly_calls(rng, now, size, baseline, edges=True)
    calls += window_edge_calls(rng, now, size, baseline)
    tally = open_tally(opened, store_url)
    seed_insight_calls(tally, calls)
    found = tally.anomalies(window, now=now)  # type: ignore[arg-type]
    assert anomaly_rows(found) == expected_anomalies(calls, now, size, baseline)
    flagged = {(a.user_id, a.metric, a.compared_to) for a in found}
    assert ("burst", "requests", "self") in flagged
    assert ("edge-b", "requests", "self") in flagged
    # Nearly every score at once: each window's value enters the medians and the MADs.
    low = Decimal("0.1")
    everything = tally.anomalies(window, now=now, threshold=low, min_requests=1)  # type: ignore[arg-type]
    assert anomaly_rows(everything) == expected_anomalies(calls, now, size, baseline, low, 1)
    assert len(everything) > 20
    # Another baseline length moves every window bound.
    shorter = tally.anomalies(window, now=now, baseline_windows=5, threshold=low, min_requests=1)  # type: ignore[arg-type]
    assert anomaly_rows(shorter) == expected_anomalies(calls, now, size, 5, low, 1)


# -- 3. rollup tables equal a recomputation from the raw rows --------------------------------


def test_chunked_catch_up_builds_the_same_rollups_as_one_pass(
    sqlite_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(11)
    with Tally(sqlite_url, instrument=False) as writer:
        seed(writer, calls)
    engine = create_store_engine(sqlite_url)
    try:
        assert_rollups_match_raw(engine)
        assert meta(engine)[rollups.WATERMARK_KEY] == str(max_rowid(engine)) == str(len(calls))
        with engine.connect() as conn:
            as_written = raw_table_rows(conn)

        def start_over() -> None:
            # The state of a store whose rollups were never built.
            with engine.begin() as conn:
                for table in ROLLUP_TABLES:
                    conn.execute(table.delete())
                conn.execute(
                    update(meta_table)
                    .where(meta_table.c.key == rollups.WATERMARK_KEY)
                    .values(value="0")
                )
            assert rollups.pending_rows(engine) == len(calls)

        start_over()
        assert rollups.catch_up(engine, chunk=7) == len(calls)
        assert meta(engine)[rollups.WATERMARK_KEY] == str(max_rowid(engine))
        assert rollups.pending_rows(engine) == 0
        assert rollups.catch_up(engine, chunk=7) == 0
        with engine.connect() as conn:
            chunked = raw_table_rows(conn)
        assert_rollups_match_raw(engine)

        start_over()
        assert rollups.catch_up(engine) == len(calls)
        with engine.connect() as conn:
            assert raw_table_rows(conn) == chunked == as_written

        # Rows stored later move the watermark on by exactly their number.
        more = seeded_calls(12)[:40]
        insert_raw(engine, more)
        assert rollups.pending_rows(engine) == 40
        assert rollups.catch_up(engine, chunk=7) == 40
        assert meta(engine)[rollups.WATERMARK_KEY] == str(max_rowid(engine)) == str(len(calls) + 40)
        assert_rollups_match_raw(engine)
        check_reports(open_tally(opened, sqlite_url), calls + more)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_rolls_up_each_batch_in_its_insert(pg_url: str, opened: list[Tally]) -> None:
    calls = seeded_calls(13)
    half = len(calls) // 2
    # Small batches: the same rollup rows are upserted by many transactions.
    small = open_tally(opened, pg_url, batch_size=7)
    assert rollups.pending_rows(small.engine) == 0
    seed(small, calls[:half])
    assert_rollups_match_raw(small.engine)
    large = open_tally(opened, pg_url)
    seed(large, calls[half:])
    assert_rollups_match_raw(large.engine)
    check_reports(large, calls)


# -- 4. SQLite: reports are exact while rows wait to be rolled up ----------------------------


def test_every_report_rolls_up_pending_rows_first(sqlite_url: str, opened: list[Tally]) -> None:
    calls = seeded_calls(21)
    with Tally(sqlite_url, instrument=False) as writer:
        seed(writer, calls)
    # This Tally stores nothing: its writer never catches up, only its reports do. (Closing
    # the writer's Tally did not roll up either: closing stays quick.)
    reader = open_tally(opened, sqlite_url)
    assert rollups.pending_rows(reader.engine) == len(calls)
    rollups.catch_up(reader.engine)
    assert rollups.pending_rows(reader.engine) == 0
    extra = iter(seeded_calls(22))
    periods = {name: PERIODS[name] for name in ("open", "one-utc-month", "us-bounds-across-months")}
    problems = []
    for name, (since, until) in periods.items():
        for report, arg in REPORTS:
            batch = [next(extra) for _ in range(3)]
            insert_raw(reader.engine, batch)
            calls += batch
            assert rollups.pending_rows(reader.engine) == 3
            got = actual(reader, report, arg, since, until)
            assert rollups.pending_rows(reader.engine) == 0, f"{report} did not catch up"
            want = expected(within(calls, since, until), report, arg)
            if got != want:
                problems.append(mismatch(f"[{name}] {report}({arg!r})", got, want))
    assert not problems, f"{len(problems)} report(s) differ:\n" + "\n".join(problems[:12])
    # Anomalies catch up too: a burst of calls in the last hour, stored but not rolled up.
    now = utc(2026, 11, 1, 10, 37, 12, 500_000)
    rng = random.Random(23)
    burst = [random_call(rng, to_us(now) - rng.randrange(1, US_PER_HOUR)) for _ in range(40)]
    insert_raw(reader.engine, burst)
    calls += burst
    assert rollups.pending_rows(reader.engine) == len(burst)
    found = reader.anomalies("day", now=now, threshold="0.1", min_requests=1)
    assert rollups.pending_rows(reader.engine) == 0
    as_insight_calls = [InsightCall(c.user, "m", from_us(c.ts), c.cost_nano) for c in calls]
    want = expected_anomalies(as_insight_calls, now, DAY, 14, Decimal("0.1"), 1)
    assert anomaly_rows(found) == want
    assert want
    assert_rollups_match_raw(reader.engine)


def test_reports_read_the_rollups(store_url: str, opened: list[Tally]) -> None:
    """The rollups are what reports read: with every rollup row's requests doubled, the
    requests of whole months and whole hours double, and those of the raw edges do not. (So
    the tests above compare the rollups' answers, not the raw rows'.)"""
    calls = seeded_calls(24)
    tally = open_tally(opened, store_url)
    seed(tally, calls)
    rollups.catch_up(tally.engine)
    with tally.engine.begin() as conn:
        for table in ROLLUP_TABLES:
            if "requests" in table.c:
                conn.execute(update(table).values(requests=table.c.requests * 2))

    def doubled(value: Any) -> Any:
        if isinstance(value, list):
            return [doubled(item) for item in value]
        if isinstance(value, dict) and "requests" in value:
            return {**value, "requests": 2 * value["requests"]}
        return value

    whole = ("open", "since-a-month", "one-utc-month", "two-utc-months", "month-then-hours")
    problems = []
    for name in (*whole, "one-hour"):
        since, until = PERIODS[name]
        chosen = within(calls, since, until)
        for report, arg in REPORTS:
            got = actual(tally, report, arg, since, until)
            want = doubled(expected(chosen, report, arg))
            if got != want:
                problems.append(mismatch(f"[{name}] {report}({arg!r})", got, want))
    assert not problems, f"{len(problems)} report(s) differ:\n" + "\n".join(problems[:12])
    # The 1 µs before and after the busy hour are read raw, the hour from its rollup.
    since, until = PERIODS["hour-and-edges"]
    edges = len(within(calls, since, BUSY_HOUR)) + len(within(calls, BUSY_HOUR + HOUR, until))
    assert edges > 0
    hour = len(within(calls, BUSY_HOUR, BUSY_HOUR + HOUR))
    assert tally.totals(since, until).requests == 2 * hour + edges
    # A sub-hour period is read raw only.
    since, until = PERIODS["sub-hour"]
    assert tally.totals(since, until).requests == len(within(calls, since, until)) > 0


# -- 5. several processes, one store ---------------------------------------------------------

PROCESSES = 3
CALLS_PER_PROCESS = 1_500


def process_calls(index: int) -> list[Call]:
    """What process ``index`` records: the same users in every process, across two months."""
    rng = random.Random(1_000 + index)
    edges = [to_us(NOV_1) - 1, to_us(NOV_1), to_us(NOV_1 + HOUR) - 1, to_us(NOV_1 + HOUR)]
    span = to_us(DEC_1) - to_us(OCT_1)
    moments = edges * 5
    moments += [to_us(OCT_1) + rng.randrange(span) for _ in range(CALLS_PER_PROCESS - len(moments))]
    rng.shuffle(moments)
    return [random_call(rng, ts) for ts in moments]


def record_in_a_process(url: str, index: int, start_at: float) -> dict[str, Any]:
    """A process of its own: records its calls, flushing and reading reports (which catch
    up on SQLite) as it goes, while the other processes do the same."""
    calls = process_calls(index)
    tally = Tally(url, instrument=False, batch_size=40, flush_interval=0.01)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        began = time.time()
        for i, call in enumerate(calls):
            store(tally, [call])
            if i % 150 == 149:
                assert tally.flush(60)
                tally.user_totals("u01", OCT_1, NOV_1)
                tally.users(OCT_1, DEC_1, limit=3)
                tally.totals_by("plan", NOV_1, DEC_1)
                tally.count_users(NOV_1, DEC_1)
                if tally.engine.dialect.name == "sqlite":
                    rollups.catch_up(tally.engine, chunk=37)
        assert tally.flush(60)
        return {**tally.stats(), "began": began, "ended": time.time()}
    finally:
        tally.close()


def test_processes_writing_and_reading_one_store_count_every_call_once(
    store_url: str, opened: list[Tally]
) -> None:
    # Tables created up front, as an app's first process would.
    open_tally(opened, store_url).close()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=context) as pool:
        start_at = time.time() + 4
        futures = [
            pool.submit(record_in_a_process, store_url, i, start_at) for i in range(PROCESSES)
        ]
        stats = [future.result(timeout=300) for future in futures]
    for s in stats:
        assert (s["written"], s["dropped"], s["queue_depth"]) == (CALLS_PER_PROCESS, 0, 0), s
    # They did run at the same time.
    assert max(s["began"] for s in stats) < min(s["ended"] for s in stats)
    write_errors = [s["last_write_error"] for s in stats if s["write_errors"]]
    calls = [call for i in range(PROCESSES) for call in process_calls(i)]
    tally = open_tally(opened, store_url)
    assert tally.count_records() == len(calls)
    assert_rollups_match_raw(tally.engine)
    check_reports(
        tally,
        calls,
        {
            name: PERIODS[name]
            for name in (
                "open",
                "one-utc-month",
                "two-utc-months",
                "since-a-month",
                "us-bounds-across-months",
                "paris-month",
            )
        },
    )
    assert not write_errors, f"writers retried after errors: {write_errors}"


# -- 6. opening a store of schema version 1 --------------------------------------------------


def create_version_1_store(url: str, calls: list[Call]) -> None:
    """A store as version 1 left it: the calls and the meta table, no rollups (more cases
    in test_migrations.py)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            create_store(conn, 1)
        insert_raw(engine, calls)
    finally:
        engine.dispose()


def test_a_version_1_store_is_upgraded_and_rolled_up(store_url: str, opened: list[Tally]) -> None:
    calls = seeded_calls(31)
    create_version_1_store(store_url, calls)
    tally = open_tally(opened, store_url)
    assert meta(tally.engine)["schema_version"] == "2"
    if tally.engine.dialect.name == "sqlite":
        # The first catch-up rolls up everything stored before.
        assert meta(tally.engine)[rollups.WATERMARK_KEY] == "0"
        assert rollups.pending_rows(tally.engine) == len(calls)
    else:
        with tally.engine.connect() as conn:
            assert rollup_contents(conn) == recomputed_rollups(conn)
    check_reports(tally, calls)
    assert_rollups_match_raw(tally.engine)
    # Reopening does not roll anything up a second time; new calls add up as usual.
    more = seeded_calls(32)[:60]
    second = open_tally(opened, store_url)
    seed(second, more)
    assert meta(second.engine)["schema_version"] == "2"
    check_reports(second, calls + more, {n: PERIODS[n] for n in ("open", "one-utc-month")})
    assert_rollups_match_raw(second.engine)


def test_tallies_opening_a_version_1_store_at_once_roll_it_up_once(
    store_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(33)
    create_version_1_store(store_url, calls)
    barrier = threading.Barrier(3)
    tallies: list[Tally] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            tallies.append(Tally(store_url, instrument=False))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    opened.extend(tallies)
    assert not errors, errors
    assert len(tallies) == 3
    assert_rollups_match_raw(tallies[0].engine)
    check_reports(tallies[1], calls, {n: PERIODS[n] for n in ("open", "two-utc-months")})


# -- 7. a failing roll-up never loses a record -----------------------------------------------

AWAY = "llm_tally_rollup_away"


def rename(url: str, old: str, new: str) -> None:
    """Rename a table from another connection (as an operator or a faulty migration might)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))
    finally:
        engine.dispose()


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sqlite_roll_up_failure_keeps_every_record(sqlite_url: str, opened: list[Tally]) -> None:
    calls = seeded_calls(41)
    first, later = calls[:200], calls[200:]
    tally = open_tally(opened, sqlite_url)
    seed(tally, first)
    check_reports(tally, first, {"open": PERIODS["open"]})
    rename(sqlite_url, monthly_pairs_table.name, AWAY)
    seed(tally, later)
    # The calls are stored; rolling them up fails, and says so.
    wait_for(lambda: tally.stats()["write_errors"] > 0)
    stats = tally.stats()
    assert stats["last_write_error"].startswith("rollup: "), stats
    assert monthly_pairs_table.name in stats["last_write_error"]
    assert (stats["written"], stats["dropped"]) == (len(calls), 0)
    assert tally.count_records() == len(calls)
    # A failed roll-up leaves the rollups and the watermark as they were.
    engine = tally.engine
    watermark = meta(engine)[rollups.WATERMARK_KEY]
    assert watermark == str(len(first))
    with engine.connect() as conn:
        before = raw_table_rows(conn, skip=monthly_pairs_table.name)
    with pytest.raises(OperationalError, match=monthly_pairs_table.name):
        rollups.catch_up(engine, chunk=50)
    with engine.connect() as conn:
        assert raw_table_rows(conn, skip=monthly_pairs_table.name) == before
    assert meta(engine)[rollups.WATERMARK_KEY] == watermark
    assert rollups.pending_rows(engine) == len(later)
    # Back in place, the next report rolls the rest up once.
    rename(sqlite_url, AWAY, monthly_pairs_table.name)
    check_reports(tally, calls)
    assert_rollups_match_raw(engine)


def test_sqlite_rollup_table_dropped_is_recreated_by_the_next_tally(
    sqlite_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(42)
    tally = open_tally(opened, sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute(f"DROP TABLE {monthly_pairs_table.name}")
    conn.close()
    seed(tally, calls)
    wait_for(lambda: tally.stats()["write_errors"] > 0)
    assert tally.stats()["last_write_error"].startswith("rollup: ")
    assert tally.count_records() == len(calls)
    tally.close()
    reopened = open_tally(opened, sqlite_url)
    check_reports(reopened, calls)
    assert_rollups_match_raw(reopened.engine)


@pytest.mark.postgres
def test_postgresql_insert_failing_to_roll_up_is_retried_until_it_can(
    pg_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(43)
    first, later = calls[:200], calls[200:]
    tally = open_tally(opened, pg_url)
    seed(tally, first)
    rename(pg_url, monthly_pairs_table.name, AWAY)
    store(tally, later)
    # The insert and its roll-up are one transaction: nothing of it is stored, all is kept.
    assert not tally.flush(1.0)
    wait_for(lambda: tally.stats()["write_errors"] > 0)
    stats = tally.stats()
    assert monthly_pairs_table.name in stats["last_write_error"], stats
    assert tally.count_records() == len(first)
    with tally.engine.connect() as conn:
        stored = int(conn.execute(select(func.sum(monthly_users_table.c.requests))).scalar_one())
    assert stored == len(first)
    rename(pg_url, AWAY, monthly_pairs_table.name)
    assert tally.flush(60)
    stats = tally.stats()
    assert (stats["written"], stats["dropped"], stats["queue_depth"]) == (len(calls), 0, 0)
    assert tally.count_records() == len(calls)
    check_reports(tally, calls)
    assert_rollups_match_raw(tally.engine)

"""Reporting over a seeded store: ``totals_by``, ``month_period``, ``iter_records``, the
``{mount}/api/by/{property}`` JSON endpoint (FastAPI under uvicorn and Flask under werkzeug,
both served for real) and the ``llm-tally report`` / ``llm-tally export`` commands (run as
subprocesses on a real SQLite file).

Stores are filled through ``tally.record`` from a seeded random generator plus a few calls
placed on purpose (month boundaries, a call at 23:30 UTC on October 31, averages that land
exactly on half a nano-dollar...). Every expected number is recomputed here, in plain Python,
from those inputs; nothing is read back from the store to build an expectation.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
import pytest
from fastapi import FastAPI

import llm_tally
from llm_tally import GroupTotals, Tally
from llm_tally.demo.serve import BackgroundServer
from llm_tally.storage.models import usage_table
from llm_tally.web import api

from .conftest import serve_wsgi, stored_rows

NANO = 10**9
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PARIS = ZoneInfo("Europe/Paris")
COST_TEXT = re.compile(r"^\d+\.\d{9}$")
SEED = 20261031

PLANS = ("free", "pro", "team")
FEATURES = ("chat", "search", "résumé", "agent")
PRICED_MODELS = {
    "gpt-4o-mini": "openai",
    "gpt-4o": "openai",
    "o3-mini": "openai",
    "claude-3-5-sonnet": "anthropic",
}
# Names genai-prices cannot know: recorded without a cost, they are stored unpriced (NULL).
UNPRICED_MODELS = ("tally-unknown-b", "tally-unknown-a")
OPERATIONS = ("chat", "responses", "embeddings")
USER_PLANS = {f"u{n:02d}": PLANS[n % len(PLANS)] for n in range(1, 10)}
DIMENSIONS = ("plan", "feature", "model", "user", "provider", "operation")

OCT_1 = datetime(2026, 10, 1, tzinfo=UTC)
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
# 23:30 UTC on October 31 is 00:30 on November 1 in Paris (UTC+1 after the end of DST).
LATE_OCTOBER = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)
# 23:30 UTC on December 31 is already January 2027 in Paris.
LATE_DECEMBER = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)

Bound = datetime | None
PERIODS: dict[str, tuple[Bound, Bound]] = {
    "all": (None, None),
    "utc-october": (OCT_1, NOV_1),
    "paris-november": (datetime(2026, 11, 1, tzinfo=PARIS), datetime(2026, 12, 1, tzinfo=PARIS)),
    "since-only": (datetime(2026, 11, 15, 12, tzinfo=UTC), None),
    "until-only": (None, OCT_1),
    "empty": (NOV_1, NOV_1),
}
# The same periods as query strings / command-line options: dates and ISO-8601 datetimes.
TEXT_PERIODS: dict[str, tuple[dict[str, str], tuple[Bound, Bound]]] = {
    "all": ({}, PERIODS["all"]),
    "dates": ({"since": "2026-10-01", "until": "2026-11-01"}, PERIODS["utc-october"]),
    "iso": (
        {"since": "2026-11-01T00:00:00+01:00", "until": "2026-11-30T23:00:00Z"},
        PERIODS["paris-november"],
    ),
}
GROUP_FIELDS = (
    "value",
    "users",
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_usd",
    "avg_cost_per_user",
    "avg_cost_per_request",
    "unpriced_requests",
)
MONEY_FIELDS = ("cost_usd", "avg_cost_per_user", "avg_cost_per_request")


# -- the seeded calls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One recorded call as the test knows it: the arguments given to ``record``, normalised."""

    id: str
    ts: datetime
    user_id: str | None
    model: str
    provider: str
    operation: str
    properties: dict[str, str]
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    cost_nano: int | None
    latency_ms: int | None
    status: str

    @property
    def ts_us(self) -> int:
        return (self.ts - EPOCH) // timedelta(microseconds=1)


def _call(ts: datetime, user_id: str | int | None, **kwargs: Any) -> dict[str, Any]:
    """A hand-placed call: a priced gpt-4o-mini call unless told otherwise."""
    spec: dict[str, Any] = {
        "user_id": user_id,
        "model": "gpt-4o-mini",
        "input_tokens": 100,
        "output_tokens": 20,
        "cost_usd": Decimal("0.000123456"),
        "ts": ts,
        "properties": {"plan": "pro", "feature": "chat"},
    }
    spec.update(kwargs)
    return spec


def fixed_specs() -> list[dict[str, Any]]:
    return [
        # On the UTC month boundaries: `since` is included, `until` excluded.
        _call(OCT_1, "u01", cost_usd=Decimal("0.010000001")),
        _call(NOV_1, "u02", cost_usd=Decimal("0.020000002")),
        _call(DEC_1, "u03", cost_usd=Decimal("0.030000003")),
        # Around the Paris midnight starting November (23:00 UTC on October 31).
        _call(datetime(2026, 10, 31, 22, 59, 59, 999_999, tzinfo=UTC), "u04"),
        _call(datetime(2026, 10, 31, 23, tzinfo=UTC), "u05", cost_usd="0.000777"),
        _call(LATE_OCTOBER, "u06", cost_usd=Decimal("0.004321"), properties={"plan": "team"}),
        _call(LATE_DECEMBER, "u07", properties={"plan": "free", "feature": "agent"}),
        # Half-even averages: 3 nano-USD over 2 requests is 1.5 -> 2; 5 over 2 is 2.5 -> 2.
        _call(
            datetime(2026, 10, 5, 8, tzinfo=UTC),
            "u04",
            cost_usd=Decimal("0.000000001"),
            properties={"feature": "round-a"},
        ),
        _call(
            datetime(2026, 10, 5, 9, tzinfo=UTC),
            "u04",
            cost_usd="0.000000002",
            properties={"feature": "round-a"},
        ),
        _call(
            datetime(2026, 10, 6, 8, tzinfo=UTC),
            "u05",
            cost_usd=Decimal("0.000000002"),
            properties={"feature": "round-b"},
        ),
        _call(
            datetime(2026, 10, 6, 9, tzinfo=UTC),
            "u06",
            cost_usd=Decimal("0.000000003"),
            properties={"feature": "round-b"},
        ),
        # A priced call that cost nothing, from an int user id, with its plan explicitly unset.
        _call(
            datetime(2026, 10, 7, tzinfo=UTC),
            42,
            cost_usd=0,
            properties={"plan": None, "feature": "search"},
        ),
        # An anonymous, unpriced, failed call with a latency.
        _call(
            datetime(2026, 10, 8, tzinfo=UTC),
            None,
            model="tally-unknown-a",
            cost_usd=None,
            status="error",
            latency_ms=1234,
            properties={},
        ),
    ]


START = datetime(2026, 9, 20, tzinfo=UTC)
SPAN_US = (datetime(2026, 12, 20, tzinfo=UTC) - START) // timedelta(microseconds=1)


def random_specs(seed: int, n: int = 320) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    specs: list[dict[str, Any]] = []
    for _ in range(n):
        user = rng.choice(list(USER_PLANS)) if rng.random() < 0.93 else None
        properties: dict[str, Any] = {}
        draw = rng.random()
        if user is not None and draw < 0.8:
            properties["plan"] = USER_PLANS[user]
        elif draw < 0.86:
            properties["plan"] = None  # explicitly unset: stored without the key
        if rng.random() < 0.85:
            properties["feature"] = rng.choice(FEATURES)
        if rng.random() < 0.1:
            properties["region"] = rng.choice(("eu", "us"))
        unpriced = rng.random() < 0.12
        model = rng.choice(UNPRICED_MODELS) if unpriced else rng.choice(list(PRICED_MODELS))
        status = rng.choices(("ok", "error", "aborted"), weights=(85, 10, 5))[0]
        input_tokens = 0 if status == "error" else rng.randrange(0, 6_000)
        output_tokens = 0 if status == "error" else rng.randrange(0, 2_000)
        spec: dict[str, Any] = {
            "user_id": user,
            "model": model,
            "provider": PRICED_MODELS.get(model, "openai"),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_input_tokens": rng.randrange(0, input_tokens + 1),
            "reasoning_tokens": rng.randrange(0, output_tokens + 1),
            "ts": START + timedelta(microseconds=rng.randrange(SPAN_US)),
            "properties": properties,
            "status": status,
        }
        if rng.random() < 0.8:  # else the default operation, "manual"
            spec["operation"] = rng.choice(OPERATIONS)
        if not unpriced:
            cost = Decimal(rng.randrange(0, 40_000_000)).scaleb(-9)  # up to 4 cents, exact
            spec["cost_usd"] = cost if rng.random() < 0.8 else format(cost, "f")
        if rng.random() < 0.3:
            spec["latency_ms"] = rng.randrange(50, 30_000)
        specs.append(spec)
    return specs


def all_specs() -> list[dict[str, Any]]:
    return fixed_specs() + random_specs(SEED)


def as_call(record_id: str, spec: dict[str, Any]) -> Call:
    cost = spec.get("cost_usd")
    cost_nano = None
    if cost is not None:
        scaled = Decimal(cost) * NANO
        assert scaled == scaled.to_integral_value(), "seeded costs have at most 9 decimals"
        cost_nano = int(scaled)
    user = spec["user_id"]
    return Call(
        id=record_id,
        ts=spec["ts"],
        user_id=None if user is None else str(user),
        model=spec["model"],
        provider=spec.get("provider", "openai"),
        operation=spec.get("operation", "manual"),
        properties={k: str(v) for k, v in spec.get("properties", {}).items() if v is not None},
        input_tokens=spec.get("input_tokens", 0),
        output_tokens=spec.get("output_tokens", 0),
        cached_input_tokens=spec.get("cached_input_tokens", 0),
        reasoning_tokens=spec.get("reasoning_tokens", 0),
        cost_nano=cost_nano,
        latency_ms=spec.get("latency_ms"),
        status=spec.get("status", "ok"),
    )


def seed(tally: Tally, specs: list[dict[str, Any]]) -> list[Call]:
    calls = [as_call(tally.record(**spec), spec) for spec in specs]
    assert tally.flush(10), "the seeded calls were not stored in time"
    stats = tally.stats()
    assert (stats["written"], stats["dropped"]) == (len(specs), 0), stats
    return calls


# -- expectations, from the calls alone ---------------------------------------------------------


def usd(nano: int) -> Decimal:
    return Decimal(nano) / NANO  # exact: far fewer than 28 significant digits


def nano_average(total_nano: int, count: int) -> Decimal:
    # round() of a Fraction rounds half to even, to a whole nano-dollar here.
    return usd(round(Fraction(total_nano, count))) if count else Decimal(0)


def in_period(call: Call, since: Bound, until: Bound) -> bool:
    return (since is None or call.ts >= since) and (until is None or call.ts < until)


def within(calls: Iterable[Call], since: Bound, until: Bound) -> list[Call]:
    return [c for c in calls if in_period(c, since, until)]


def value_of(call: Call, dimension: str) -> str | None:
    built_in = {
        "user": call.user_id,
        "model": call.model,
        "provider": call.provider,
        "operation": call.operation,
    }
    if dimension in built_in:
        return built_in[dimension]
    return call.properties.get(dimension)


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
    unpriced_requests: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def add(self, call: Call) -> None:
        if call.user_id is not None:
            self.users.add(call.user_id)
        self.requests += 1
        self.errors += call.status != "ok"
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.cached_input_tokens += call.cached_input_tokens
        self.reasoning_tokens += call.reasoning_tokens
        if call.cost_nano is None:
            self.unpriced_requests += 1
        else:
            self.cost_nano += call.cost_nano
        self.first = call.ts if self.first is None else min(self.first, call.ts)
        self.last = call.ts if self.last is None else max(self.last, call.ts)


def expected_groups(calls: Iterable[Call], dimension: str) -> list[dict[str, Any]]:
    """What ``totals_by(dimension)`` must answer for these calls, in its order."""
    groups: dict[str | None, Sums] = {}
    for call in calls:
        groups.setdefault(value_of(call, dimension), Sums()).add(call)
    if None in groups:
        # Where the None group goes among groups of the same cost is not specified (and differs
        # between backends, see below): the seeded data must not depend on it.
        tied = [
            v for v, g in groups.items() if v is not None and g.cost_nano == groups[None].cost_nano
        ]
        assert not tied, f"seeded data ties the None group with {tied}"
    ordered = sorted(groups.items(), key=lambda item: (-item[1].cost_nano, item[0] or ""))
    return [
        {
            "value": value,
            "users": len(g.users),
            "requests": g.requests,
            "errors": g.errors,
            "input_tokens": g.input_tokens,
            "output_tokens": g.output_tokens,
            "cached_input_tokens": g.cached_input_tokens,
            "reasoning_tokens": g.reasoning_tokens,
            "cost_usd": usd(g.cost_nano),
            "avg_cost_per_user": nano_average(g.cost_nano, len(g.users)),
            "avg_cost_per_request": nano_average(g.cost_nano, g.requests),
            "unpriced_requests": g.unpriced_requests,
        }
        for value, g in ordered
    ]


def expected_users(calls: Iterable[Call]) -> list[dict[str, Any]]:
    """What ``tally.users()`` must answer (calls without a user are left out), by cost."""
    per_user: dict[str, Sums] = {}
    for call in calls:
        if call.user_id is not None:
            per_user.setdefault(call.user_id, Sums()).add(call)
    ordered = sorted(per_user.items(), key=lambda item: (-item[1].cost_nano, item[0]))
    return [
        {
            "user_id": user_id,
            "requests": g.requests,
            "errors": g.errors,
            "input_tokens": g.input_tokens,
            "output_tokens": g.output_tokens,
            "cached_input_tokens": g.cached_input_tokens,
            "reasoning_tokens": g.reasoning_tokens,
            "cost_usd": usd(g.cost_nano),
            "unpriced_requests": g.unpriced_requests,
            "first_seen": g.first,
            "last_seen": g.last,
        }
        for user_id, g in ordered
    ]


def summary(group: GroupTotals) -> dict[str, Any]:
    assert isinstance(group, GroupTotals)
    return {name: getattr(group, name) for name in GROUP_FIELDS}


def from_group_json(item: dict[str, Any]) -> dict[str, Any]:
    """A JSON group with its money strings checked and turned back into Decimals."""
    assert set(item) == set(GROUP_FIELDS), item
    parsed = dict(item)
    for name in MONEY_FIELDS:
        assert isinstance(item[name], str) and COST_TEXT.match(item[name]), item
        parsed[name] = Decimal(item[name])
    return parsed


def from_user_json(item: dict[str, Any]) -> dict[str, Any]:
    parsed = dict(item)
    assert COST_TEXT.match(item["cost_usd"]), item
    parsed["cost_usd"] = Decimal(item["cost_usd"])
    for name in ("first_seen", "last_seen"):
        assert item[name].endswith("Z"), item
        parsed[name] = datetime.fromisoformat(item[name])
    return parsed


def local_month(call: Call, zone: ZoneInfo) -> tuple[int, int]:
    local = call.ts.astimezone(zone)
    return local.year, local.month


# -- stores ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    url: str
    path: Path
    calls: list[Call]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """A SQLite file seeded once for the module (read-only for the tests)."""
    path = tmp_path_factory.mktemp("reporting") / "usage.db"
    url = f"sqlite:///{path}"
    with Tally(url, instrument=False) as writer:
        calls = seed(writer, all_specs())
    return Seeded(url, path, calls)


@pytest.fixture
def reader(seeded: Seeded) -> Iterator[Tally]:
    t = Tally(seeded.url, instrument=False)
    yield t
    t.close()


def test_seeded_data_covers_the_cases(seeded: Seeded) -> None:
    calls = seeded.calls
    assert len({c.user_id for c in calls}) >= 10
    assert {c.properties.get("plan") for c in calls} >= {*PLANS, None}
    assert {c.status for c in calls} == {"ok", "error", "aborted"}
    assert {c.model for c in calls if c.cost_nano is None} == set(UNPRICED_MODELS)
    assert any(c.user_id is None for c in calls)
    assert any(c.cost_nano == 0 for c in calls)


# -- 1. totals_by -------------------------------------------------------------------------------


@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_totals_by_matches_the_seeded_calls(reader: Tally, seeded: Seeded, dimension: str) -> None:
    for name, (since, until) in PERIODS.items():
        actual = [summary(g) for g in reader.totals_by(dimension, since, until)]
        expected = expected_groups(within(seeded.calls, since, until), dimension)
        assert actual == expected, f"{dimension} over {name}"
    assert reader.totals_by(dimension, *PERIODS["empty"]) == []


def test_unpriced_calls_are_left_out_of_the_cost_and_counted(reader: Tally, seeded: Seeded) -> None:
    by_model = {g.value: g for g in reader.totals_by("model")}
    for model in UNPRICED_MODELS:
        calls = [c for c in seeded.calls if c.model == model]
        assert by_model[model].cost_usd == 0
        assert by_model[model].unpriced_requests == by_model[model].requests == len(calls)
    # The priced call that cost 0 counts as priced.
    zero = [c for c in seeded.calls if c.cost_nano == 0 and c.model in PRICED_MODELS]
    priced = sum(g.requests - g.unpriced_requests for g in by_model.values())
    assert zero and priced == sum(1 for c in seeded.calls if c.cost_nano is not None)
    # The stored rows agree: NULL cost, source "unknown", for exactly the unpriced calls.
    rows = {r["id"]: r for r in stored_rows(reader)}
    for call in seeded.calls:
        row = rows[call.id]
        assert row["cost_nano_usd"] == call.cost_nano
        assert row["cost_source"] == ("unknown" if call.cost_nano is None else "given")


def test_totals_by_orders_by_cost_then_value(reader: Tally) -> None:
    for dimension in DIMENSIONS:
        groups = reader.totals_by(dimension)
        keys = [(-g.cost_usd, g.value) for g in groups if g.value is not None]
        assert keys == sorted(keys), dimension
    # The unpriced models tie at 0: last, by name (seeded "b" before "a").
    assert [g.value for g in reader.totals_by("model")][-2:] == sorted(UNPRICED_MODELS)


def test_the_none_group_holds_the_calls_without_the_property(reader: Tally, seeded: Seeded) -> None:
    for dimension in ("plan", "feature", "region", "user"):
        none_group = {g.value: g for g in reader.totals_by(dimension)}[None]
        lacking = [c for c in seeded.calls if value_of(c, dimension) is None]
        assert none_group.requests == len(lacking) > 0, dimension
        assert none_group.cost_usd == usd(sum(c.cost_nano or 0 for c in lacking))
    # A plan passed as None is not stored: the int user 42 is in the None plan group.
    forty_two = [c for c in seeded.calls if c.user_id == "42"]
    assert forty_two and all("plan" not in c.properties for c in forty_two)
    # Anonymous calls are no user: the None user group counts 0 users and averages 0 per user.
    anonymous = {g.value: g for g in reader.totals_by("user")}[None]
    assert anonymous.users == 0 and anonymous.avg_cost_per_user == 0


def test_averages_are_rounded_half_even_to_the_nano_dollar(reader: Tally, seeded: Seeded) -> None:
    by_feature = {g.value: g for g in reader.totals_by("feature")}
    for feature in ("round-a", "round-b"):
        calls = [c for c in seeded.calls if c.properties.get("feature") == feature]
        total = sum(c.cost_nano or 0 for c in calls)
        users = len({c.user_id for c in calls})
        # The inputs were chosen so that a per-request average falls on exactly half a nano.
        assert Fraction(total, len(calls)).denominator == 2
        group = by_feature[feature]
        assert group.avg_cost_per_request == nano_average(total, len(calls))
        assert group.avg_cost_per_user == nano_average(total, users)
        assert group.avg_cost_per_request.as_tuple().exponent == -9
    # 5 nano over 2 requests: half-even gives 2, where rounding half up would give 3.
    assert by_feature["round-b"].avg_cost_per_request * NANO == 2


def test_period_bounds_may_be_dates_naive_or_aware_datetimes(reader: Tally, seeded: Seeded) -> None:
    expected = expected_groups(within(seeded.calls, OCT_1, NOV_1), "plan")
    for since, until in (
        (date(2026, 10, 1), date(2026, 11, 1)),
        (datetime(2026, 10, 1), datetime(2026, 11, 1)),  # naive: UTC
        (OCT_1.astimezone(PARIS), NOV_1.astimezone(ZoneInfo("America/New_York"))),
    ):
        assert [summary(g) for g in reader.totals_by("plan", since, until)] == expected
    # `since` is included, `until` excluded: the calls at 00:00 UTC on Oct 1 and Nov 1.
    october = {r["id"] for r in reader.iter_records(OCT_1, NOV_1)}
    at = {c.ts: c.id for c in seeded.calls}
    assert at[OCT_1] in october and at[NOV_1] not in october
    assert at[NOV_1] in {r["id"] for r in reader.iter_records(NOV_1, DEC_1)}


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "pl\x00an", "plan\n", "\x7f", "tab\there"], ids=repr
)
def test_bad_dimension_names_raise(tally: Tally, name: str) -> None:
    with pytest.raises(ValueError, match="dimension"):
        tally.totals_by(name)
    with pytest.raises(ValueError, match="dimension"):
        tally.has_property(name)


def test_has_property(reader: Tally) -> None:
    assert reader.has_property("plan") and reader.has_property("feature")
    assert reader.has_property("region")
    assert not reader.has_property("nope") and not reader.has_property("Plan")


# Any printable name of 1 to 64 characters without '"' or '\\' is a valid property name.
PROPERTY_NAMES = ["a.b", "it's", "a b", "plan[0]", "$", "*", "k" * 64, "équipe", "チーム"]
# Rejected: they cannot be written in a JSON path.
UNSUPPORTED_PROPERTY_NAMES = ['a"b', "x\\y"]


def _check_odd_property_name(tally: Tally, key: str) -> None:
    costs = {"yes": Decimal("0.5"), None: Decimal("0.25")}
    tally.record(user_id="u1", model="m", cost_usd=costs["yes"], properties={key: "yes"}, ts=OCT_1)
    tally.record(user_id="u2", model="m", cost_usd=costs[None], properties={"o": "x"}, ts=OCT_1)
    assert tally.flush(10)
    assert tally.has_property(key) and not tally.has_property(key[:-1] or "?")
    assert [(g.value, g.requests, g.cost_usd) for g in tally.totals_by(key)] == [
        (value, 1, cost) for value, cost in sorted(costs.items(), key=lambda i: -i[1])
    ]


@pytest.mark.parametrize("key", PROPERTY_NAMES)
def test_any_printable_property_name_groups_on_sqlite(tally: Tally, key: str) -> None:
    _check_odd_property_name(tally, key)


@pytest.mark.parametrize("key", UNSUPPORTED_PROPERTY_NAMES)
def test_property_names_with_quotes_or_backslashes_are_rejected(tally: Tally, key: str) -> None:
    with pytest.raises(ValueError, match="properties"):
        tally.record(user_id="u", model="m", cost_usd=1, properties={key: "x"})
    with pytest.raises(ValueError, match="dimension"):
        tally.totals_by(key)


# -- 1b. the same on PostgreSQL -------------------------------------------------------------


@pytest.fixture
def pg_tally(pg_url: str) -> Iterator[Tally]:
    t = Tally(pg_url, instrument=False)
    yield t
    t.close()


@pytest.mark.postgres
def test_totals_by_on_postgresql(pg_tally: Tally) -> None:
    calls = seed(pg_tally, all_specs())
    for dimension in DIMENSIONS:
        for name, (since, until) in PERIODS.items():
            actual = [summary(g) for g in pg_tally.totals_by(dimension, since, until)]
            expected = expected_groups(within(calls, since, until), dimension)
            assert actual == expected, f"{dimension} over {name}"
    assert pg_tally.has_property("plan") and not pg_tally.has_property("nope")
    with pytest.raises(ValueError, match="dimension"):
        pg_tally.totals_by("x" * 65)
    since, until = llm_tally.month_period(2026, 11, "Europe/Paris")
    rows = list(pg_tally.iter_records(since, until))
    expected_ids = [c.id for c in sorted(within(calls, since, until), key=lambda c: (c.ts, c.id))]
    assert [r["id"] for r in rows] == expected_ids
    assert pg_tally.count_records(since, until) == len(expected_ids)


@pytest.mark.postgres
@pytest.mark.parametrize("key", PROPERTY_NAMES)
def test_any_printable_property_name_groups_on_postgresql(pg_tally: Tally, key: str) -> None:
    _check_odd_property_name(pg_tally, key)


@pytest.mark.postgres
def test_the_none_group_sorts_the_same_on_sqlite_and_postgresql(
    tally: Tally, pg_tally: Tally
) -> None:
    specs = [
        _call(OCT_1, "u1", model="tally-unknown-a", cost_usd=None, properties={"plan": "free"}),
        _call(OCT_1, "u2", model="tally-unknown-a", cost_usd=None, properties={}),
        _call(OCT_1, "u3", properties={"plan": "pro"}),
    ]
    seed(tally, specs)
    seed(pg_tally, specs)
    assert [g.value for g in tally.totals_by("plan")] == [
        g.value for g in pg_tally.totals_by("plan")
    ]


# -- 2. month_period ------------------------------------------------------------------------


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("year", "month", "tz", "since_utc", "until_utc"),
    [
        (2026, 11, "Europe/Paris", "2026-10-31T23:00Z", "2026-11-30T23:00Z"),
        (2026, 12, "Europe/Paris", "2026-11-30T23:00Z", "2026-12-31T23:00Z"),
        (2026, 12, "UTC", "2026-12-01T00:00Z", "2027-01-01T00:00Z"),
        (2026, 3, "Europe/Paris", "2026-02-28T23:00Z", "2026-03-31T22:00Z"),  # DST starts
        (2026, 10, "Europe/Paris", "2026-09-30T22:00Z", "2026-10-31T23:00Z"),  # DST ends
        (2027, 1, "America/New_York", "2027-01-01T05:00Z", "2027-02-01T05:00Z"),
        (2026, 12, "Asia/Tokyo", "2026-11-30T15:00Z", "2026-12-31T15:00Z"),
    ],
)
def test_month_period_bounds_are_local_midnights(
    year: int, month: int, tz: str, since_utc: str, until_utc: str
) -> None:
    since, until = llm_tally.month_period(year, month, tz)
    assert since.tzinfo is not None and since.utcoffset() is not None
    assert until.tzinfo is not None and until.utcoffset() is not None
    assert (since, until) == (_utc(since_utc), _utc(until_utc))
    zone = ZoneInfo(tz)
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    for bound, (y, m) in ((since, (year, month)), (until, (next_year, next_month))):
        local = bound.astimezone(zone)
        assert (local.year, local.month, local.day, local.hour, local.minute) == (y, m, 1, 0, 0)
        assert local.second == local.microsecond == 0
        # The first instant of that local day: one microsecond earlier is the previous month.
        assert (bound - timedelta(microseconds=1)).astimezone(zone).day != 1


def test_month_period_defaults_to_this_month() -> None:
    for tz in ("UTC", "Europe/Paris", "Pacific/Kiritimati"):
        since, until = llm_tally.month_period(tz=tz)
        now = datetime.now(UTC)
        assert since <= now < until
        local = now.astimezone(ZoneInfo(tz))
        assert llm_tally.month_period(local.year, local.month, tz) == (since, until)


def test_month_period_puts_a_late_october_call_in_november_in_paris(
    reader: Tally, seeded: Seeded
) -> None:
    late = next(c for c in seeded.calls if c.ts == LATE_OCTOBER)
    new_year = next(c for c in seeded.calls if c.ts == LATE_DECEMBER)
    cases = [
        ("Europe/Paris", 2026, 11, {late.id}, {new_year.id}),
        ("Europe/Paris", 2026, 10, set(), {late.id}),
        ("UTC", 2026, 10, {late.id}, set()),
        ("UTC", 2026, 11, set(), {late.id}),
        ("UTC", 2026, 12, {new_year.id}, set()),
        ("Europe/Paris", 2027, 1, {new_year.id}, set()),
        ("Europe/Paris", 2026, 12, set(), {new_year.id}),
    ]
    for tz, year, month, inside, outside in cases:
        since, until = llm_tally.month_period(year, month, tz)
        ids = {r["id"] for r in reader.iter_records(since, until)}
        assert inside <= ids and not outside & ids, (tz, year, month)
        zone = ZoneInfo(tz)
        month_calls = [c for c in seeded.calls if local_month(c, zone) == (year, month)]
        assert ids == {c.id for c in month_calls}
        assert reader.count_records(since, until) == len(month_calls)
        assert [summary(g) for g in reader.totals_by("plan", since, until)] == expected_groups(
            month_calls, "plan"
        )
    # The late call's user is charged for it in Paris' November, not in UTC's.
    assert late.user_id is not None
    for tz, charged in (("Europe/Paris", True), ("UTC", False)):
        period = llm_tally.month_period(2026, 11, tz)
        mine = [c for c in seeded.calls if c.user_id == late.user_id and in_period(c, *period)]
        assert (late in mine) is charged
        totals = reader.user_totals(late.user_id, *period)
        assert totals.requests == len(mine)
        assert totals.cost_usd == usd(sum(c.cost_nano or 0 for c in mine))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2026, 0, "UTC"), "month"),
        ((2026, 13, "UTC"), "month"),
        ((2026, -1, "Europe/Paris"), "month"),
        ((2026, 11, "Not/AZone"), "tz"),
        ((2026, 11, ""), "tz"),
        ((2026, 11, "../etc/passwd"), "tz"),
        ((2026, 11, "Europe/Pariss"), "tz"),
    ],
)
def test_month_period_rejects_bad_input(args: tuple[int, int, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm_tally.month_period(*args)


# -- 3. iter_records ------------------------------------------------------------------------


def check_rows(rows: list[dict[str, Any]], calls: list[Call]) -> None:
    """The stored rows of exactly these calls, in time order, with every column right."""
    columns = {column.name for column in usage_table.columns}
    ordered = sorted(calls, key=lambda c: (c.ts_us, c.id))
    assert [r["id"] for r in rows] == [c.id for c in ordered]
    for row, call in zip(rows, ordered, strict=True):
        assert set(row) == columns
        assert row["ts"] == call.ts_us
        assert row["user_id"] == call.user_id
        assert row["properties"] == call.properties
        assert (row["provider"], row["operation"], row["status"]) == (
            call.provider,
            call.operation,
            call.status,
        )
        assert row["request_model"] == row["response_model"] == call.model
        for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"):
            assert row[name] == getattr(call, name), name
        assert row["cache_write_tokens"] == 0
        assert row["cost_nano_usd"] == call.cost_nano
        assert row["latency_us"] == (None if call.latency_ms is None else call.latency_ms * 1000)
        assert row["usage_source"] == "manual"


def test_iter_records_yields_the_stored_rows_in_time_order(reader: Tally, seeded: Seeded) -> None:
    everything = stored_rows(reader)
    for name, (since, until) in PERIODS.items():
        records = reader.iter_records(since, until)
        assert isinstance(records, Iterator)
        rows = list(records)
        check_rows(rows, within(seeded.calls, since, until))
        lo = None if since is None else (since - EPOCH) // timedelta(microseconds=1)
        hi = None if until is None else (until - EPOCH) // timedelta(microseconds=1)
        same = [
            r for r in everything if (lo is None or r["ts"] >= lo) and (hi is None or r["ts"] < hi)
        ]
        assert rows == same, name
        assert reader.count_records(since, until) == len(rows), name


def test_iter_records_of_one_user(reader: Tally, seeded: Seeded) -> None:
    for user in ("u03", 42, "nobody"):
        rows = list(reader.iter_records(OCT_1, DEC_1, user_id=user))
        check_rows(rows, [c for c in within(seeded.calls, OCT_1, DEC_1) if c.user_id == str(user)])
    assert len(list(reader.iter_records(user_id=None))) == len(seeded.calls)


# -- 4. the JSON endpoint -------------------------------------------------------------------


@contextmanager
def serving(tally: Tally) -> Iterator[dict[str, str]]:
    """The usage endpoint of a FastAPI app (uvicorn) and of a Flask app (werkzeug), for real."""
    asgi_app = FastAPI()
    tally.init_app(asgi_app)
    flask_app = flask.Flask(__name__)
    tally.init_app(flask_app)
    with serve_wsgi(flask_app) as flask_url, BackgroundServer(asgi_app) as uvicorn_server:
        yield {"asgi": f"{uvicorn_server.url}/llm-usage", "flask": f"{flask_url}/llm-usage"}


def get(url: str, params: dict[str, str] | None = None, **headers: str) -> httpx2.Response:
    with httpx2.Client(timeout=15) as http:
        return http.get(url, params=params or {}, headers=headers)


@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_api_by_dimension_answers_totals_by_on_both_frameworks(
    reader: Tally, seeded: Seeded, dimension: str
) -> None:
    with serving(reader) as urls:
        for name, (params, (since, until)) in TEXT_PERIODS.items():
            python = {
                "dimension": dimension,
                "groups": [api.group_json(g) for g in reader.totals_by(dimension, since, until)],
            }
            expected = expected_groups(within(seeded.calls, since, until), dimension)
            bodies = []
            for framework, url in urls.items():
                response = get(f"{url}/api/by/{dimension}", params)
                assert response.status_code == 200, (framework, name, response.text)
                assert response.headers["content-type"].startswith("application/json")
                body = response.json()
                assert body == python, (framework, name)
                assert [from_group_json(g) for g in body["groups"]] == expected, (framework, name)
                bodies.append(body)
            assert bodies[0] == bodies[1]


def test_api_by_rejects_bad_property_names_and_periods(reader: Tally) -> None:
    cases = [
        ("/api/by/" + "p" * 65, {}, "property"),
        ("/api/by/pl%01an", {}, "property"),
        ("/api/by/plan", {"since": "yesterday"}, "since"),
        ("/api/by/plan", {"until": "2026-13-01"}, "until"),
        ("/api/by/plan", {"since": "2026-11-01", "until": "2026-10-01"}, "until"),
    ]
    with serving(reader) as urls:
        for framework, url in urls.items():
            for path, params, parameter in cases:
                response = get(url + path, params)
                assert response.status_code == 400, (framework, path, params, response.text)
                error = response.json()["error"]
                assert error.startswith(f"{parameter}:"), (framework, path, error)
            # The longest property name is fine (and groups every call under None).
            response = get(f"{url}/api/by/{'p' * 64}")
            assert response.status_code == 200, framework
            groups = response.json()["groups"]
            assert [g["value"] for g in groups] == [None]
            assert groups[0]["requests"] == reader.count_records()


def test_api_by_default_authorization_lets_in_loopback_only_without_proxy(
    reader: Tally,
) -> None:
    with serving(reader) as urls:
        for framework, url in urls.items():
            assert get(f"{url}/api/by/plan").status_code == 200, framework
            for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                response = get(f"{url}/api/by/plan", **{header: "203.0.113.7"})
                assert response.status_code == 403, (framework, header)
                assert response.json() == {"error": api.FORBIDDEN_MESSAGE}


# -- 5. the command line --------------------------------------------------------------------

REPORT_JSON = [
    ("user", "all"),
    ("plan", "all"),
    ("model", "all"),
    ("feature", "all"),
    ("user", "dates"),
    ("plan", "dates"),
    ("feature", "iso"),
    ("model", "iso"),
]
REPORT_CSV = ["user", "plan"]
REPORT_TABLE = ["plan", "model"]
# A date and an ISO datetime: UTC's October.
EXPORT_PERIOD = ["--since", "2026-10-01", "--until", "2026-11-01T00:00:00Z"]
EXPORT_BOUNDS = (OCT_1, NOV_1)
EXPORT_USER = "u03"
CLI_ERRORS = {
    "bad-date": (["report", "--by", "plan", "--since", "yesterday"], ["--since", "yesterday"]),
    "bad-until": (["export", "--until", "2026-02-30"], ["--until", "2026-02-30"]),
    "unknown-property": (["report", "--by", "nope"], ["unknown property 'nope'"]),
    "bad-property": (["report", "--by", "x" * 65], ["dimension"]),
}

Run = subprocess.CompletedProcess[str]


def run_cli(args: list[str], cwd: Path) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "LLM_TALLY_DATABASE_URL"}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "llm_tally", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class CliRuns:
    runs: dict[str, Run]
    export_file: Path
    user_export_file: Path
    missing_store: Path
    empty_dir: Path


@pytest.fixture(scope="module")
def cli(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> CliRuns:
    """Every command of this module, run once against the seeded store, a few at a time."""
    work = tmp_path_factory.mktemp("cli")
    empty_dir = work / "empty"
    empty_dir.mkdir()
    store = ["--database-url", seeded.url]
    export_file = work / "export.csv"
    user_export_file = work / "export-user.csv"
    missing_store = work / "missing.db"
    jobs: dict[str, tuple[list[str], Path]] = {}
    for by, period in REPORT_JSON:
        options = [f"--{k}={v}" for k, v in TEXT_PERIODS[period][0].items()]
        jobs[f"json-{by}-{period}"] = (
            ["report", *store, "--by", by, "--format", "json", *options],
            work,
        )
    for by in REPORT_CSV:
        jobs[f"csv-{by}"] = (["report", *store, "--by", by, "--format", "csv"], work)
    for by in REPORT_TABLE:
        jobs[f"table-{by}"] = (["report", *store, "--by", by], work)
    jobs["export-stdout"] = (["export", *store, *EXPORT_PERIOD, "--format", "csv"], work)
    jobs["export-file"] = (["export", *store, *EXPORT_PERIOD, "-o", str(export_file)], work)
    jobs["export-user"] = (["export", *store, *EXPORT_PERIOD, "--user", EXPORT_USER], work)
    jobs["export-user-file"] = (
        ["export", *store, *EXPORT_PERIOD, "--user", EXPORT_USER, "-o", str(user_export_file)],
        work,
    )
    for name, (args, _) in CLI_ERRORS.items():
        jobs[name] = ([args[0], *store, *args[1:]], work)
    jobs["missing-store"] = (["report", "--database-url", f"sqlite:///{missing_store}"], work)
    jobs["missing-default-store"] = (["report", "--by", "plan"], empty_dir)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_cli, args, cwd) for name, (args, cwd) in jobs.items()}
        runs = {name: future.result() for name, future in futures.items()}
    return CliRuns(runs, export_file, user_export_file, missing_store, empty_dir)


def ok(run: Run) -> Run:
    assert run.returncode == 0, (run.args, run.stderr)
    return run


def python_rows(tally: Tally, by: str, since: Bound, until: Bound) -> list[dict[str, Any]]:
    if by == "user":
        return [api.totals_json(t) for t in tally.users(since, until, limit=1000)]
    return [api.group_json(g) for g in tally.totals_by(by, since, until)]


@pytest.mark.parametrize(("by", "period"), REPORT_JSON)
def test_report_json_equals_the_python_api_and_the_endpoint(
    cli: CliRuns, reader: Tally, seeded: Seeded, by: str, period: str
) -> None:
    params, (since, until) = TEXT_PERIODS[period]
    rows = json.loads(ok(cli.runs[f"json-{by}-{period}"]).stdout)
    assert rows == python_rows(reader, by, since, until)
    calls = within(seeded.calls, since, until)
    if by == "user":
        assert [from_user_json(r) for r in rows] == expected_users(calls)
    else:
        assert [from_group_json(r) for r in rows] == expected_groups(calls, by)
    with serving(reader) as urls:
        for framework, url in urls.items():
            if by == "user":
                response = get(f"{url}/api/users", {**params, "limit": "1000"})
                assert response.status_code == 200, framework
                assert response.json()["users"] == rows, framework
            else:
                response = get(f"{url}/api/by/{by}", params)
                assert response.status_code == 200, framework
                assert response.json() == {"dimension": by, "groups": rows}, framework


@pytest.mark.parametrize("by", REPORT_CSV)
def test_report_csv_has_the_same_numbers(cli: CliRuns, reader: Tally, by: str) -> None:
    text = ok(cli.runs[f"csv-{by}"]).stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    python = python_rows(reader, by, None, None)
    assert rows and list(rows[0]) == list(python[0])
    assert rows == [{k: "" if v is None else str(v) for k, v in row.items()} for row in python]
    # The money columns are exact decimal text.
    for row in rows:
        assert COST_TEXT.match(row["cost_usd"]), row


@pytest.mark.parametrize("by", REPORT_TABLE)
def test_report_table_lists_every_group(cli: CliRuns, reader: Tally, by: str) -> None:
    run = ok(cli.runs[f"table-{by}"])
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    python = python_rows(reader, by, None, None)
    assert lines[0].split() == list(python[0])
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + len(python)
    for line, row in zip(lines[2:], python, strict=True):
        # Every cell is in the line, in order; the None group's value is left blank.
        assert line.split() == [str(v) for v in row.values() if v is not None], line
        first = row.get("value", row.get("user_id"))
        assert line.startswith(str(first)) if first is not None else line.startswith(" ")
    values = {row.get("value", row.get("user_id")) for row in python}
    if by == "plan":
        assert values == {*PLANS, None}
    elif by == "model":
        assert values == {*PRICED_MODELS, *UNPRICED_MODELS}


@pytest.mark.parametrize("name", [*CLI_ERRORS, "missing-store", "missing-default-store"])
def test_cli_errors_exit_2_with_a_message(cli: CliRuns, name: str) -> None:
    run = cli.runs[name]
    assert run.returncode == 2, (name, run.stdout, run.stderr)
    assert run.stdout == ""
    assert run.stderr.startswith("llm-tally "), run.stderr
    assert "error:" in run.stderr and "Traceback" not in run.stderr
    if name in CLI_ERRORS:
        for fragment in CLI_ERRORS[name][1]:
            assert fragment in run.stderr, (name, run.stderr)
    elif name == "missing-store":
        assert f"no store at sqlite:///{cli.missing_store}" in run.stderr
        assert not cli.missing_store.exists()
    else:
        assert "no store at sqlite:///llm_tally.db" in run.stderr
        assert list(cli.empty_dir.iterdir()) == []


def export_rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames is not None
    required = {"id", "time", "user_id", "properties", "request_model", "cost_usd", "status"}
    assert required <= set(reader.fieldnames)
    return list(reader)


def check_export(rows: list[dict[str, str]], calls: list[Call]) -> None:
    ordered = sorted(calls, key=lambda c: (c.ts_us, c.id))
    assert [r["id"] for r in rows] == [c.id for c in ordered]
    for row, call in zip(rows, ordered, strict=True):
        assert row["time"].endswith("Z") and "+" not in row["time"], row["time"]
        assert datetime.fromisoformat(row["time"]) == call.ts
        assert row["user_id"] == (call.user_id or "")
        assert json.loads(row["properties"]) == call.properties
        assert row["request_model"] == row["response_model"] == call.model
        assert (row["provider"], row["operation"], row["status"]) == (
            call.provider,
            call.operation,
            call.status,
        )
        for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"):
            assert int(row[name]) == getattr(call, name), name
        if call.cost_nano is None:
            assert row["cost_usd"] == "" and row["cost_source"] == "unknown"
        else:
            assert COST_TEXT.match(row["cost_usd"]), row["cost_usd"]
            assert Decimal(row["cost_usd"]) * NANO == call.cost_nano
        if call.latency_ms is None:
            assert row["latency_ms"] == ""
        else:
            assert Decimal(row["latency_ms"]) == call.latency_ms


def test_export_csv_to_stdout_has_one_row_per_call(
    cli: CliRuns, reader: Tally, seeded: Seeded
) -> None:
    run = ok(cli.runs["export-stdout"])
    assert run.stderr == "", "no progress bar when writing to stdout"
    rows = export_rows(run.stdout)
    calls = within(seeded.calls, *EXPORT_BOUNDS)
    check_export(rows, calls)
    # Summed per user, the exported costs are what user_totals() charges.
    per_user: dict[str | None, Decimal] = {}
    for row in rows:
        user = row["user_id"] or None
        per_user[user] = per_user.get(user, Decimal(0)) + Decimal(row["cost_usd"] or 0)
    assert None in per_user and len(per_user) >= 10
    for user, cost in per_user.items():
        assert reader.user_totals(user, *EXPORT_BOUNDS).cost_usd == cost, user


def test_export_to_a_file_shows_progress_on_stderr(cli: CliRuns, seeded: Seeded) -> None:
    run = ok(cli.runs["export-file"])
    assert run.stdout == ""
    rows = export_rows(cli.export_file.read_text(encoding="utf-8"))
    check_export(rows, within(seeded.calls, *EXPORT_BOUNDS))
    assert rows == export_rows(cli.runs["export-stdout"].stdout)
    n = len(rows)
    assert f"exporting [{'#' * 30}] {n:,}/{n:,}" in run.stderr, run.stderr


def test_export_of_one_user(cli: CliRuns, seeded: Seeded) -> None:
    run = ok(cli.runs["export-user"])
    calls = [c for c in within(seeded.calls, *EXPORT_BOUNDS) if c.user_id == EXPORT_USER]
    assert calls
    check_export(export_rows(run.stdout), calls)
    check_export(export_rows(cli.user_export_file.read_text(encoding="utf-8")), calls)


def test_export_of_one_user_to_a_file_shows_its_progress(cli: CliRuns, seeded: Seeded) -> None:
    run = ok(cli.runs["export-user-file"])
    n = sum(1 for c in within(seeded.calls, *EXPORT_BOUNDS) if c.user_id == EXPORT_USER)
    assert f"exporting [{'#' * 30}] {n:,}/{n:,}" in run.stderr, repr(run.stderr)


def test_cli_period_options_match_month_period() -> None:
    # The "iso" period used above is Paris' November; "dates" is UTC's October.
    assert TEXT_PERIODS["iso"][1] == llm_tally.month_period(2026, 11, "Europe/Paris")
    assert TEXT_PERIODS["dates"][1] == llm_tally.month_period(2026, 10, "UTC")


def test_times_outside_the_supported_range_are_refused_by_name(tally: Tally) -> None:
    """Times near datetime's limits would overflow once a month or an offset is added."""
    with pytest.raises(ValueError, match="since must be a time from 0001-01-02 to 9998-12-01"):
        tally.users(since=date(9999, 12, 31))
    with pytest.raises(ValueError, match="until must be a time"):
        tally.user_totals("u", until=datetime(1, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="ts must be a time"):
        tally.record(user_id="u", model="gpt-4o-mini", ts=datetime(9999, 1, 1))
    assert tally.users(since=date(9998, 11, 1)) == []  # the edge itself is fine

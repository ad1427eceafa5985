"""The usage dashboard (``GET {mount}/`` and ``GET {mount}/users/{user_id}``) over real HTTP.

The same seeded store is served by a Starlette app (uvicorn) and a Flask app (werkzeug); the
pages must be identical on both, and every number on them must be what the seeds add up to
and what the Python API answers. The browser tests drive Debian's Chromium with Playwright:
links, charts, keyboard use, and a user id that is a ``<script>`` tag.
"""

from __future__ import annotations

import html
import os
import random
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlparse

import flask
import httpx2
import pytest
from starlette.applications import Starlette

from llm_tally import Tally
from llm_tally.demo.run import ACCOUNTS, CALLS_PER_PLAN
from llm_tally.demo.serve import BackgroundServer
from llm_tally.web import dashboard

from .conftest import serve_wsgi

ANN = "ann@example.com"
BOB = "bob/ops"  # a slash: percent-encoded in links, decoded by both routers
CAROL = "Carol Smith"
XSS = "<script>alert(1)</script>"
EVIL_PLAN = "<img src=x onerror=alert(2)>"
EVIL_MODEL = "<b>gpt-evil</b>"
SINCE = datetime(2026, 10, 1, tzinfo=UTC)
UNTIL = datetime(2026, 11, 1, tzinfo=UTC)
PERIOD = {"since": "2026-10-01", "until": "2026-11-01"}
NANO = Decimal("0.000000001")
FRAMEWORKS = ("asgi", "flask")


# -- the seeded store --------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    user: str | None
    ts: datetime
    model: str
    input: int
    output: int
    cost: Decimal
    plan: str
    feature: str
    status: str
    latency_ms: int


def make_seeds() -> list[Seed]:
    """October 2026 for four users (and a few calls outside any user), plus two calls of Ann
    just outside the period, which no page of the period may count."""
    rng = random.Random(20261101)
    plans: dict[str | None, str] = {ANN: "pro", BOB: "free", CAROL: "pro", XSS: EVIL_PLAN}
    plans[None] = "free"
    counts: dict[str | None, int] = {ANN: 27, BOB: 7, CAROL: 12, XSS: 5, None: 3}
    seeds: list[Seed] = []
    used: set[datetime] = set()
    for user, count in counts.items():
        for i in range(count):
            ts = None
            while ts is None or ts in used:
                ts = datetime(
                    2026,
                    10,
                    rng.randint(1, 31),
                    rng.randint(0, 23),
                    rng.randint(0, 59),
                    rng.randint(0, 59),
                    tzinfo=UTC,
                )
            used.add(ts)
            model = EVIL_MODEL if user == XSS and i == 0 else rng.choice(["gpt-4o", "gpt-4o-mini"])
            seeds.append(
                Seed(
                    user=user,
                    ts=ts,
                    model=model,
                    input=rng.randint(1, 5000),
                    output=rng.randint(1, 900),
                    cost=Decimal(rng.randint(1, 10**8)).scaleb(-9),
                    plan=plans[user],
                    feature=rng.choice(["chat", "summarize", "stream"]),
                    status="error" if rng.random() < 0.1 else "ok",
                    latency_ms=rng.randint(100, 3000),
                )
            )
    for ts in (SINCE - timedelta(seconds=1), UNTIL):
        seeds.append(Seed(ANN, ts, "gpt-4o", 10, 10, Decimal("5"), "pro", "chat", "ok", 100))
    return seeds


SEEDS = make_seeds()
IN_PERIOD = [s for s in SEEDS if SINCE <= s.ts < UNTIL]


def record(tally: Tally, seeds: list[Seed]) -> None:
    for s in seeds:
        tally.record(
            user_id=s.user,
            model=s.model,
            input_tokens=s.input,
            output_tokens=s.output,
            cost_usd=s.cost,
            ts=s.ts,
            properties={"plan": s.plan, "feature": s.feature},
            status=s.status,
            latency_ms=s.latency_ms,
        )
    assert tally.flush(10)


@pytest.fixture
def seeded(tally: Tally) -> Tally:
    record(tally, SEEDS)
    return tally


# -- servers -----------------------------------------------------------------------------------


@contextmanager
def servers(tally: Tally, **init: Any) -> Iterator[dict[str, str]]:
    """The dashboard of ``tally`` on a Starlette app and on a Flask app: framework -> URL."""
    starlette_app = Starlette()
    tally.init_app(starlette_app, **init)
    flask_app = flask.Flask("dashboard_test")
    tally.init_app(flask_app, **init)
    with BackgroundServer(starlette_app) as asgi, serve_wsgi(flask_app) as wsgi:
        yield {"asgi": asgi.url, "flask": wsgi}


def get(url: str, path: str, params: dict[str, str] | None = None, **kw: Any) -> httpx2.Response:
    with httpx2.Client(base_url=url, timeout=15) as client:
        return client.get(path, params=params, **kw)


def page_of(urls: dict[str, str], path: str, params: dict[str, str] | None = None) -> str:
    """The page at ``path``: 200, HTML, and the same bytes from both frameworks."""
    bodies = {}
    for framework, url in urls.items():
        response = get(url, path, params)
        assert response.status_code == 200, (framework, path, response.text[:500])
        assert response.headers["content-type"].startswith("text/html"), framework
        bodies[framework] = response.text
    assert bodies["asgi"] == bodies["flask"], path
    return bodies["asgi"]


def user_path(user_id: str) -> str:
    return f"/llm-usage/users/{quote(user_id, safe='')}"


# -- reading a page ----------------------------------------------------------------------------


class Page(HTMLParser):
    """Tables (body rows of cell texts, and the first link of each row), ``<dl>`` cards and
    the tooltips of the chart bars of a page, by element id."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.heads: dict[str, list[str]] = {}
        self.links: dict[str, list[str | None]] = {}
        self.cards: dict[str, dict[str, str]] = {}
        self.bars: dict[str, list[str]] = {}
        self._table: str | None = None
        self._in_head = False
        self._row: list[str] | None = None
        self._row_link: str | None = None
        self._text: list[str] | None = None
        self._dl: str | None = None
        self._dt = ""
        self._svg: str | None = None
        self._bar = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table], self.links[self._table] = [], []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and self._table is not None:
            self._row, self._row_link = [], None
        elif tag in ("th", "td") and self._row is not None:
            self._text = []
        elif tag == "a" and self._row is not None and self._row_link is None:
            self._row_link = a.get("href")
        elif tag == "dl":
            self._dl = a.get("id") or ""
            self.cards[self._dl] = {}
        elif tag in ("dt", "dd") and self._dl is not None:
            self._text = []
        elif tag == "svg":
            self._svg = a.get("id") or ""
            self.bars[self._svg] = []
        elif tag == "rect" and "bar" in (a.get("class") or "").split():
            self._bar = True
        elif tag == "title" and self._bar:
            self._text = []

    def _take(self) -> str:
        text = " ".join("".join(self._text or []).split())
        self._text = None
        return text

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._row is not None and self._text is not None:
            self._row.append(self._take())
        elif tag == "tr" and self._row is not None and self._table is not None:
            if self._in_head:
                self.heads[self._table] = self._row
            else:
                self.tables[self._table].append(self._row)
                self.links[self._table].append(self._row_link)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "dt" and self._dl is not None:
            self._dt = self._take()
        elif tag == "dd" and self._dl is not None:
            self.cards[self._dl][self._dt] = self._take()
        elif tag == "dl":
            self._dl = None
        elif tag == "title" and self._bar and self._svg is not None:
            self.bars[self._svg].append(self._take())
        elif tag == "rect":
            self._bar = False
        elif tag == "svg":
            self._svg = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def usd(text: str) -> Decimal:
    assert re.fullmatch(r"\$\d+\.\d{2,9}", text), text
    return Decimal(text[1:])


def num(text: str) -> int:
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", text), text
    return int(text.replace(",", ""))


def minute(moment: datetime | None) -> str:
    assert moment is not None
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M}"


def error_of(body: str) -> str:
    match = re.search(r'<p id="error" role="alert">(.*?)</p>', body, re.S)
    assert match, body[:500]
    return html.unescape(match.group(1))


# -- what the seeds add up to ------------------------------------------------------------------


@dataclass
class Sums:
    requests: int = 0
    errors: int = 0
    input: int = 0
    output: int = 0
    cost: Decimal = Decimal(0)
    first: datetime | None = None
    last: datetime | None = None

    def add(self, s: Seed) -> None:
        self.requests += 1
        self.errors += s.status != "ok"
        self.input += s.input
        self.output += s.output
        self.cost += s.cost
        self.first = s.ts if self.first is None else min(self.first, s.ts)
        self.last = s.ts if self.last is None else max(self.last, s.ts)


def per_user(seeds: list[Seed]) -> dict[str, Sums]:
    sums: dict[str, Sums] = defaultdict(Sums)
    for s in seeds:
        if s.user is not None:
            sums[s.user].add(s)
    return dict(sums)


def ordered(sums: dict[str, Sums], order_by: str) -> list[str]:
    """User ids as ``tally.users(order_by=...)`` orders them: largest first, ties by id."""
    keys = {
        "cost": lambda u: sums[u].cost,
        "requests": lambda u: sums[u].requests,
        "tokens": lambda u: sums[u].input + sums[u].output,
        "last_seen": lambda u: sums[u].last,
    }
    return sorted(sorted(sums), key=keys[order_by], reverse=True)


def user_row(user: str, s: Sums) -> list[str]:
    return [
        user,
        f"{s.requests:,}",
        f"{s.errors:,}",
        f"{s.input:,}",
        f"{s.output:,}",
        f"{s.input + s.output:,}",
        dashboard.usd(s.cost),
        minute(s.first),
        minute(s.last),
    ]


def ratio(amount: Decimal, count: int) -> Decimal:
    return (amount / count).quantize(NANO, rounding=ROUND_HALF_EVEN)


# -- HTTP: numbers -----------------------------------------------------------------------------


def test_users_page_adds_up_the_seeds_like_the_python_api_on_both_frameworks(
    seeded: Tally,
) -> None:
    sums = per_user(IN_PERIOD)
    with servers(seeded) as urls:
        body = page_of(urls, "/llm-usage/", PERIOD)
        anomalies = page_of(urls, "/llm-usage/anomalies", PERIOD)
    page = Page(body)

    totals = page.cards["totals"]
    assert num(totals["Requests"]) == len(IN_PERIOD) == seeded.count_records(SINCE, UNTIL)
    assert num(totals["Users"]) == len(sums) == seeded.count_users(SINCE, UNTIL) == 4
    assert num(totals["Errors"]) == sum(s.status != "ok" for s in IN_PERIOD)
    assert num(totals["Input tokens"]) == sum(s.input for s in IN_PERIOD)
    assert num(totals["Output tokens"]) == sum(s.output for s in IN_PERIOD)
    assert usd(totals["Cost"]) == sum((s.cost for s in IN_PERIOD), Decimal(0))
    anonymous = [s for s in IN_PERIOD if s.user is None]
    cost = dashboard.usd(sum((s.cost for s in anonymous), Decimal(0)))
    assert f"Includes {len(anonymous)} calls made outside any user ({cost})" in body

    # The table: the seeds' sums, in the Python API's order, with the API's numbers.
    api_rows = seeded.users(SINCE, UNTIL, order_by="cost")
    assert page.tables["users"] == [user_row(u, sums[u]) for u in ordered(sums, "cost")]
    assert [row[0] for row in page.tables["users"]] == [u.user_id for u in api_rows]
    for row, api in zip(page.tables["users"], api_rows, strict=True):
        assert (num(row[1]), num(row[2])) == (api.requests, api.errors)
        assert usd(row[6]) == api.cost_usd
        assert (row[7], row[8]) == (minute(api.first_seen), minute(api.last_seen))
    # Each user links to their page (relative link), the id percent-encoded, the period kept.
    query = urlencode(PERIOD)
    assert page.links["users"] == [
        f"users/{quote(u.user_id or '', safe='')}?{query}" for u in api_rows
    ]
    assert f'href="users/bob%2Fops?{html.escape(query)}"' in body

    # The plan and feature breakdowns: every call of the period, anonymous ones included.
    for dimension in ("plan", "feature"):
        groups: dict[str, list[Seed]] = defaultdict(list)
        for s in IN_PERIOD:
            groups[getattr(s, dimension)].append(s)
        want = []
        for value, calls in groups.items():
            users = len({s.user for s in calls if s.user is not None})
            cost = sum((s.cost for s in calls), Decimal(0))
            want.append((value, users, len(calls), cost))
        want.sort(key=lambda g: g[0])
        want.sort(key=lambda g: g[3], reverse=True)
        rows = page.tables[f"by-{dimension}"]
        assert [(r[0], num(r[1]), num(r[2]), usd(r[3])) for r in rows] == want
        for row, group in zip(rows, seeded.totals_by(dimension, SINCE, UNTIL), strict=True):
            assert row[0] == group.value
            assert usd(row[4]) == group.avg_cost_per_user == ratio(group.cost_usd, group.users)
            assert usd(row[5]) == group.avg_cost_per_request

    # The costliest (model, feature) pairs.
    pairs: dict[tuple[str, str], list[Seed]] = defaultdict(list)
    for s in IN_PERIOD:
        pairs[(s.model, s.feature)].append(s)
    want_pairs = sorted(
        (
            (model, feature, len(calls), sum((s.cost for s in calls), Decimal(0)))
            for (model, feature), calls in pairs.items()
        ),
        key=lambda p: (-p[3], p[0], p[1]),
    )[:10]
    rows = page.tables["pairs"]
    assert [(r[0], r[1], num(r[2]), usd(r[3])) for r in rows] == want_pairs
    api_pairs = seeded.expensive_pairs("feature", SINCE, UNTIL, limit=10)
    assert [usd(r[4]) for r in rows] == [p.avg_cost_per_request for p in api_pairs]
    # Anomalies have their own page, linked from this one with the same period.
    link = html.escape(f"anomalies?{urlencode(PERIOD)}")
    assert f'<a id="anomalies-link" href="{link}">' in body
    assert "No anomaly in the last hour or the last day." in anomalies


@pytest.mark.parametrize("order_by", ["cost", "requests", "tokens", "last_seen"])
def test_users_page_sorts_pages_and_links_every_order(seeded: Tally, order_by: str) -> None:
    sums = per_user(IN_PERIOD)
    want = ordered(sums, order_by)
    with servers(seeded) as urls:
        page = Page(page_of(urls, "/llm-usage/", {**PERIOD, "order_by": order_by}))
        assert [row[0] for row in page.tables["users"]] == want
        api = seeded.users(SINCE, UNTIL, order_by=order_by)  # type: ignore[arg-type]
        assert [u.user_id for u in api] == want
        head = page.heads["users"]
        assert sum(cell.endswith("▼") for cell in head) == 1
        second = Page(page_of(urls, "/llm-usage/", {**PERIOD, "order_by": order_by, "limit": "2"}))
        assert [row[0] for row in second.tables["users"]] == want[:2]
        third = Page(
            page_of(
                urls,
                "/llm-usage/",
                {**PERIOD, "order_by": order_by, "limit": "2", "offset": "3"},
            )
        )
        assert [row[0] for row in third.tables["users"]] == want[3:5]


def test_users_page_filters_by_user_id_and_by_property(seeded: Tally) -> None:
    with servers(seeded) as urls:
        # Part of a user id, any case; the totals are the matching users'.
        page = Page(page_of(urls, "/llm-usage/", {**PERIOD, "q": "EXAMPLE.c"}))
        sums = per_user([s for s in IN_PERIOD if s.user == ANN])
        assert page.tables["users"] == [user_row(ANN, sums[ANN])]
        assert num(page.cards["totals"]["Requests"]) == sums[ANN].requests
        assert usd(page.cards["totals"]["Cost"]) == sums[ANN].cost
        assert usd(page.cards["totals"]["Cost"]) == seeded.user_totals(ANN, SINCE, UNTIL).cost_usd
        nobody = page_of(urls, "/llm-usage/", {**PERIOD, "q": "zzz"})
        assert 'id="no-users"' in nobody and num(Page(nobody).cards["totals"]["Users"]) == 0

        # plan=pro counts only the calls that carried it (Ann's two calls outside the period
        # do not count), and the users table is the same for any order.
        pro = [s for s in IN_PERIOD if s.plan == "pro"]
        sums = per_user(pro)
        for order_by in ("cost", "requests", "tokens", "last_seen"):
            params = {**PERIOD, "property": "plan", "value": "pro", "order_by": order_by}
            page = Page(page_of(urls, "/llm-usage/", params))
            assert page.tables["users"] == [user_row(u, sums[u]) for u in ordered(sums, order_by)]
        assert num(page.cards["totals"]["Requests"]) == len(pro)
        assert usd(page.cards["totals"]["Cost"]) == sum((s.cost for s in pro), Decimal(0))

        # A property value with HTML in it, combined with a user id search.
        params = {**PERIOD, "property": "plan", "value": EVIL_PLAN, "q": "script"}
        body = page_of(urls, "/llm-usage/", params)
        sums = per_user([s for s in IN_PERIOD if s.plan == EVIL_PLAN])
        assert Page(body).tables["users"] == [user_row(XSS, sums[XSS])]
        assert EVIL_PLAN not in body and html.escape(EVIL_PLAN) in body


def test_user_page_shows_the_users_totals_charts_models_and_last_calls(seeded: Tally) -> None:
    with servers(seeded) as urls:
        for user in (ANN, BOB, CAROL, XSS):
            body = page_of(urls, user_path(user), PERIOD)
            page = Page(body)
            calls = [s for s in IN_PERIOD if s.user == user]
            sums = per_user(calls)[user]
            api = seeded.user_totals(user, SINCE, UNTIL)
            cards = page.cards["user-totals"]
            assert num(cards["Requests"]) == sums.requests == api.requests
            assert num(cards["Errors"]) == sums.errors == api.errors
            assert num(cards["Input tokens"]) == sums.input == api.input_tokens
            assert num(cards["Output tokens"]) == sums.output == api.output_tokens
            assert usd(cards["Cost"]) == sums.cost == api.cost_usd
            assert cards["First seen"] == minute(sums.first) == minute(api.first_seen)
            assert cards["Last seen"] == minute(sums.last) == minute(api.last_seen)

            # Daily charts: one bar per day with calls, its tooltip the day's exact figures.
            days: dict[date, list[Seed]] = defaultdict(list)
            for s in calls:
                days[s.ts.date()].append(s)
            plural = {1: "request"}
            assert page.bars["chart-requests"] == [
                f"{day}: {len(group)} {plural.get(len(group), 'requests')}"
                for day, group in sorted(days.items())
            ]
            assert page.bars["chart-cost"] == [
                f"{day}: {dashboard.usd(sum((s.cost for s in group), Decimal(0)))}"
                for day, group in sorted(days.items())
            ]
            api_days = seeded.user_daily(user, SINCE, UNTIL)
            assert [d.day for d in api_days] == sorted(days)
            assert [num(r[1]) for r in page.tables["daily"]] == [d.requests for d in api_days]

            # By model, most expensive first.
            models: dict[str, Sums] = defaultdict(Sums)
            for s in calls:
                models[s.model].add(s)
            want_models = sorted(sorted(models), key=lambda m: models[m].cost, reverse=True)
            assert page.tables["by-model"] == [
                [
                    m,
                    f"{models[m].requests:,}",
                    f"{models[m].input:,}",
                    f"{models[m].output:,}",
                    dashboard.usd(models[m].cost),
                ]
                for m in want_models
            ]
            assert [r[0] for r in page.tables["by-model"]] == [
                m.model for m in seeded.user_by_model(user, SINCE, UNTIL)
            ]

            # The last 20 calls of the period, newest first, with what they used and cost.
            recent = sorted(calls, key=lambda s: s.ts, reverse=True)[:20]
            assert page.tables["recent"] == [
                [
                    f"{s.ts:%Y-%m-%d %H:%M:%S}",
                    s.model,
                    "manual",
                    s.status,
                    f"{s.input:,}",
                    f"{s.output:,}",
                    dashboard.usd(s.cost),
                    f"{s.latency_ms} ms",
                    f"feature={s.feature}, plan={s.plan}",
                ]
                for s in recent
            ]
            activity = page.cards["activity"]
            assert num(activity["Active days"]) == len(days)
            errors = Decimal(sums.errors) / sums.requests * 100
            assert Decimal(activity["Error rate"].removesuffix(" %")) == errors.quantize(
                Decimal("0.01"), rounding=ROUND_HALF_EVEN
            )
            back = f"../?{html.escape(urlencode(PERIOD))}"
            assert f'href="{back}">← All users' in body
        assert len([s for s in IN_PERIOD if s.user == ANN]) > 20

        stranger = Page(page_of(urls, user_path("nobody"), PERIOD))
        assert num(stranger.cards["user-totals"]["Requests"]) == 0
        assert "chart-requests" not in stranger.bars and stranger.tables == {}


def test_charts_cover_every_day_of_a_preset(tally: Tally) -> None:
    now = datetime(2026, 11, 15, 12, tzinfo=UTC)
    for day, count in ((1, 2), (9, 1), (15, 3)):
        for i in range(count):
            ts = datetime(2026, 11, day, 8, i, tzinfo=UTC)
            tally.record(user_id="pat", model="gpt-4o", output_tokens=1, cost_usd="0.25", ts=ts)
    assert tally.flush(10)
    body = dashboard.user_page_html(tally, "pat", {"period": "month"}, now=now)
    svg = re.search(r'<svg id="chart-requests".*?</svg>', body, re.S)
    assert svg is not None
    # 15 days from November 1st to today, bars on the three days with calls.
    assert ">2026-11-01</text>" in svg.group(0) and ">2026-11-15</text>" in svg.group(0)
    assert Page(body).bars["chart-requests"] == [
        "2026-11-01: 2 requests",
        "2026-11-09: 1 request",
        "2026-11-15: 3 requests",
    ]
    widths = {
        float(w)
        for w in re.findall(r'class="bar" x="[\d.]+" y="[\d.]+" width="([\d.]+)"', svg.group(0))
    }
    assert len(widths) == 1 and widths.pop() == pytest.approx((720 - 96 - 10) / 15 * 0.8, abs=0.01)
    heights = [float(h) for h in re.findall(r'height="([\d.]+)"><title>', svg.group(0))]
    assert heights == pytest.approx([2 / 3 * 176, 1 / 3 * 176, 176], abs=0.01)
    assert Page(body).bars["chart-cost"] == [
        "2026-11-01: $0.50",
        "2026-11-09: $0.25",
        "2026-11-15: $0.75",
    ]


def test_period_presets_and_dates(tally: Tally) -> None:
    now = datetime(2026, 11, 15, 12, tzinfo=UTC)
    moments = [
        datetime(2026, 11, 15, 11, tzinfo=UTC),  # today
        datetime(2026, 11, 9, tzinfo=UTC),  # first day of the last 7
        datetime(2026, 11, 8, 23, 59, tzinfo=UTC),  # this month, not the last 7 days
        datetime(2026, 10, 17, tzinfo=UTC),  # first day of the last 30
        datetime(2026, 10, 16, 23, 59, tzinfo=UTC),  # only "all"
    ]
    for ts in moments:
        tally.record(user_id="pat", model="gpt-4o", output_tokens=1, cost_usd="1", ts=ts)
    assert tally.flush(10)

    def requests(params: dict[str, str]) -> int:
        page = Page(dashboard.users_page_html(tally, params, now=now))
        return num(page.cards["totals"]["Requests"])

    assert requests({}) == requests({"period": "month"}) == 3
    assert requests({"period": "7d"}) == 2
    assert requests({"period": "30d"}) == 4
    assert requests({"period": "all"}) == 5
    # Dates replace the preset; until is excluded.
    assert requests({"period": "7d", "since": "2026-10-16"}) == 5
    assert requests({"since": "2026-10-17", "until": "2026-11-09"}) == 2
    assert requests({"until": "2026-11-08T23:59:00Z"}) == 2
    body = dashboard.users_page_html(tally, {"period": "7d"}, now=now)
    assert "Period: Last 7 days: from 2026-11-09 to now" in body
    assert '<a href="./?period=7d" aria-current="true">Last 7 days</a>' in body


# -- HTTP: escaping, access, bad parameters ----------------------------------------------------


def test_html_in_user_ids_properties_models_and_parameters_is_shown_as_text(
    seeded: Tally,
) -> None:
    with servers(seeded) as urls:
        pages = {
            "users": page_of(urls, "/llm-usage/", PERIOD),
            "user": page_of(urls, user_path(XSS), PERIOD),
            "search": page_of(urls, "/llm-usage/", {"q": "<script>alert(3)</script>"}),
        }
        for framework, url in urls.items():
            bad = get(url, "/llm-usage/", {"since": "<script>alert(4)</script>"})
            assert bad.status_code == 400, framework
            pages[f"error-{framework}"] = bad.text
    for name, body in pages.items():
        assert "<script" not in body.lower(), name
        assert "<img" not in body and "<b>" not in body, name
    escaped = html.escape(XSS)
    assert pages["users"].count(escaped) == 1
    assert html.escape(EVIL_PLAN) in pages["users"]  # in the plan breakdown
    assert html.escape(EVIL_MODEL) in pages["users"]  # in the costliest pairs
    assert f'User <span class="uid">{escaped}</span>' in pages["user"]
    assert f"{html.escape(EVIL_PLAN)}" in pages["user"]  # in the recent calls
    assert html.escape(EVIL_MODEL) in pages["user"]  # by model and recent calls
    assert XSS in [row[0] for row in Page(pages["users"]).tables["users"]]  # the id, intact
    assert 'value="&lt;script&gt;alert(3)&lt;/script&gt;"' in pages["search"]
    assert html.escape("'<script>alert(4)</script>'") in pages["error-asgi"]
    assert pages["error-asgi"] == pages["error-flask"]


def test_anomalies_panel_lists_the_python_apis_anomalies(tally: Tally) -> None:
    spiky = "spiky <u>user</u>"
    now = datetime.now(UTC)
    for i in range(30):
        ts = now - timedelta(minutes=1 + i)
        tally.record(user_id=spiky, model="gpt-4o", output_tokens=1, cost_usd="0.002", ts=ts)
    assert tally.flush(10)
    with servers(tally) as urls:
        page = Page(page_of(urls, "/llm-usage/anomalies", {"period": "all"}))
    want = [(w, a) for w in ("hour", "day") for a in tally.anomalies(w)]  # type: ignore[arg-type]
    assert len(want) == 4  # requests and cost, in the last hour and the last day
    assert page.tables["anomalies"] == [
        [
            spiky,
            f"last {window}",
            a.metric,
            "own history",
            f"{a.score:f}",
            a.reason,
        ]
        for window, a in want
    ]
    assert set(page.links["anomalies"]) == {f"users/{quote(spiky, safe='')}?period=all"}


def test_links_resolve_wherever_the_endpoint_is_mounted(seeded: Tally) -> None:
    with servers(seeded, mount_path="/admin/usage") as urls:
        for framework, url in urls.items():
            home = f"{url}/admin/usage/?{urlencode(PERIOD)}"
            response = get(url, home)
            assert response.status_code == 200, framework
            links = Page(response.text).links["users"]
            assert len(links) == 4
            for link, user in zip(links, ordered(per_user(IN_PERIOD), "cost"), strict=True):
                assert link is not None
                target = urljoin(home, link)
                assert urlparse(target).path == f"/admin/usage/users/{quote(user, safe='')}"
                detail = get(url, target)
                assert detail.status_code == 200, (framework, target)
                assert f'User <span class="uid">{html.escape(user)}</span>' in detail.text
                back = re.search(r'<a href="([^"]*)">← All users</a>', detail.text)
                assert back is not None
                assert urljoin(target, html.unescape(back.group(1))) == home
            api = re.search(r'<a href="([^"]*)">api/users</a>', response.text)
            assert api is not None
            listed = get(url, urljoin(home, api.group(1)))
            assert listed.status_code == 200 and listed.json()["total"] == 4


def test_pages_answer_403_to_proxied_clients_and_follow_authorize(seeded: Tally) -> None:
    paths = ("/llm-usage/", user_path(ANN))
    with servers(seeded) as urls:
        for framework, url in urls.items():
            for path in paths:
                for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                    denied = get(url, path, headers={header: "198.51.100.7"})
                    assert denied.status_code == 403, (framework, path, header)
                    assert "authorize" in denied.json()["error"]
    with servers(seeded, authorize=lambda request: request.headers.get("x-admin") == "yes") as urls:
        for framework, url in urls.items():
            for path in paths:
                assert get(url, path).status_code == 403, (framework, path)
                admin = {"x-admin": "yes", "X-Forwarded-For": "198.51.100.7"}
                allowed = get(url, path, headers=admin)
                assert allowed.status_code == 200, (framework, path)
                assert "text/html" in allowed.headers["content-type"]


BAD_USERS_PAGE = [
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01"}, "until"),
    ({"since": "2026-11-02", "until": "2026-11-01"}, "until"),
    ({"period": "year"}, "period"),
    ({"order_by": "money"}, "order_by"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"property": "plan"}, "value"),
    ({"value": "pro"}, "property"),
    ({"property": "p" * 65, "value": "x"}, "property"),
]


def test_bad_parameters_answer_400_naming_the_parameter(seeded: Tally) -> None:
    cases = [("/llm-usage/", params, name) for params, name in BAD_USERS_PAGE]
    cases += [
        (user_path("u" * 257), {}, "user_id"),
        (user_path(ANN), {"period": "week"}, "period"),
        (user_path(ANN), {"since": "2026-02-30"}, "since"),
    ]
    with servers(seeded) as urls:
        for path, params, name in cases:
            bodies = []
            for framework, url in urls.items():
                response = get(url, path, params)
                assert response.status_code == 400, (framework, path, params)
                assert response.headers["content-type"].startswith("text/html")
                assert error_of(response.text).startswith(name), (framework, params)
                bodies.append(response.text)
            assert bodies[0] == bodies[1]


@pytest.mark.postgres
def test_pages_on_postgres_add_up_the_seeds(pg_url: str) -> None:
    with Tally(pg_url) as tally:
        record(tally, SEEDS)
        with servers(tally) as urls:
            sums = per_user(IN_PERIOD)
            page = Page(page_of(urls, "/llm-usage/", PERIOD))
            assert page.tables["users"] == [user_row(u, sums[u]) for u in ordered(sums, "cost")]
            pro = per_user([s for s in IN_PERIOD if s.plan == "pro"])
            params = {**PERIOD, "property": "plan", "value": "pro"}
            page = Page(page_of(urls, "/llm-usage/", params))
            assert page.tables["users"] == [user_row(u, pro[u]) for u in ordered(pro, "cost")]
            page = Page(page_of(urls, user_path(BOB), PERIOD))
            assert usd(page.cards["user-totals"]["Cost"]) == sums[BOB].cost
            calls = sorted((s for s in IN_PERIOD if s.user == BOB), key=lambda s: s.ts)
            assert [row[0] for row in page.tables["recent"]] == [
                f"{s.ts:%Y-%m-%d %H:%M:%S}" for s in reversed(calls)
            ]


# -- the browser -------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def dialogs() -> list[str]:
    """The message of every dialog (alert, confirm...) a page opened."""
    return []


@pytest.fixture
def page(browser: Any, dialogs: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()

    def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    opened.on("dialog", dismiss)
    yield opened
    context.close()


def at_path(path: str) -> Any:
    """A ``wait_for_url`` predicate: the page's URL has exactly this path."""
    return lambda url: urlparse(url).path == path


@needs_chromium
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_browser_user_link_opens_the_user_page_with_its_bar_charts(
    seeded: Tally, page: Any, dialogs: list[str], framework: str
) -> None:
    ann_days: dict[date, int] = defaultdict(int)
    for s in IN_PERIOD:
        if s.user == ANN:
            ann_days[s.ts.date()] += 1
    with servers(seeded) as urls:
        page.goto(f"{urls[framework]}/llm-usage/?{urlencode(PERIOD)}")
        assert page.title() == "Usage by user · llm-tally"
        rows = page.locator("#users tbody tr")
        assert rows.count() == 4
        link = page.locator("#users tbody tr", has_text=ANN).get_by_role("link", name=ANN)
        link.click()
        page.wait_for_url(at_path(user_path(ANN)))
        assert page.locator("h1").inner_text() == f"User {ANN}"

        chart = page.locator("#chart-requests")
        box = chart.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 80
        bars = page.locator("#chart-requests rect.bar")
        assert bars.count() == len(ann_days)
        heights = {}
        for i in range(bars.count()):
            bar = bars.nth(i).bounding_box()
            assert bar is not None and bar["width"] > 0 and bar["height"] > 0, i
            assert box["x"] <= bar["x"] and bar["x"] + bar["width"] <= box["x"] + box["width"]
            assert box["y"] <= bar["y"] and bar["y"] + bar["height"] <= box["y"] + box["height"]
            day = date.fromisoformat(bars.nth(i).locator("title").text_content()[:10])
            heights[day] = bar["height"]
        assert sorted(heights) == sorted(ann_days)
        # Heights proportional to the day's requests.
        tallest, highest = max(ann_days.values()), max(heights.values())
        for day, count in ann_days.items():
            assert heights[day] == pytest.approx(highest * count / tallest, abs=1.0), day
        assert page.locator("#chart-cost rect.bar").count() == len(ann_days)
        assert page.locator("#recent tbody tr").count() == 20
    assert dialogs == []


@needs_chromium
def test_browser_shows_a_script_user_id_as_text_and_runs_nothing(
    seeded: Tally, page: Any, dialogs: list[str]
) -> None:
    with servers(seeded) as urls:
        page.goto(f"{urls['asgi']}/llm-usage/?{urlencode(PERIOD)}")
        link = page.locator("#users a.user-link", has_text="alert(1)")
        assert link.inner_text() == XSS
        assert page.locator("#by-plan").inner_text().count(EVIL_PLAN) == 1
        link.click()
        page.wait_for_url(at_path(user_path(XSS)))
        assert page.locator("h1").inner_text() == f"User {XSS}"
        assert EVIL_MODEL in page.locator("#by-model").inner_text()
        assert page.evaluate("document.querySelectorAll('script, img, b').length") == 0
        page.goto(f"{urls['flask']}{user_path(XSS)}?q={quote(XSS)}")
        assert page.locator("h1").inner_text() == f"User {XSS}"
    assert dialogs == []


@needs_chromium
def test_browser_keyboard_reaches_and_opens_the_first_user(
    seeded: Tally, page: Any, dialogs: list[str]
) -> None:
    first = ordered(per_user(IN_PERIOD), "cost")[0]
    with servers(seeded) as urls:
        page.goto(f"{urls['asgi']}/llm-usage/?{urlencode(PERIOD)}")
        page.keyboard.press("Tab")
        active = "document.activeElement"
        assert page.evaluate(f"{active}.textContent") == "Skip to main content"
        skip = page.locator("a.skip").bounding_box()
        assert skip is not None and skip["x"] >= 0  # shown while focused
        page.keyboard.press("Enter")
        assert page.evaluate(f"{active}.id") == "main"
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate(f"{active}.classList.contains('user-link')"):
                break
        else:
            pytest.fail("Tab never reached a user link")
        assert page.evaluate(f"{active}.textContent") == first
        style = page.evaluate(
            f"[getComputedStyle({active}).outlineStyle, getComputedStyle({active}).outlineWidth]"
        )
        assert style == ["solid", "3px"]  # a visible focus ring
        page.keyboard.press("Enter")
        page.wait_for_url(at_path(user_path(first)))
        assert page.locator("h1").inner_text() == f"User {first}"
        # The filter form works from the keyboard too: labelled fields, a real button.
        page.get_by_label("From").fill("2026-10-20")
        page.get_by_label("Until (excluded)").fill("2026-11-01")
        for _ in range(5):  # past the date field's own parts (month, day, year)
            page.keyboard.press("Tab")
            if page.evaluate(f"{active}.tagName") == "BUTTON":
                break
        assert page.evaluate(f"{active}.textContent") == "Apply"
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: "since=2026-10-20" in url)
        start = datetime(2026, 10, 20, tzinfo=UTC)
        calls = [s for s in IN_PERIOD if s.user == first and s.ts >= start]
        assert page.locator("#user-totals dd").first.inner_text() == dashboard.usd(
            sum((s.cost for s in calls), Decimal(0))
        )
    assert dialogs == []


@needs_chromium
def test_browser_screenshots_of_a_demo_store(tmp_path: Path, page: Any, dialogs: list[str]) -> None:
    """The demo's own traffic (``llm-tally demo --once``) plus 30 days of history like it.

    ``LLM_TALLY_SCREENSHOTS=docs pytest tests/test_dashboard.py -k screenshots`` refreshes
    docs/dashboard-users.png, docs/dashboard-anomalies.png and docs/dashboard-user.png.
    """
    out = Path(os.environ.get("LLM_TALLY_SCREENSHOTS") or tmp_path)
    url = f"sqlite:///{tmp_path}/demo.db"
    subprocess.run(
        [sys.executable, "-m", "llm_tally", "demo", "--database-url", url, "--port", "0", "--once"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    rng = random.Random(7)
    now = datetime.now(UTC).replace(microsecond=0)
    with Tally(url) as tally:
        for day in range(1, 30):
            for user_id, plan in ACCOUNTS.values():
                for _ in range(rng.randint(0, CALLS_PER_PLAN[plan])):
                    feature = rng.choice(["chat", "chat", "summarize", "stream"])
                    tally.record(
                        user_id=user_id,
                        model="gpt-4o-mini" if feature == "chat" else "gpt-4o",
                        input_tokens=rng.randint(20, 2000),
                        output_tokens=rng.randint(10, 400),
                        properties={"plan": plan, "feature": feature},
                        ts=now - timedelta(days=day, minutes=rng.randint(0, 600)),
                        latency_ms=rng.randint(200, 3000),
                    )
        # Dave's script runs away: 40 calls in the last hour, an anomaly.
        for i in range(40):
            tally.record(
                user_id="dave@example.com",
                model="gpt-4o",
                input_tokens=3000,
                output_tokens=600,
                properties={"plan": "enterprise", "feature": "summarize"},
                ts=now - timedelta(minutes=i + 1),
                latency_ms=1500,
            )
        assert tally.flush(10)
        app = Starlette()
        tally.init_app(app)
        with BackgroundServer(app) as server:
            page.goto(f"{server.url}/llm-usage/?period=30d")
            assert page.locator("#users tbody tr").count() == 4
            page.screenshot(path=str(out / "dashboard-users.png"), full_page=True)
            page.get_by_role("link", name="Anomalies").first.click()
            page.wait_for_url(at_path("/llm-usage/anomalies"))
            assert page.locator("#anomalies tbody tr").count() > 0
            page.screenshot(path=str(out / "dashboard-anomalies.png"), full_page=True)
            page.go_back()
            page.get_by_role("link", name="dave@example.com").first.click()
            page.wait_for_url(at_path(user_path("dave@example.com")))
            assert page.locator("#chart-requests rect.bar").count() >= 20
            page.screenshot(path=str(out / "dashboard-user.png"), full_page=True)
    for name in ("dashboard-users.png", "dashboard-anomalies.png", "dashboard-user.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, name
        assert int.from_bytes(data[16:20], "big") == 1280  # the laptop-wide viewport
    assert dialogs == []

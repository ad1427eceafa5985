"""Reliability: a record is stored once however often it is written, and health is visible."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx2
import pytest
from flask import Flask
from sqlalchemy import text
from starlette.applications import Starlette

from llm_tally import Tally
from llm_tally._record import CallRecord, new_record_id
from llm_tally.demo.serve import BackgroundServer
from llm_tally.storage.schema import upgrade_store

from .conftest import serve_wsgi


def a_record(user_id: str, ts: datetime, cost_nano: int) -> CallRecord:
    return CallRecord(
        id=new_record_id(),
        ts_us=int(ts.timestamp() * 1_000_000),
        user_id=user_id,
        properties={"plan": "pro"},
        provider="openai",
        operation="chat",
        request_model="gpt-4o-mini",
        input_tokens=10,
        output_tokens=5,
        cost_nano_usd=cost_nano,
        cost_source="given",
        usage_source="manual",
    )


def test_a_record_written_twice_is_stored_and_counted_once(store_url: str) -> None:
    when = datetime(2026, 11, 5, 10, 30, tzinfo=UTC)
    first, second = a_record("u1", when, 1_000), a_record("u1", when, 2_000)
    with Tally(store_url, instrument=False) as tally:
        for _ in range(3):
            # A retry after a lost commit reply, or a journal replay: the same id again.
            tally.submit(first)
            assert tally.flush(timeout=10)
        tally.submit(second)
        assert tally.flush(timeout=10)
        assert tally.count_records() == 2
        assert tally.stats()["write_errors"] == 0
        # Every reading path agrees: a whole month (monthly rollups), an hour, raw minutes.
        month = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
        hour = (datetime(2026, 11, 5, 10, tzinfo=UTC), datetime(2026, 11, 5, 11, tzinfo=UTC))
        minutes = (
            datetime(2026, 11, 5, 10, 29, tzinfo=UTC),
            datetime(2026, 11, 5, 10, 31, tzinfo=UTC),
        )
        for period in (month, hour, minutes):
            totals = tally.user_totals("u1", *period)
            assert (totals.requests, totals.input_tokens) == (2, 20)
            assert totals.cost_usd * 10**9 == 3_000
        [plan] = tally.totals_by("plan", *month)
        assert (plan.value, plan.users, plan.requests) == ("pro", 1, 2)


def test_health_is_ok_then_degraded_while_the_store_fails(db_url: str) -> None:
    with Tally(db_url, instrument=False, flush_interval=0.01) as tally:
        tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
        assert tally.flush(timeout=10)
        health = tally.health()
        assert health["status"] == "ok"
        assert health["written"] == 1 and health["dropped"] == 0
        assert health["store_error"] is None and health["last_write_at"] is not None
        assert health["queue_depth"] == 0 and health["max_queue"] == 100_000
        with tally.engine.begin() as conn:
            conn.execute(text("DROP TABLE llm_tally_usage"))
        tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
        deadline = time.monotonic() + 10
        while tally.stats()["write_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        health = tally.health()
        assert health["status"] == "degraded"
        assert "llm_tally_usage" in health["last_write_error"]
        assert health["queue_depth"] + health["written"] >= 1
        upgrade_store(tally.engine)  # the store comes back: the record arrives
        assert tally.flush(timeout=10)
        assert tally.health()["status"] == "ok"
        assert tally.count_records() == 1


@pytest.fixture
def served(tally: Tally) -> Iterator[dict[str, str]]:
    """The same Tally's /llm-usage on a real uvicorn (Starlette) and a real werkzeug (Flask)."""
    starlette_app = Starlette()
    tally.init_app(starlette_app)
    flask_app = Flask(__name__)
    tally.init_app(flask_app)
    server = BackgroundServer(starlette_app).start()
    try:
        with serve_wsgi(flask_app) as flask_url:
            yield {"starlette": server.url, "flask": flask_url}
    finally:
        server.stop()


def get_json(url: str, **headers: str) -> tuple[int, Any]:
    response = httpx2.get(url, headers=headers, timeout=10)
    return response.status_code, response.json()


def test_health_endpoint_on_both_frameworks(tally: Tally, served: dict[str, str]) -> None:
    tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
    assert tally.flush(timeout=10)
    for base in served.values():
        status, body = get_json(f"{base}/llm-usage/api/health")
        assert status == 200
        assert body["status"] == "ok" and body["written"] == 1
        assert {"queue_depth", "dropped", "last_write_error", "rollup_backlog"} <= body.keys()
        # Like every route but /api/me, not for clients behind a proxy by default.
        status, body = get_json(f"{base}/llm-usage/api/health", **{"X-Forwarded-For": "1.2.3.4"})
        assert status == 403


# -- retention ---------------------------------------------------------------------------------


def seed_months(tally: Tally) -> list[tuple[str, datetime, int]]:
    """Calls in Sep, Oct and Nov 2026, on month and hour edges; stored out of time order
    (the last one stored is the oldest), so the newest rowid is a pruned call."""
    calls = [
        ("ann", datetime(2026, 9, 30, 23, 59, 59, 999_999, tzinfo=UTC), 100),
        ("bob", datetime(2026, 10, 1, tzinfo=UTC), 200),
        ("ann", datetime(2026, 10, 15, 12, 30, tzinfo=UTC), 300),
        ("ann", datetime(2026, 11, 1, tzinfo=UTC), 400),
        ("bob", datetime(2026, 11, 20, 8, tzinfo=UTC), 500),
        ("cyd", datetime(2026, 9, 2, tzinfo=UTC), 600),
    ]
    for user_id, ts, cost_nano in calls:
        tally.record(
            user_id=user_id,
            model="gpt-4o-mini",
            input_tokens=1,
            cost_usd=Decimal(cost_nano).scaleb(-9),
            ts=ts,
            properties={"plan": "pro"},
        )
    assert tally.flush(timeout=10)
    return calls


def test_prune_deletes_the_months_before_and_keeps_later_reports(store_url: str) -> None:
    with Tally(store_url, instrument=False) as tally:
        seed_months(tally)
        october = datetime(2026, 10, 1, tzinfo=UTC)
        before = {
            period: tally.totals(*period)
            for period in [
                (october, datetime(2026, 11, 1, tzinfo=UTC)),  # a whole month
                (october, None),  # open-ended
                (datetime(2026, 10, 15, 12, tzinfo=UTC), datetime(2026, 11, 20, 8, 30, tzinfo=UTC)),
            ]
        }
        assert tally.prune(october) == 2
        assert tally.count_records() == 4
        for period, totals in before.items():
            assert tally.totals(*period) == totals
        # Nothing is left of September, in any table: no sums without their calls.
        assert tally.totals(None, october).requests == 0
        assert tally.user_totals("cyd").requests == 0
        assert [g.value for g in tally.totals_by("plan", datetime(2026, 9, 1), october)] == []
        # New calls are still counted, also where SQLite reuses the pruned newest rowid.
        tally.record(user_id="dee", model="gpt-4o-mini", cost_usd="0.000000700", ts=october)
        assert tally.flush(timeout=10)
        october_totals = tally.totals(october, datetime(2026, 11, 1, tzinfo=UTC))
        assert october_totals.requests == 3 and october_totals.users == 3
        assert october_totals.cost_usd * 10**9 == 200 + 300 + 700


def test_prune_refuses_a_date_inside_a_month(tally: Tally) -> None:
    seed_months(tally)
    with pytest.raises(ValueError, match="first instant of a UTC month"):
        tally.prune(datetime(2026, 10, 15, tzinfo=UTC))
    assert tally.count_records() == 6


def test_prune_command(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from llm_tally import cli

    with Tally(db_url, instrument=False) as tally:
        seed_months(tally)
    assert cli.main(["prune", "--database-url", db_url, "--before", "2026-11-01"]) == 0
    assert "deleted 4 call(s) before 2026-11-01" in capsys.readouterr().out
    assert cli.main(["prune", "--database-url", db_url, "--before", "2026-11-02"]) == 2
    assert "first instant of a UTC month" in capsys.readouterr().err
    with Tally(db_url, instrument=False) as tally:
        assert tally.count_records() == 2

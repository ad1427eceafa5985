"""The store: manual records, totals and periods, failures that never reach the app."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import openai
import pytest
from sqlalchemy import text

import llm_tally
from llm_tally import Tally
from llm_tally.storage.schema import upgrade_store

from .conftest import only_row, stored_rows

MESSAGES = [{"role": "user", "content": "hello"}]


def test_default_store_is_a_sqlite_file_in_the_working_directory(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    monkeypatch.delenv("LLM_TALLY_DATABASE_URL", raising=False)
    with Tally() as tally:
        assert tally.database_url == "sqlite:///llm_tally.db"
        tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
        tally.flush()
    assert (tmp_path / "llm_tally.db").exists()  # type: ignore[operator]
    with tally.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_database_url_from_the_environment(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("LLM_TALLY_DATABASE_URL", url)
    with Tally() as tally:
        assert tally.database_url == url


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="database_url"):
        Tally("not a url")
    with pytest.raises(ValueError, match="inject_stream_usage"):
        Tally("sqlite://", inject_stream_usage="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queue"):
        Tally("sqlite://", max_queue=0)


def test_manual_record_with_given_and_computed_cost(tally: Tally) -> None:
    when = datetime(2026, 11, 3, 12, 0, 0)
    tally.record(
        user_id="batch-user",
        model="claude-sonnet-4-5",
        provider="anthropic",
        input_tokens=1000,
        output_tokens=200,
        cost_usd=Decimal("0.000123456"),
        ts=when,
        properties={"feature": "nightly"},
    )
    tally.record(
        user_id="batch-user", model="gpt-4o-mini", input_tokens=1000, output_tokens=1000, ts=when
    )
    given, computed = stored_rows(tally)
    assert given["cost_nano_usd"] == 123_456 and given["cost_source"] == "given"
    assert given["usage_source"] == "manual" and given["properties"] == {"feature": "nightly"}
    assert computed["cost_source"] == "genai-prices" and computed["cost_nano_usd"] == 750_000
    totals = tally.user_totals("batch-user")
    assert totals.cost_usd == Decimal("0.000873456")
    assert totals.first_seen == when.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": 1.5}, "output_tokens"),
        ({"cost_usd": 0.01}, "cost_usd"),
        ({"cost_usd": "-1"}, "cost_usd"),
        ({"cost_usd": "lots"}, "cost_usd"),
        ({"cached_input_tokens": 5, "input_tokens": 1}, "input_tokens"),
        ({"ts": "yesterday"}, "ts"),
        ({"model": ""}, "model"),
        ({"status": "weird"}, "status"),
        ({"user_id": "a\x00b"}, "user_id"),
        ({"properties": {"plan": ["x"]}}, "plan"),
    ],
)
def test_manual_record_rejects_bad_input(
    tally: Tally, kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"user_id": "u", "model": "gpt-4o-mini", **kwargs}
    with pytest.raises(ValueError, match=field):
        tally.record(**args)  # type: ignore[arg-type]
    assert stored_rows(tally) == []


def test_periods_are_half_open_and_accept_dates_and_aware_datetimes(tally: Tally) -> None:
    for day in (1, 2, 3):
        tally.record(
            user_id="u", model="gpt-4o-mini", input_tokens=day, ts=datetime(2026, 11, day, 23, 30)
        )
    tally.flush()
    assert tally.user_totals("u").input_tokens == 6
    assert tally.user_totals("u", since=date(2026, 11, 2)).input_tokens == 5
    assert tally.user_totals("u", until=date(2026, 11, 2)).input_tokens == 1
    plus_one = timezone(timedelta(hours=1))
    # 2026-11-03 00:30 at +01:00 is 2026-11-02 23:30 UTC: exactly the second record, included.
    since = datetime(2026, 11, 3, 0, 30, tzinfo=plus_one)
    assert tally.user_totals("u", since=since).input_tokens == 5
    with pytest.raises(ValueError, match="since"):
        tally.user_totals("u", since="2026-11-01")  # type: ignore[arg-type]


def test_users_are_ordered_and_paged(tally: Tally) -> None:
    ts = datetime(2026, 11, 1)
    tally.record(user_id="cheap-busy", model="m", cost_usd="0.01", input_tokens=10, ts=ts)
    tally.record(user_id="cheap-busy", model="m", cost_usd="0.01", input_tokens=10, ts=ts)
    tally.record(user_id="cheap-busy", model="m", cost_usd="0.01", input_tokens=10, ts=ts)
    tally.record(user_id="expensive", model="m", cost_usd="1.00", input_tokens=5, ts=ts)
    tally.record(
        user_id="wordy", model="m", cost_usd="0.50", input_tokens=1000, ts=ts + timedelta(days=1)
    )
    tally.record(user_id=None, model="m", cost_usd="9.00", ts=ts)
    tally.flush()
    assert [u.user_id for u in tally.users()] == ["expensive", "wordy", "cheap-busy"]
    assert tally.users(order_by="requests")[0].user_id == "cheap-busy"
    assert tally.users(order_by="tokens")[0].user_id == "wordy"
    assert tally.users(order_by="last_seen")[0].user_id == "wordy"
    assert [u.user_id for u in tally.users(limit=1, offset=1)] == ["wordy"]
    top = tally.users()[0]
    assert top.cost_usd == Decimal("1.00") and top.requests == 1
    with pytest.raises(ValueError, match="order_by"):
        tally.users(order_by="money")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        tally.users(limit=0)


def test_a_failing_store_never_breaks_the_llm_call_and_records_arrive_later(
    db_url: str, client: openai.OpenAI
) -> None:
    with Tally(db_url, flush_interval=0.01) as tally:
        with tally.engine.begin() as conn:
            conn.execute(text("DROP TABLE llm_tally_usage"))
        with llm_tally.user("u1"):
            results = [
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                for _ in range(3)
            ]
        assert all(r.usage is not None for r in results)
        assert tally.flush(timeout=0.5) is False  # cannot store yet...
        stats = tally.stats()
        assert stats["write_errors"] >= 1 and "llm_tally_usage" in stats["last_write_error"]
        assert stats["dropped"] == 0
        upgrade_store(tally.engine)  # ...the store comes back
        assert tally.flush(timeout=10) is True
        assert tally.user_totals("u1").requests == 3


def _write_from_another_process(url: str, user_id: str, n: int) -> None:
    with Tally(url, instrument=False) as tally:
        for i in range(n):
            tally.record(user_id=user_id, model="gpt-4o-mini", input_tokens=i + 1, cost_usd="0.001")


def test_several_processes_share_one_sqlite_file(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_write_from_another_process, args=(db_url, f"p{i}", 500))
        for i in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Tally(db_url, instrument=False) as tally:
        for i in range(3):
            totals = tally.user_totals(f"p{i}")
            assert totals.requests == 500
            assert totals.input_tokens == sum(range(1, 501))
            assert totals.cost_usd == Decimal("0.5")


def test_tally_is_a_context_manager_and_close_flushes(db_url: str) -> None:
    with Tally(db_url) as tally:
        record_id = tally.record(user_id="u", model="gpt-4o-mini", input_tokens=3)
    assert tally.closed and not llm_tally.is_openai_instrumented()
    with Tally(db_url) as again:
        assert only_row(again)["id"] == record_id

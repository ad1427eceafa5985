"""The same store on the real PostgreSQL: real SDK calls, manual records, queries, reopening, and
several Tally instances writing into it at once."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import openai
import pytest
from genai_prices import Usage, calc_price
from sqlalchemy import text

import llm_tally
from llm_tally import Tally, UserTotals
from tests.conftest import FakeServer, stored_rows

pytestmark = pytest.mark.postgres

NANO = Decimal(10**9)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ORDER_BY = ("cost", "requests", "tokens", "last_seen")


@pytest.fixture
def pg_tally(pg_url: str) -> Iterator[Tally]:
    t = Tally(pg_url)
    yield t
    t.close()


# -- expectations, built from the fake's ledger and from the manual records' inputs --------------


@dataclass
class Expected:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0
    timestamps: list[datetime] = field(default_factory=list)

    def add(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached: int = 0,
        reasoning: int = 0,
        cost_nano: int,
        ts: datetime | None = None,
    ) -> None:
        self.requests += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_input_tokens += cached
        self.reasoning_tokens += reasoning
        self.cost_nano += cost_nano
        if ts is not None:
            self.timestamps.append(ts)

    def matches(self, totals: UserTotals) -> None:
        assert totals.requests == self.requests
        assert totals.errors == 0
        assert totals.unpriced_requests == 0
        assert totals.input_tokens == self.input_tokens
        assert totals.output_tokens == self.output_tokens
        assert totals.cached_input_tokens == self.cached_input_tokens
        assert totals.reasoning_tokens == self.reasoning_tokens
        assert type(totals.cost_usd) is Decimal
        assert totals.cost_usd == Decimal(self.cost_nano) / NANO
        if self.timestamps:
            assert totals.first_seen == min(self.timestamps)
            assert totals.last_seen == max(self.timestamps)


def to_nano(usd: Decimal) -> int:
    return int((usd * NANO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def openai_price_nano(model: str, input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached)
    return to_nano(Decimal(calc_price(usage, model, provider_id="openai").total_price))


def add_ledger(expected: dict[str, Expected], fake_llm: FakeServer) -> None:
    """Add every usage the fake reported for one of ``expected``'s users (label = user id)."""
    for entry in list(fake_llm.ledger):
        if entry["label"] in expected:
            expected[entry["label"]].add(
                input_tokens=entry["input"],
                output_tokens=entry["output"],
                cached=entry["cached"],
                reasoning=entry["reasoning"],
                cost_nano=openai_price_nano(
                    entry["model"], entry["input"], entry["output"], entry["cached"]
                ),
            )


def sort_key(order_by: str, uid: str, totals: UserTotals) -> tuple[Any, ...]:
    value = {
        "cost": totals.cost_usd,
        "requests": totals.requests,
        "tokens": totals.total_tokens,
        "last_seen": totals.last_seen,
    }[order_by]
    return (value, uid)


def expected_order(order_by: str, totals: dict[str, UserTotals]) -> list[str]:
    """Largest first; ties by user id ascending."""
    keyed = sorted(totals, key=lambda uid: sort_key(order_by, uid, totals[uid])[1])
    return sorted(keyed, key=lambda uid: sort_key(order_by, uid, totals[uid])[0], reverse=True)


def as_utc(bound: datetime | date) -> datetime:
    """The documented meaning of a bound: naive datetimes are UTC, a date is midnight UTC."""
    if isinstance(bound, datetime):
        return bound if bound.tzinfo is not None else bound.replace(tzinfo=UTC)
    return datetime(bound.year, bound.month, bound.day, tzinfo=UTC)


def prompt(words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(["word"] * words)}]


# -- tests -------------------------------------------------------------------------------------


async def test_real_calls_manual_records_and_queries_on_postgres(
    pg_url: str,
    pg_tally: Tally,
    client: openai.OpenAI,
    aclient: openai.AsyncOpenAI,
    fake_llm: FakeServer,
) -> None:
    tally = pg_tally
    assert tally.engine.dialect.name == "postgresql"
    started = datetime.now(UTC)
    prefix = uuid.uuid4().hex[:10]
    a, b, c, d, e = (f"{prefix}-{name}" for name in "abcde")
    expected = {uid: Expected() for uid in (a, b, c, d, e)}

    # b, then a (sync then async), then c (async): c is the most recently seen.
    with llm_tally.user(b, plan="free"):
        for words in (3, 11):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=prompt(words), extra_headers={"x-test-label": b}
            )
    with llm_tally.user(a, plan="pro"):
        client.chat.completions.create(
            model="o3-mini",
            messages=prompt(7),
            max_completion_tokens=10,
            metadata={"prompt_cache_hit": "4"},
            extra_headers={"x-test-label": a},
        )
        for _ in client.chat.completions.create(
            model="gpt-4o-mini",
            messages=prompt(5),
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-test-label": a},
        ):
            pass
        client.responses.create(
            model="gpt-4.1-mini", input="one two three", extra_headers={"x-test-label": a}
        )
        client.embeddings.create(
            model="text-embedding-3-small", input="a b c d", extra_headers={"x-test-label": a}
        )
    async with llm_tally.user(a, plan="pro"):
        await asyncio.gather(
            aclient.chat.completions.create(
                model="gpt-4o-mini", messages=prompt(2), extra_headers={"x-test-label": a}
            ),
            aclient.embeddings.create(
                model="text-embedding-3-small",
                input=["x y", "z"],
                extra_headers={"x-test-label": a},
            ),
            aclient.responses.create(
                model="gpt-4o-mini", input="four five", extra_headers={"x-test-label": a}
            ),
        )
    async with llm_tally.user(c, plan="team"):

        async def responses_stream() -> None:
            stream = await aclient.responses.create(
                model="o3-mini",
                input="p q r s",
                max_output_tokens=12,
                stream=True,
                extra_headers={"x-test-label": c},
            )
            async for _ in stream:
                pass

        await asyncio.gather(
            responses_stream(),
            aclient.chat.completions.create(
                model="gpt-4.1-mini",
                messages=prompt(9),
                max_completion_tokens=3,
                extra_headers={"x-test-label": c},
            ),
            aclient.embeddings.create(
                model="text-embedding-3-small", input="m n", extra_headers={"x-test-label": c}
            ),
        )
    assert llm_tally.current_user_id() is None
    ended = datetime.now(UTC)
    add_ledger(expected, fake_llm)
    assert [expected[uid].requests for uid in (a, b, c)] == [7, 2, 3]

    # Manual records: an explicit exact cost, a cost computed from genai-prices, a zero cost.
    given_id = tally.record(
        user_id=b,
        model="some-model-without-a-price",
        provider="acme",
        input_tokens=40,
        output_tokens=2,
        cost_usd=Decimal("0.000123456"),
        ts=started,
    )
    expected[b].add(input_tokens=40, output_tokens=2, cost_nano=123_456)
    tally.record(user_id=b, model="batch-job", input_tokens=1, cost_usd="0.002", ts=started)
    expected[b].add(input_tokens=1, output_tokens=0, cost_nano=2_000_000)
    computed_id = tally.record(
        user_id=c,
        model="gpt-4o-mini",
        input_tokens=1_234,
        output_tokens=567,
        cached_input_tokens=1_000,
        ts=started,
    )
    expected[c].add(
        input_tokens=1_234,
        output_tokens=567,
        cached=1_000,
        cost_nano=openai_price_nano("gpt-4o-mini", 1_234, 567, 1_000),
    )
    d_ts = datetime(2024, 1, 15, 8, 30, tzinfo=UTC)
    tally.record(
        user_id=d, model="gpt-4o-mini", input_tokens=1_000_000, cost_usd=Decimal(0), ts=d_ts
    )
    expected[d].add(input_tokens=1_000_000, output_tokens=0, cost_nano=0, ts=d_ts)

    # e: records around the day 2024-03-02 (UTC), given as aware, naive and date timestamps;
    # token counts are powers of two so every window's sum names exactly the records in it.
    window_records: list[tuple[datetime | date, int]] = [
        (datetime(2024, 3, 1, 23, 59, 59, 999_999, tzinfo=UTC), 1),
        (date(2024, 3, 2), 2),
        (datetime(2024, 3, 2, 12, 0), 4),
        (datetime(2024, 3, 2, 18, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-5))), 8),
        (datetime(2024, 3, 3, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))), 16),
        (datetime(2024, 3, 3, 0, 0, 0, 1), 32),
    ]
    for ts, tokens in window_records:
        tally.record(
            user_id=e,
            model="gpt-4o-mini",
            input_tokens=tokens,
            output_tokens=tokens,
            cost_usd=Decimal(tokens) / NANO,
            ts=ts,
        )
        expected[e].add(input_tokens=tokens, output_tokens=tokens, cost_nano=tokens, ts=as_utc(ts))

    rows = {row["id"]: row for row in stored_rows(tally)}
    assert len(rows) == sum(x.requests for x in expected.values())
    assert (rows[given_id]["cost_nano_usd"], rows[given_id]["cost_source"]) == (123_456, "given")
    assert rows[computed_id]["cost_source"] == "genai-prices"
    # JSONB comes back as a dict on PostgreSQL.
    assert {row["user_id"]: row["properties"] for row in rows.values() if row["request_id"]} == {
        a: {"plan": "pro"},
        b: {"plan": "free"},
        c: {"plan": "team"},
    }
    for uid in (a, b, c):
        user_ts = [row["ts"] for row in rows.values() if row["user_id"] == uid]
        expected[uid].timestamps = [EPOCH + timedelta(microseconds=us) for us in user_ts]
        assert started <= min(expected[uid].timestamps)
        assert max(expected[uid].timestamps) <= ended

    totals = {uid: tally.user_totals(uid) for uid in expected}
    for uid, want in expected.items():
        want.matches(totals[uid])
    assert (
        tally.user_totals(b).cost_usd
        == Decimal("0.002123456")
        + Decimal(sum(openai_price_nano("gpt-4o-mini-2024-07-18", words, 8) for words in (3, 11)))
        / NANO
    )
    assert tally.user_totals(None).requests == 0
    assert tally.user_totals(f"{prefix}-nobody") == UserTotals(
        f"{prefix}-nobody", 0, 0, 0, 0, 0, 0, Decimal(0), 0, None, None
    )

    # users(): every order, against the order the expected totals give.
    orders = {}
    for order_by in ORDER_BY:
        listed = tally.users(order_by=order_by)
        assert {t.user_id: t for t in listed} == totals
        orders[order_by] = [t.user_id for t in listed]
        assert orders[order_by] == expected_order(order_by, totals), order_by
        paged = [
            t.user_id
            for offset in range(0, len(totals), 2)
            for t in tally.users(order_by=order_by, limit=2, offset=offset)
        ]
        assert paged == orders[order_by]
    # The data set makes each ordering say something different.
    assert orders["cost"][0] == b
    assert orders["requests"][0] == a
    assert orders["tokens"][0] == d
    assert orders["last_seen"] == [c, a, b, e, d]

    # since / until: [since, until), naive = UTC, date = midnight UTC, aware in any zone.
    plus_0530 = timezone(timedelta(hours=5, minutes=30))
    minus_5 = timezone(timedelta(hours=-5))
    windows: list[tuple[datetime | date | None, datetime | date | None]] = [
        (date(2024, 3, 2), date(2024, 3, 3)),
        (datetime(2024, 3, 2), datetime(2024, 3, 3)),
        (datetime(2024, 3, 2, 0, 0, 0, 1), datetime(2024, 3, 2, 23, 59, 59, 999_999)),
        (datetime(2024, 3, 2, 5, 30, tzinfo=plus_0530), datetime(2024, 3, 2, 7, 0, tzinfo=minus_5)),
        (datetime(2024, 3, 1, 18, 59, 59, 999_999, tzinfo=minus_5), date(2024, 3, 2)),
        (date(2024, 3, 3), None),
        (None, date(2024, 3, 2)),
        (datetime(2024, 3, 3, 0, 0, 0, 1, tzinfo=UTC), datetime(2024, 3, 3, 0, 0, 0, 2)),
        (date(2024, 3, 4), date(2024, 3, 5)),
    ]
    for since, until in windows:
        inside = [
            tokens
            for ts, tokens in window_records
            if (since is None or as_utc(since) <= as_utc(ts))
            and (until is None or as_utc(ts) < as_utc(until))
        ]
        got = tally.user_totals(e, since=since, until=until)
        assert got.requests == len(inside), (since, until)
        assert got.input_tokens == got.output_tokens == sum(inside), (since, until)
        assert got.cost_usd == Decimal(sum(inside)) / NANO, (since, until)
        inside_ts = [as_utc(ts) for ts, tokens in window_records if tokens in inside]
        assert got.first_seen == (min(inside_ts) if inside_ts else None)
        assert got.last_seen == (max(inside_ts) if inside_ts else None)
    assert [t.user_id for t in tally.users(since=date(2024, 3, 1), until=date(2024, 3, 4))] == [e]
    assert [
        t.user_id
        for t in tally.users(since=datetime(2024, 1, 1), until=date(2024, 3, 3), order_by="tokens")
    ] == [d, e]
    # The live calls: inside [started, ended], and nothing of theirs after `ended`.
    live = tally.users(since=started, until=ended + timedelta(microseconds=1))
    assert {t.user_id for t in live} == {a, b, c}
    assert tally.user_totals(a, since=started.replace(tzinfo=None)) == totals[a]
    assert tally.user_totals(a, since=ended + timedelta(microseconds=1)).requests == 0

    # A second Tally on the same URL: the tables exist already; it reads and writes the store.
    with Tally(pg_url) as second:
        assert llm_tally.default_tally() is tally
        assert {uid: second.user_totals(uid) for uid in expected} == totals
        for order_by in ORDER_BY:
            assert second.users(order_by=order_by) == tally.users(order_by=order_by)
        second.record(user_id=d, model="gpt-4o-mini", input_tokens=5, cost_usd="0.1", ts=d_ts)
        assert second.flush(10)
        assert tally.user_totals(d).requests == 2
        assert tally.user_totals(d).cost_usd == Decimal("0.1")
        assert tally.user_totals(d).input_tokens == 1_000_005
    with tally.engine.connect() as conn:
        meta = conn.execute(text("SELECT key, value FROM llm_tally_meta")).all()
    assert [key for key, _ in meta] == ["schema_version"]


def test_two_tallies_writing_concurrently_from_threads_give_exact_totals(
    pg_url: str, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    first = Tally(pg_url)
    # Small batches and a short interval: many interleaved transactions from both writers.
    second = Tally(pg_url, batch_size=7, flush_interval=0.005)
    try:
        prefix = uuid.uuid4().hex[:10]
        uids = [f"{prefix}-user-{i}" for i in range(6)]
        expected = {uid: Expected() for uid in uids}
        submitted = Counter[int]()  # records each Tally was handed
        lock = threading.Lock()
        workers = 12
        barrier = threading.Barrier(workers, timeout=10)

        def worker(n: int) -> list[tuple[str, int, int, int]]:
            tally = first if n % 2 == 0 else second
            uid = uids[n % len(uids)]
            made: list[tuple[str, int, int, int]] = []
            sdk_calls = 0
            barrier.wait()
            for k in range(150):
                tokens_in, tokens_out = 1 + (n * 37 + k * 11) % 500, (n + k) % 50
                cost_nano = n * 1_000 + k  # distinct, and exactly representable in nano-USD
                tally.record(
                    user_id=uid,
                    model="manual-model",
                    input_tokens=tokens_in,
                    output_tokens=tokens_out,
                    cost_usd=Decimal(cost_nano) / NANO,
                )
                made.append((uid, tokens_in, tokens_out, cost_nano))
                if k % 30 == 0:
                    # A real SDK call, routed to this thread's Tally by the user context.
                    with llm_tally.user(uid, tally=tally):
                        client.chat.completions.create(
                            model="gpt-4o-mini",
                            messages=prompt(1 + k % 13),
                            max_completion_tokens=1 + n,
                            extra_headers={"x-test-label": uid},
                        )
                    sdk_calls += 1
            with lock:
                submitted[id(tally)] += len(made) + sdk_calls
            return made

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(worker, range(workers)))

        assert first.flush(20) and second.flush(20)
        for made in results:
            for uid, tokens_in, tokens_out, cost_nano in made:
                expected[uid].add(
                    input_tokens=tokens_in, output_tokens=tokens_out, cost_nano=cost_nano
                )
        add_ledger(expected, fake_llm)

        for tally in (first, second):
            assert tally.stats()["written"] == submitted[id(tally)]
            assert tally.stats()["dropped"] == tally.stats()["write_errors"] == 0
            for uid, want in expected.items():
                want.matches(tally.user_totals(uid))
        rows = stored_rows(first)
        assert (
            len(rows)
            == len({row["id"] for row in rows})
            == sum(x.requests for x in expected.values())
        )
        assert {t.user_id for t in first.users()} == set(uids)
        total = sum((t.cost_usd for t in second.users()), Decimal(0))
        assert total == Decimal(sum(x.cost_nano for x in expected.values())) / NANO
    finally:
        second.close()
        first.close()


def test_tallies_opened_at_the_same_time_on_an_empty_database_all_work(pg_url: str) -> None:
    count = 4
    barrier = threading.Barrier(count, timeout=10)

    def open_tally(_: int) -> Tally:
        barrier.wait()
        return Tally(pg_url)

    with ThreadPoolExecutor(max_workers=count) as pool:
        tallies = list(pool.map(open_tally, range(count)))
    try:
        uid = f"{uuid.uuid4().hex[:10]}-opener"
        for i, tally in enumerate(tallies):
            tally.record(user_id=uid, model="m", input_tokens=i + 1, cost_usd=Decimal(i) / NANO)
            assert tally.flush(10)
        for tally in tallies:
            totals = tally.user_totals(uid)
            assert totals.requests == count
            assert totals.input_tokens == sum(range(1, count + 1))
            assert totals.cost_usd == Decimal(sum(range(count))) / NANO
        with tallies[0].engine.connect() as conn:
            meta = conn.execute(text("SELECT key FROM llm_tally_meta")).scalars().all()
        assert meta == ["schema_version"]
    finally:
        for tally in reversed(tallies):
            tally.close()

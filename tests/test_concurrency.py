"""Exact per-user totals under concurrency: the real OpenAI SDK over HTTP against the fake server.

Many threads and asyncio tasks call at once, each inside its own user context (or inside a
shared one). Every request is labelled with its intended user (``x-test-label``), so the fake
provider's ledger says what each user must be charged; the store must agree exactly, record
by record, with nothing charged to anyone else.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import openai
from genai_prices import Usage, calc_price

import llm_tally
from llm_tally import Tally
from llm_tally.demo.fake_llm import WORDS
from tests.conftest import TOKEN_FIELDS, FakeServer, stored_rows

KINDS = ("chat", "chat_stream", "responses", "responses_stream", "embeddings")
# o3-mini reports reasoning tokens; all three have a genai-prices price (cached input too).
CHAT_MODELS = ("gpt-4o-mini", "o3-mini", "gpt-4.1-mini")
EMBEDDING_MODEL = "text-embedding-3-small"
PLANS = ("free", "pro", "team")


# -- what to call ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str
    model: str
    prompt: str
    max_tokens: int
    cache_hit: int
    delay: str | None


def plan_calls(rng: random.Random, count: int) -> list[Call]:
    """``count`` varied calls covering every kind (so users' totals differ), in random order."""
    calls = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        words = rng.randint(1, 30)
        calls.append(
            Call(
                kind=kind,
                model=EMBEDDING_MODEL if kind == "embeddings" else rng.choice(CHAT_MODELS),
                prompt=" ".join(rng.choice(WORDS) for _ in range(words)),
                max_tokens=rng.randint(1, 24),
                cache_hit=rng.randint(0, words),
                # A short server-side wait on some calls keeps many requests in flight at once.
                delay=rng.choice((None, None, "0.01", "0.03")),
            )
        )
    rng.shuffle(calls)
    return calls


def _headers(label: str, call: Call) -> dict[str, str]:
    headers = {"x-test-label": label}
    if call.delay:
        headers["x-fake-delay"] = call.delay
    return headers


def _messages(call: Call) -> list[dict[str, str]]:
    return [{"role": "user", "content": call.prompt}]


def call_sync(client: openai.OpenAI, label: str, call: Call) -> None:
    headers = _headers(label, call)
    metadata = {"prompt_cache_hit": str(call.cache_hit)}
    if call.kind == "chat":
        completion = client.chat.completions.create(
            model=call.model,
            messages=_messages(call),
            max_completion_tokens=call.max_tokens,
            metadata=metadata,
            extra_headers=headers,
        )
        assert completion.usage is not None
    elif call.kind == "chat_stream":
        chunks = list(
            client.chat.completions.create(
                model=call.model,
                messages=_messages(call),
                max_completion_tokens=call.max_tokens,
                metadata=metadata,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers,
            )
        )
        assert chunks[-1].usage is not None, "the caller asked for the usage chunk"
    elif call.kind == "responses":
        response = client.responses.create(
            model=call.model,
            input=call.prompt,
            max_output_tokens=call.max_tokens,
            metadata=metadata,
            extra_headers=headers,
        )
        assert response.usage is not None
    elif call.kind == "responses_stream":
        events = list(
            client.responses.create(
                model=call.model,
                input=call.prompt,
                max_output_tokens=call.max_tokens,
                metadata=metadata,
                stream=True,
                extra_headers=headers,
            )
        )
        assert events[-1].type == "response.completed"
    else:
        embedding = client.embeddings.create(
            model=call.model, input=[call.prompt, "one more input"], extra_headers=headers
        )
        assert len(embedding.data) == 2


async def call_async(client: openai.AsyncOpenAI, label: str, call: Call) -> None:
    headers = _headers(label, call)
    metadata = {"prompt_cache_hit": str(call.cache_hit)}
    if call.kind == "chat":
        completion = await client.chat.completions.create(
            model=call.model,
            messages=_messages(call),
            max_completion_tokens=call.max_tokens,
            metadata=metadata,
            extra_headers=headers,
        )
        assert completion.usage is not None
    elif call.kind == "chat_stream":
        stream = await client.chat.completions.create(
            model=call.model,
            messages=_messages(call),
            max_completion_tokens=call.max_tokens,
            metadata=metadata,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            await asyncio.sleep(0)  # let other tasks' streams interleave with this one
        assert chunks[-1].usage is not None, "the caller asked for the usage chunk"
    elif call.kind == "responses":
        response = await client.responses.create(
            model=call.model,
            input=call.prompt,
            max_output_tokens=call.max_tokens,
            metadata=metadata,
            extra_headers=headers,
        )
        assert response.usage is not None
    elif call.kind == "responses_stream":
        events = []
        async for event in await client.responses.create(
            model=call.model,
            input=call.prompt,
            max_output_tokens=call.max_tokens,
            metadata=metadata,
            stream=True,
            extra_headers=headers,
        ):
            events.append(event)
            await asyncio.sleep(0)
        assert events[-1].type == "response.completed"
    else:
        embedding = await client.embeddings.create(
            model=call.model, input=[call.prompt, "one more input"], extra_headers=headers
        )
        assert len(embedding.data) == 2


# -- what must be stored -----------------------------------------------------------------------


def ledger_by_label(fake_llm: FakeServer, labels: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    wanted: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for entry in list(fake_llm.ledger):
        if entry["label"] in wanted:
            wanted[entry["label"]].append(entry)
    return wanted


def genai_prices_nano(entry: dict[str, Any]) -> int:
    """What the provider-reported usage costs at OpenAI's price, in nano-USD (half-even)."""
    usage = Usage(
        input_tokens=entry["input"],
        output_tokens=entry["output"],
        cache_read_tokens=entry["cached"],
    )
    price = calc_price(usage, entry["model"], provider_id="openai").total_price
    return int((Decimal(price) * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def _properties(row: dict[str, Any]) -> dict[str, Any]:
    value = row["properties"]
    return json.loads(value) if isinstance(value, str) else value


def assert_exact_totals(
    tally: Tally,
    fake_llm: FakeServer,
    expected_calls: dict[str, int],
    plans: dict[str, str],
    started: datetime,
) -> list[dict[str, Any]]:
    """Every stored record matches one ledger entry of its own user; totals are exact."""
    ended = datetime.now(UTC)
    assert tally.flush(10), "records were not stored in time"
    ledger = ledger_by_label(fake_llm, expected_calls)
    for uid, count in expected_calls.items():
        assert len(ledger[uid]) == count, f"the fake saw {len(ledger[uid])} calls for {uid}"
    by_request_id = {entry["request_id"]: entry for entries in ledger.values() for entry in entries}

    rows = stored_rows(tally)
    assert len(rows) == sum(expected_calls.values())
    assert {row["user_id"] for row in rows} == set(expected_calls), "a record leaked to a stranger"
    seen_request_ids: set[str] = set()
    for row in rows:
        entry = by_request_id.get(row["request_id"])
        assert entry is not None, f"no ledger entry for {row}"
        assert row["request_id"] not in seen_request_ids, f"recorded twice: {row}"
        seen_request_ids.add(row["request_id"])
        # The provider said this call was made for entry["label"]: it must be charged to them.
        assert row["user_id"] == entry["label"], row
        assert _properties(row) == {"plan": plans[row["user_id"]]}, row
        for column, key in TOKEN_FIELDS:
            assert row[column] == entry[key], (column, row, entry)
        assert (row["status"], row["usage_source"]) == ("ok", "provider"), row
        assert row["response_model"] == entry["model"], row

    for uid, count in expected_calls.items():
        totals = tally.user_totals(uid)
        entries = ledger[uid]
        assert totals.user_id == uid
        assert totals.requests == count
        assert totals.errors == 0
        assert totals.unpriced_requests == 0
        for column, key in TOKEN_FIELDS:
            assert getattr(totals, column) == sum(e[key] for e in entries), (uid, column)
        user_rows = [row for row in rows if row["user_id"] == uid]
        nano = sum(row["cost_nano_usd"] for row in user_rows)
        assert type(totals.cost_usd) is Decimal
        assert totals.cost_usd == Decimal(nano) / Decimal(10**9)
        assert totals.cost_usd == sum(
            (Decimal(row["cost_nano_usd"]) / Decimal(10**9) for row in user_rows), Decimal(0)
        )
        assert totals.first_seen is not None and totals.last_seen is not None
        assert started <= totals.first_seen <= totals.last_seen <= ended

    listed = {t.user_id: t for t in tally.users(limit=1000)}
    assert listed == {uid: tally.user_totals(uid) for uid in expected_calls}
    assert tally.user_totals(None).requests == 0, "a call was recorded without its user"
    assert tally.stats()["dropped"] == 0
    assert tally.stats()["open_streams"] == 0
    return rows


def make_users(count: int) -> tuple[list[str], dict[str, str]]:
    prefix = uuid.uuid4().hex[:10]
    uids = [f"{prefix}-user-{i}" for i in range(count)]
    return uids, {uid: PLANS[i % len(PLANS)] for i, uid in enumerate(uids)}


# -- tests -------------------------------------------------------------------------------------


def run_threads(
    client: openai.OpenAI, sessions: list[tuple[str, str, list[Call]]]
) -> list[str | None]:
    """One thread per session, all released at once; returns current_user_id() after each exit."""
    barrier = threading.Barrier(len(sessions), timeout=10)

    def session(uid: str, plan: str, calls: list[Call]) -> str | None:
        assert llm_tally.current_user_id() is None
        barrier.wait()
        with llm_tally.user(uid, plan=plan):
            for call in calls:
                assert llm_tally.current_user_id() == uid
                call_sync(client, uid, call)
            assert llm_tally.current_user_id() == uid
        return llm_tally.current_user_id()

    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        futures = [pool.submit(session, *s) for s in sessions]
        return [future.result(timeout=60) for future in futures]


def test_threads_each_in_their_own_user_context_get_exact_totals(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    started = datetime.now(UTC)
    uids, plans = make_users(8)
    rng = random.Random(1)
    sessions = [(uid, plans[uid], plan_calls(rng, 5)) for uid in uids for _ in range(2)]
    expected = Counter[str]()
    for uid, _, calls in sessions:
        expected[uid] += len(calls)

    after_exit = run_threads(client, sessions)

    assert after_exit == [None] * len(sessions)
    assert llm_tally.current_user_id() is None
    assert_exact_totals(tally, fake_llm, expected, plans, started)


async def test_async_tasks_each_in_their_own_user_context_get_exact_totals(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    started = datetime.now(UTC)
    uids, plans = make_users(8)
    rng = random.Random(2)
    sessions = [(uid, plan_calls(rng, 5)) for uid in uids for _ in range(3)]
    expected = Counter[str]()
    for uid, calls in sessions:
        expected[uid] += len(calls)

    async def session(uid: str, calls: list[Call]) -> str | None:
        assert llm_tally.current_user_id() is None
        async with llm_tally.user(uid, plan=plans[uid]):
            for call in calls:
                await call_async(aclient, uid, call)
                assert llm_tally.current_user_id() == uid
        return llm_tally.current_user_id()

    after_exit = await asyncio.gather(*(session(uid, calls) for uid, calls in sessions))

    assert after_exit == [None] * len(sessions)
    assert llm_tally.current_user_id() is None
    assert_exact_totals(tally, fake_llm, expected, plans, started)


async def test_tasks_spawned_inside_one_user_context_are_all_charged_to_that_user(
    tally: Tally,
    client: openai.OpenAI,
    aclient: openai.AsyncOpenAI,
    fake_llm: FakeServer,
) -> None:
    started = datetime.now(UTC)
    uids, plans = make_users(5)
    owner, nested, others = uids[0], uids[1], uids[2:]
    rng = random.Random(3)
    expected = Counter[str]()
    late_start = asyncio.Event()

    async def owned(calls: list[Call]) -> None:
        for call in calls:
            await call_async(aclient, owner, call)
            assert llm_tally.current_user_id() == owner

    async def owned_sync_in_thread(calls: list[Call]) -> None:
        # asyncio.to_thread copies the context: the sync SDK in the worker thread sees owner.
        def work() -> str | None:
            for call in calls:
                call_sync(client, owner, call)
            return llm_tally.current_user_id()

        assert await asyncio.to_thread(work) == owner

    async def nested_user(calls: list[Call]) -> None:
        # A task inside owner's block may charge someone else for a while, then owner again.
        async with llm_tally.user(nested, plan=plans[nested]):
            for call in calls[:-1]:
                await call_async(aclient, nested, call)
        assert llm_tally.current_user_id() == owner
        await call_async(aclient, owner, calls[-1])

    async def owned_after_block_exit(call: Call) -> None:
        # Created inside the block, runs its call only after the block has exited.
        await late_start.wait()
        assert llm_tally.current_user_id() == owner
        await call_async(aclient, owner, call)

    async def owner_block() -> asyncio.Task[None]:
        async with llm_tally.user(owner, plan=plans[owner]):
            work = []
            for _ in range(6):
                calls = plan_calls(rng, 5)
                expected[owner] += len(calls)
                work.append(owned(calls))
            sync_calls = plan_calls(rng, 5)
            expected[owner] += len(sync_calls)
            work.append(owned_sync_in_thread(sync_calls))
            nested_calls = plan_calls(rng, 6)
            expected[nested] += len(nested_calls) - 1
            expected[owner] += 1
            work.append(nested_user(nested_calls))
            expected[owner] += 1
            late = asyncio.create_task(owned_after_block_exit(plan_calls(rng, 1)[0]))
            await asyncio.gather(*work)
            assert llm_tally.current_user_id() == owner
        assert llm_tally.current_user_id() is None
        return late

    async def stranger(uid: str, calls: list[Call]) -> None:
        async with llm_tally.user(uid, plan=plans[uid]):
            for call in calls:
                await call_async(aclient, uid, call)

    stranger_work = []
    for uid in others:
        for _ in range(3):
            calls = plan_calls(rng, 5)
            expected[uid] += len(calls)
            stranger_work.append(stranger(uid, calls))

    late, *_ = await asyncio.gather(owner_block(), *stranger_work)
    late_start.set()
    await late

    assert llm_tally.current_user_id() is None
    assert_exact_totals(tally, fake_llm, expected, plans, started)


async def test_threads_and_tasks_at_the_same_time_for_the_same_users(
    tally: Tally,
    client: openai.OpenAI,
    aclient: openai.AsyncOpenAI,
    fake_llm: FakeServer,
) -> None:
    started = datetime.now(UTC)
    uids, plans = make_users(6)
    rng = random.Random(4)
    thread_sessions = [(uid, plans[uid], plan_calls(rng, 4)) for uid in uids]
    task_sessions = [(uid, plan_calls(rng, 4)) for uid in uids for _ in range(2)]
    expected = Counter[str]()
    for uid, _, calls in thread_sessions:
        expected[uid] += len(calls)
    for uid, calls in task_sessions:
        expected[uid] += len(calls)

    async def session(uid: str, calls: list[Call]) -> None:
        async with llm_tally.user(uid, plan=plans[uid]):
            for call in calls:
                await call_async(aclient, uid, call)

    # The threads do not inherit this task's context (run_in_executor does not copy it).
    loop = asyncio.get_running_loop()
    threads = loop.run_in_executor(None, run_threads, client, thread_sessions)
    await asyncio.gather(*(session(uid, calls) for uid, calls in task_sessions))
    after_exit = await threads

    assert after_exit == [None] * len(thread_sessions)
    assert llm_tally.current_user_id() is None
    assert_exact_totals(tally, fake_llm, expected, plans, started)


def test_cost_is_the_exact_decimal_sum_of_the_record_costs(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    started = datetime.now(UTC)
    uids, plans = make_users(4)
    rng = random.Random(5)
    sessions = [(uid, plans[uid], plan_calls(rng, 10)) for uid in uids for _ in range(2)]
    expected = Counter[str]()
    for uid, _, calls in sessions:
        expected[uid] += len(calls)

    run_threads(client, sessions)

    rows = assert_exact_totals(tally, fake_llm, expected, plans, started)
    ledger = {e["request_id"]: e for es in ledger_by_label(fake_llm, uids).values() for e in es}
    grand_total = Decimal(0)
    for uid in uids:
        user_rows = [row for row in rows if row["user_id"] == uid]
        for row in user_rows:
            assert isinstance(row["cost_nano_usd"], int) and row["cost_nano_usd"] > 0, row
            # Priced from what the provider reported (cached input at its own rate).
            assert row["cost_nano_usd"] == genai_prices_nano(ledger[row["request_id"]]), row
        cost = tally.user_totals(uid).cost_usd
        assert type(cost) is Decimal
        assert cost == sum((Decimal(r["cost_nano_usd"]) / 10**9 for r in user_rows), Decimal(0))
        # Exact to the nano-dollar: scaling back gives the integer sum with no remainder.
        assert cost * 10**9 == sum(r["cost_nano_usd"] for r in user_rows)
        assert cost.as_tuple().exponent >= -9
        grand_total += cost
    assert sum((t.cost_usd for t in tally.users()), Decimal(0)) == grand_total
    assert all(type(t.cost_usd) is Decimal for t in tally.users())

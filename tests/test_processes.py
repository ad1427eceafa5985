"""Several server processes, one store: every total is exact.

Real servers in processes of their own — ``uvicorn --workers 4`` (FastAPI) and a gunicorn
Flask app with 2 workers on PostgreSQL; ``uvicorn --workers 4`` on one SQLite file — serve
200 requests sent at once for 50 users. Each request makes one instrumented OpenAI call
(async, sync, streamed) to the fake provider, whose usage is known from the request. After
a graceful shutdown, every report must equal what is computed here, in plain Python, from
what the client sent: per-user totals, totals by plan, model and feature, exact Decimal
costs, and the rollup tables must equal a re-aggregation of the stored calls.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import pytest

from llm_tally import Tally

from .conftest import FakeServer
from .servers import ServerProcess, free_port, python_command, serve
from .test_concurrency import genai_prices_nano
from .test_rollups import assert_rollups_match_raw

USERS = 50
REQUESTS_PER_USER = 4
MODELS = ("gpt-4o-mini", "o3-mini", "gpt-4.1-mini")
KINDS = ("chat", "chat_stream")
PLANS = ("free", "pro", "team")
FEATURES = ("chat", "search", "summarize")


@dataclass(frozen=True)
class Call:
    """One request to a server, and what its LLM call must be stored as."""

    n: int
    server: str
    path: str
    user: str
    plan: str
    feature: str
    model: str
    kind: str
    words: int
    max_tokens: int
    cache_hit: int

    def params(self) -> dict[str, str]:
        names = ("n", "user", "plan", "feature", "model", "kind", "words", "max_tokens")
        return {name: str(getattr(self, name)) for name in (*names, "cache_hit")}

    # The fake provider's usage rules (llm_tally/demo/fake_llm.py), from the request alone.
    @property
    def response_model(self) -> str:
        # The fake's chat endpoint answers gpt-4o-mini with its dated snapshot.
        return "gpt-4o-mini-2024-07-18" if self.model == "gpt-4o-mini" else self.model

    @property
    def tokens(self) -> dict[str, int]:
        return {
            "input_tokens": self.words,
            "output_tokens": self.max_tokens,
            "cached_input_tokens": min(self.cache_hit, self.words),
            "reasoning_tokens": self.max_tokens // 2 if self.model.startswith("o3") else 0,
        }

    @property
    def cost_nano(self) -> int:
        t = self.tokens
        return genai_prices_nano(
            {
                "model": self.response_model,
                "input": t["input_tokens"],
                "output": t["output_tokens"],
                "cached": t["cached_input_tokens"],
            }
        )


def plan_calls(seed: int, targets: list[tuple[str, str]]) -> list[Call]:
    """Each user's requests go to each target in turn (so concurrent writers update the
    same rollup rows), with random models, kinds and sizes; in random order."""
    rng = random.Random(seed)
    prefix = uuid.uuid4().hex[:8]
    calls = []
    for u in range(USERS):
        user, plan = f"{prefix}-user-{u:02d}", PLANS[u % len(PLANS)]
        for k in range(REQUESTS_PER_USER):
            server, path = targets[k % len(targets)]
            words = rng.randint(1, 30)
            calls.append(
                Call(
                    n=len(calls),
                    server=server,
                    path=path,
                    user=user,
                    plan=plan,
                    feature=rng.choice(FEATURES),
                    model=rng.choice(MODELS),
                    kind=rng.choice(KINDS),
                    words=words,
                    max_tokens=rng.randint(1, 24),
                    cache_hit=rng.randint(0, words),
                )
            )
    rng.shuffle(calls)
    return calls


async def send_all_at_once(calls: list[Call], urls: dict[str, str]) -> dict[int, str]:
    """Every request in flight at the same time; the worker that answered each one."""
    limits = httpx2.Limits(max_connections=len(calls), max_keepalive_connections=0)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as http:

        async def send(call: Call) -> tuple[int, str]:
            response = await http.get(f"{urls[call.server]}{call.path}", params=call.params())
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["n"] == str(call.n)
            return call.n, body["worker"]

        return dict(await asyncio.gather(*(send(call) for call in calls)))


# -- what must be stored -------------------------------------------------------------------


MEASURES = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
)


def expected(calls: Iterable[Call]) -> dict[str, Any]:
    calls = list(calls)
    sums: dict[str, Any] = {
        "requests": len(calls),
        "errors": 0,
        "cost_usd": Decimal(sum(c.cost_nano for c in calls)).scaleb(-9),
        "unpriced_requests": 0,
    }
    for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"):
        sums[name] = sum(c.tokens[name] for c in calls)
    return sums


def measured(totals: Any) -> dict[str, Any]:
    return {name: getattr(totals, name) for name in MEASURES}


def grouped(calls: Iterable[Call], key: str) -> dict[str, list[Call]]:
    groups: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        groups[getattr(call, key)].append(call)
    return groups


def assert_store_matches(url: str, calls: list[Call], workers: dict[int, str]) -> None:
    by_n = {call.n: call for call in calls}
    with Tally(url, instrument=False) as tally:
        rows = list(tally.iter_records())
        assert len(rows) == len(calls)
        assert {int(row["properties"]["n"]) for row in rows} == set(by_n), "a call is missing"
        for row in rows:
            call = by_n[int(row["properties"]["n"])]
            assert row["user_id"] == call.user, row
            assert row["properties"] == {
                "plan": call.plan,
                "feature": call.feature,
                "n": str(call.n),
                "worker": workers[call.n],  # stored by the process that served it
            }, row
            assert {name: row[name] for name in call.tokens} == call.tokens, row
            assert row["response_model"] == call.response_model, row
            assert (row["status"], row["usage_source"]) == ("ok", "provider"), row
            assert row["cost_nano_usd"] == call.cost_nano, row

        users = grouped(calls, "user")
        for user, user_calls in users.items():
            totals = tally.user_totals(user)
            assert type(totals.cost_usd) is Decimal
            assert measured(totals) == expected(user_calls), user
        listed = tally.users(limit=1000)
        assert {t.user_id: t for t in listed} == {u: tally.user_totals(u) for u in users}
        costs = [t.cost_usd for t in listed]
        assert costs == sorted(costs, reverse=True)
        assert tally.count_users() == USERS

        dimensions = {"plan": "plan", "model": "response_model", "feature": "feature"}
        for dimension, key in dimensions.items():
            groups = {
                value: {**expected(group), "users": len({c.user for c in group})}
                for value, group in grouped(calls, key).items()
            }
            got = {g.value: {**measured(g), "users": g.users} for g in tally.totals_by(dimension)}
            assert got == groups, dimension
        total = tally.totals()
        assert {**measured(total), "users": total.users} == {**expected(calls), "users": USERS}
        assert_rollups_match_raw(tally.engine)


# -- the servers -----------------------------------------------------------------------------


def uvicorn_workers(port: int, workers: int) -> list[str]:
    return python_command(
        "-m",
        "uvicorn",
        "--factory",
        "tests.served_app:make_fastapi_app",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
    )


def gunicorn_flask(port: int, workers: int) -> list[str]:
    return python_command(
        "-m",
        "gunicorn",
        "--config",
        "python:tests.gunicorn_conf",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
        "--threads",
        "8",
        "tests.served_app:make_flask_app()",
    )


def run_servers(
    servers: dict[str, tuple[list[str], int, int]],
    db_url: str,
    fake_llm: FakeServer,
    calls: list[Call],
) -> dict[int, str]:
    """Start every server, send every call at once, stop the servers with SIGTERM (their
    graceful shutdown); the worker that answered each call."""
    env = {"TEST_DB_URL": db_url, "TEST_LLM_URL": fake_llm.base_url}
    with ExitStack() as stack:
        started: dict[str, tuple[ServerProcess, int]] = {}
        for name, (command, port, workers) in servers.items():
            started[name] = stack.enter_context(serve(command, port, env)), workers
        for server, workers in started.values():
            server.wait_ready(workers)
        urls = {name: server.url for name, (server, _) in started.items()}
        answered_by = asyncio.run(send_all_at_once(calls, urls))
        for server, _ in started.values():
            server.process.terminate()
        for server, _ in started.values():
            server.process.wait(30)
    for name, (server, workers) in started.items():
        assert "llm-tally" not in server.stderr, server.stderr
        served = {answered_by[c.n] for c in calls if c.server == name}
        assert len(served) == workers, f"{name}: only {len(served)} worker(s) served calls"
    return answered_by


@pytest.mark.postgres
def test_uvicorn_workers_and_gunicorn_workers_share_one_postgresql_store_exactly(
    pg_url: str, fake_llm: FakeServer
) -> None:
    uvicorn_port, gunicorn_port = free_port(), free_port()
    servers = {
        "fastapi": (uvicorn_workers(uvicorn_port, 4), uvicorn_port, 4),
        "flask": (gunicorn_flask(gunicorn_port, 2), gunicorn_port, 2),
    }
    targets = [("fastapi", "/ask"), ("flask", "/ask"), ("fastapi", "/ask-sync"), ("flask", "/ask")]
    calls = plan_calls(1, targets)
    workers = run_servers(servers, pg_url, fake_llm, calls)
    assert_store_matches(pg_url, calls, workers)


def test_uvicorn_workers_share_one_sqlite_file_exactly(
    tmp_path: Path, fake_llm: FakeServer
) -> None:
    db_url = f"sqlite:///{tmp_path / 'usage.db'}"
    port = free_port()
    servers = {"fastapi": (uvicorn_workers(port, 4), port, 4)}
    calls = plan_calls(2, [("fastapi", "/ask"), ("fastapi", "/ask-sync")])
    workers = run_servers(servers, db_url, fake_llm, calls)
    assert_store_matches(db_url, calls, workers)

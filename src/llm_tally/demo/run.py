"""``llm-tally demo``: scripted users on different plans call a fake LLM; print what they cost."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile

import openai

import llm_tally
from llm_tally import Tally

from .fake_llm import FakeLLM
from .serve import BackgroundServer

USERS = (
    ("alice@example.com", "free"),
    ("bob@example.com", "pro"),
    ("carol@example.com", "pro"),
    ("dave@example.com", "enterprise"),
)
FEATURES = ("chat", "search", "summarize")


def _script(client: openai.OpenAI, rng: random.Random) -> None:
    for user_id, plan in USERS:
        calls = {"free": 3, "pro": 8, "enterprise": 15}[plan]
        with llm_tally.user(user_id, plan=plan):
            for _ in range(calls):
                llm_tally.tag(feature=rng.choice(FEATURES))
                words = " ".join(["word"] * rng.randint(5, 200))
                kind = rng.random()
                if kind < 0.5:
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": words}],
                        max_completion_tokens=rng.randint(20, 400),
                    )
                elif kind < 0.8:
                    stream = client.chat.completions.create(
                        model="gpt-4o",
                        messages=[{"role": "user", "content": words}],
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    for _chunk in stream:
                        pass
                else:
                    client.embeddings.create(model="text-embedding-3-small", input=words)


async def _async_script(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0)

    async def ask(user_id: str) -> None:
        async with llm_tally.user(user_id, plan="pro", feature="agent"):
            await client.responses.create(
                model="o4-mini", input="plan my week", max_output_tokens=300
            )

    await asyncio.gather(*(ask(u) for u, plan in USERS if plan == "pro"))
    await client.close()


def run_demo(database_url: str | None = None, seed: int = 7) -> None:
    """Run the scripted demo against the built-in fake LLM and print per-user totals."""
    if database_url is None:
        directory = tempfile.mkdtemp(prefix="llm-tally-demo-")
        database_url = f"sqlite:///{os.path.join(directory, 'demo.db')}"
    fake = FakeLLM()
    with BackgroundServer(fake.app) as server, Tally(database_url) as tally:
        base_url = f"{server.url}/v1"
        print(f"Fake OpenAI-compatible API on {base_url}; usage stored in {database_url}\n")
        client = openai.OpenAI(base_url=base_url, api_key="demo", max_retries=0)
        _script(client, random.Random(seed))
        asyncio.run(_async_script(base_url))
        tally.flush()
        header = f"{'user':<20} {'requests':>8} {'input':>8} {'output':>8} {'cost (USD)':>14}"
        print(header)
        print("-" * len(header))
        for totals in tally.users(order_by="cost"):
            print(
                f"{totals.user_id or '-':<20} {totals.requests:>8} {totals.input_tokens:>8} "
                f"{totals.output_tokens:>8} {totals.cost_usd:>14}"
            )
        print(f"\n{len(fake.ledger)} calls made; every one recorded with exact cost.")
        print(
            f'Try: python -c "from llm_tally import Tally; print(Tally({database_url!r}).users())"'
        )

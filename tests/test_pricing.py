"""Cost: exact, from genai-prices, priced the way the provider bills; unknown is never zero."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

import genai_prices
import httpx2
import openai
import pytest

import llm_tally
from llm_tally import Tally
from llm_tally._money import nano_to_usd, usd_to_nano
from llm_tally._pricing import Pricer, TokenUsage, base_model

from .conftest import only_row, stored_rows

MESSAGES = [{"role": "user", "content": "hello"}]


def expected_nano(model: str, provider: str, **usage: int) -> int:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider)
    return int((price.total_price * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def chat_client(model: str, usage: dict[str, object]) -> openai.OpenAI:
    """A client of OpenAI's API answered in memory with the given usage."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200,
            json={
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            },
        )

    return openai.OpenAI(
        api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(handler))
    )


def test_plain_cost_is_exact(tally: Tally) -> None:
    c = chat_client(
        "gpt-4o-2024-08-06", {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}
    )
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    row = only_row(tally)
    assert row["cost_nano_usd"] == expected_nano(
        "gpt-4o-2024-08-06", "openai", input_tokens=1234, output_tokens=567
    )
    # $2.50 / M input and $10 / M output: written out, so a pricing regression is visible.
    assert nano_to_usd(row["cost_nano_usd"]) == Decimal("0.003085") + Decimal("0.00567")
    assert row["cost_source"] == "genai-prices"


def test_cached_input_tokens_are_priced_at_the_cache_rate(tally: Tally) -> None:
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 100,
        "total_tokens": 2100,
        "prompt_tokens_details": {"cached_tokens": 1500},
    }
    chat_client("gpt-4o-mini-2024-07-18", usage).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    row = only_row(tally)
    assert row["input_tokens"] == 2000 and row["cached_input_tokens"] == 1500
    assert row["cost_nano_usd"] == expected_nano(
        "gpt-4o-mini", "openai", input_tokens=2000, cache_read_tokens=1500, output_tokens=100
    )
    uncached = expected_nano("gpt-4o-mini", "openai", input_tokens=2000, output_tokens=100)
    assert row["cost_nano_usd"] < uncached


def test_reasoning_tokens_are_billed_as_output(tally: Tally) -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 900,
        "total_tokens": 1000,
        "completion_tokens_details": {"reasoning_tokens": 800},
    }
    chat_client("o3-mini-2025-01-31", usage).chat.completions.create(
        model="o3-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    row = only_row(tally)
    assert row["reasoning_tokens"] == 800
    assert row["cost_nano_usd"] == expected_nano(
        "o3-mini", "openai", input_tokens=100, output_tokens=900
    )


def test_embeddings_cost(tally: Tally) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200,
            json={
                "object": "list",
                "model": "text-embedding-3-large",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
                "usage": {"prompt_tokens": 10_000, "total_tokens": 10_000},
            },
        )

    c = openai.OpenAI(
        api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(handler))
    )
    c.embeddings.create(model="text-embedding-3-large", input="x", encoding_format="float")
    assert only_row(tally)["cost_nano_usd"] == expected_nano(
        "text-embedding-3-large", "openai", input_tokens=10_000
    )


def test_unknown_dated_snapshot_falls_back_to_its_base_model(tally: Tally) -> None:
    c = chat_client(
        "gpt-4o-mini-2099-01-01", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    )
    c.chat.completions.create(model="gpt-4o-mini-2099-01-01", messages=MESSAGES)  # type: ignore[arg-type]
    row = only_row(tally)
    assert row["cost_source"] == "genai-prices:base-model"
    assert row["cost_nano_usd"] == expected_nano(
        "gpt-4o-mini", "openai", input_tokens=10, output_tokens=5
    )


def test_unknown_model_has_null_cost_and_is_flagged(tally: Tally) -> None:
    c = chat_client(
        "my-private-model", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    )
    with llm_tally.user("u1"):
        c.chat.completions.create(model="my-private-model", messages=MESSAGES)  # type: ignore[arg-type]
    row = only_row(tally)
    assert row["cost_nano_usd"] is None and row["cost_source"] == "unknown"
    totals = tally.user_totals("u1")
    assert totals.unpriced_requests == 1 and totals.requests == 1
    assert totals.input_tokens == 10


def test_custom_price_for_a_fine_tune(tally: Tally) -> None:
    tally.set_price(
        "ft:gpt-4o-mini:acme::abc",
        input_per_mtok="0.30",
        output_per_mtok=Decimal("1.20"),
        cached_input_per_mtok="0.15",
    )
    usage = {
        "prompt_tokens": 1_000_000,
        "completion_tokens": 500_000,
        "total_tokens": 1_500_000,
        "prompt_tokens_details": {"cached_tokens": 200_000},
    }
    chat_client("ft:gpt-4o-mini:acme::abc", usage).chat.completions.create(
        model="ft:gpt-4o-mini:acme::abc",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    row = only_row(tally)
    assert row["cost_source"] == "custom"
    # 800k * 0.30 + 200k * 0.15 + 500k * 1.20, per million
    assert nano_to_usd(row["cost_nano_usd"]) == Decimal("0.24") + Decimal("0.03") + Decimal("0.60")


@pytest.mark.parametrize("bad", [0.3, -1, "abc", True])
def test_custom_price_rejects_inexact_or_invalid_values(tally: Tally, bad: object) -> None:
    with pytest.raises(ValueError, match="input_per_mtok"):
        tally.set_price("m", input_per_mtok=bad, output_per_mtok=1)  # type: ignore[arg-type]


def test_cost_is_computed_once_at_write_time(tally: Tally) -> None:
    c = chat_client(
        "gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 0, "total_tokens": 1000}
    )
    c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    before = only_row(tally)["cost_nano_usd"]
    tally.set_price("gpt-4o-mini", input_per_mtok=100, output_per_mtok=100)
    c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    first, second = stored_rows(tally)
    assert first["cost_nano_usd"] == before  # history is not rewritten
    assert second["cost_nano_usd"] == 100_000_000


def test_money_helpers_are_exact() -> None:
    assert usd_to_nano(Decimal("0.0000000015")) == 2  # half to even
    assert usd_to_nano(Decimal("0.0000000025")) == 2
    assert usd_to_nano("1.23") == 1_230_000_000
    assert nano_to_usd(1) == Decimal("0.000000001")
    with pytest.raises(TypeError):
        usd_to_nano(0.1)  # type: ignore[arg-type]


def test_base_model_strips_only_date_suffixes() -> None:
    assert base_model("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert base_model("gpt-4-0613") == "gpt-4"
    assert base_model("o3-mini-20250131") == "o3-mini"
    assert base_model("gpt-4o-mini") is None


def test_pricer_uses_historical_prices_for_the_call_time() -> None:
    pricer = Pricer()
    usage = TokenUsage(input_tokens=1000, output_tokens=1000)
    when = datetime(2025, 6, 1, tzinfo=UTC)
    cost, source = pricer.cost_nano_usd("openai", ("gpt-4o",), usage, when)
    price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, output_tokens=1000),
        "gpt-4o",
        provider_id="openai",
        genai_request_timestamp=when,
    )
    assert cost == usd_to_nano(price.total_price) and source == "genai-prices"


def test_fast_per_token_rates_give_exactly_genai_prices_totals() -> None:
    """Every model of OpenAI, Anthropic and Google in genai-prices, many random usages."""
    import random

    from genai_prices import data_snapshot

    rng = random.Random(42)
    pricer = Pricer()
    when = datetime(2026, 11, 1, tzinfo=UTC)
    checked = 0
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id not in ("openai", "anthropic", "google", "azure", "groq"):
            continue
        for model in provider.models:
            for _ in range(5):
                input_tokens = rng.randint(0, 2_000_000)
                cached = rng.randint(0, input_tokens)
                write = rng.randint(0, input_tokens - cached)
                usage = TokenUsage(input_tokens, rng.randint(0, 500_000), cached, write)
                try:
                    expected = genai_prices.calc_price(
                        genai_prices.Usage(
                            input_tokens=usage.input_tokens,
                            output_tokens=usage.output_tokens,
                            cache_read_tokens=cached,
                            cache_write_tokens=write,
                        ),
                        model.id,
                        provider_id=provider.id,
                        genai_request_timestamp=when,
                    ).total_price
                except (LookupError, ValueError):
                    continue
                cost, _ = pricer.cost_nano_usd(provider.id, (model.id,), usage, when)
                assert cost == usd_to_nano(expected), (provider.id, model.id, usage)
                checked += 1
    assert checked > 500
    fast = [rates for _, rates, _ in pricer._rates.values() if rates is not None]
    assert len(fast) > 100  # the per-token fast path was taken, not only genai-prices' own
    whole = [nano for _, _, nano in pricer._rates.values() if nano is not None]
    assert len(whole) > 50  # ...and its exact integer form for whole nano-USD rates

"""Exact cost of a call, from genai-prices' price data (no price table of our own)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from genai_prices import Usage, data_snapshot
from genai_prices.types import ModelPrice

from ._money import usd_to_nano
from ._time import from_epoch_us

COST_GENAI_PRICES = "genai-prices"
COST_BASE_MODEL = "genai-prices:base-model"  # a dated snapshot priced as its base model
COST_CUSTOM = "custom"
COST_GIVEN = "given"
COST_UNKNOWN = "unknown"  # no price found: cost is NULL, never a silent zero

# Provider name recorded for an OpenAI-compatible server genai-prices does not know.
UNKNOWN_PROVIDER = "openai-compatible"

# gpt-4o-mini-2099-01-01 -> gpt-4o-mini, gpt-4-0613 -> gpt-4, o3-mini-20250131 -> o3-mini
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
_ONE_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts (OpenAI convention: ``input_tokens`` includes cached and cache writes)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0


def base_model(model: str) -> str | None:
    """The undated model name of a dated snapshot, or None if ``model`` has no date suffix."""
    stripped = _SNAPSHOT_SUFFIX.sub("", model)
    return stripped if stripped != model else None


class Pricer:
    """Looks up prices: custom prices first, then genai-prices, then the base model."""

    def __init__(self) -> None:
        self._custom: dict[str, ModelPrice] = {}
        self._rates: dict[int, tuple[ModelPrice, Rates | None, NanoRates | None]] = {}
        self._lock = threading.Lock()

    def set_price(
        self,
        model: str,
        *,
        input_per_mtok: Decimal | str | int,
        output_per_mtok: Decimal | str | int,
        cached_input_per_mtok: Decimal | str | int | None = None,
        cache_write_per_mtok: Decimal | str | int | None = None,
    ) -> None:
        """Price ``model`` (exact name, case-insensitive) in USD per million tokens."""
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        prices = {
            "input_mtok": input_per_mtok,
            "output_mtok": output_per_mtok,
            "cache_read_mtok": cached_input_per_mtok,
            "cache_write_mtok": cache_write_per_mtok,
        }
        checked: dict[str, Decimal | None] = {}
        for key, value in prices.items():
            if value is None:
                checked[key] = None
                continue
            if isinstance(value, float | bool) or not isinstance(value, Decimal | str | int):
                raise ValueError(
                    f"{key.replace('_mtok', '_per_mtok')} must be a Decimal, str or int "
                    f"(floats are inexact), got {value!r}"
                )
            try:
                amount = Decimal(value)
            except ArithmeticError:
                raise ValueError(
                    f"{key.replace('_mtok', '_per_mtok')} is not a number: {value!r}"
                ) from None
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"{key.replace('_mtok', '_per_mtok')} must be >= 0, got {value!r}")
            checked[key] = amount
        with self._lock:
            self._custom = {**self._custom, model.lower(): ModelPrice(**checked)}

    def cost_nano_usd(
        self,
        provider: str,
        models: tuple[str | None, ...],
        usage: TokenUsage,
        when: datetime | int | None = None,
        base_url: str | None = None,
    ) -> tuple[int | None, str]:
        """The cost in nano-USD and where it came from; ``(None, "unknown")`` when unpriced.

        ``when`` is the call's time (a datetime or epoch microseconds; default now): prices
        that changed over time are taken as they were then.
        """
        names = [m for m in models if m]
        custom = self._custom
        for name in names:
            price = custom.get(name.lower())
            if price is not None:
                return self._cost_nano(price, usage), COST_CUSTOM
        if when is None:
            when = datetime.now(tz=UTC)
        for name in names:
            price = _model_price(name, provider, base_url, when)
            if price is not None:
                return self._cost_nano(price, usage), COST_GENAI_PRICES
        for name in names:
            base = base_model(name)
            if base is None:
                continue
            price = _model_price(base, provider, base_url, when)
            if price is not None:
                return self._cost_nano(price, usage), COST_BASE_MODEL
        return None, COST_UNKNOWN

    def _cost_nano(self, price: ModelPrice, usage: TokenUsage) -> int:
        """Nano-USD for ``usage`` at ``price``: genai-prices' own arithmetic, or its rates.

        ``ModelPrice.calc_price`` costs ~50 µs; for plain per-token prices (no tiers, no
        per-request fee) the same total is four multiplications. The rates are taken from
        genai-prices and checked against its ``calc_price`` once per price before they are
        used. Most prices are whole nano-USD per token ($0.15 / M = 150): then the sum is in
        integers, exact, with nothing to round.
        """
        cached = self._rates.get(id(price))
        if cached is None or cached[0] is not price:
            rates = _linear_rates(price)
            cached = (price, rates, _whole_nano_rates(rates))
            with self._lock:
                self._rates[id(price)] = cached
        _, rates, nano_rates = cached
        if nano_rates is not None:
            uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
            return (
                nano_rates[0] * uncached
                + nano_rates[1] * usage.cached_input_tokens
                + nano_rates[2] * usage.cache_write_tokens
                + nano_rates[3] * usage.output_tokens
            )
        if rates is not None:
            return usd_to_nano(_linear_total(rates, usage))
        return usd_to_nano(price.calc_price(_genai_usage(usage))["total_price"])


_RATE_KEYS = ("input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok")
_PROBES = (  # input (incl. cached and cache writes), output, cached, cache writes
    TokenUsage(1_000_003, 500_009, 300_007, 200_001),
    TokenUsage(7, 11, 0, 0),
    TokenUsage(13, 0, 5, 3),
)
Rates = tuple[Decimal, Decimal, Decimal, Decimal]
NanoRates = tuple[int, int, int, int]
_NANO_PER_TOKEN_PER_USD_PER_MTOK = 1000  # $1 / 1M tokens = 1,000 nano-USD per token


def _whole_nano_rates(rates: Rates | None) -> NanoRates | None:
    """The rates in nano-USD per token, when all are whole numbers."""
    if rates is None:
        return None
    nano = [rate * _NANO_PER_TOKEN_PER_USD_PER_MTOK for rate in rates]
    if any(value != value.to_integral_value() for value in nano):
        return None
    return (int(nano[0]), int(nano[1]), int(nano[2]), int(nano[3]))


def _genai_usage(usage: TokenUsage) -> Usage:
    return Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )


def _linear_total(rates: Rates, usage: TokenUsage) -> Decimal:
    uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    return (
        rates[0] * uncached
        + rates[1] * usage.cached_input_tokens
        + rates[2] * usage.cache_write_tokens
        + rates[3] * usage.output_tokens
    ) / _ONE_MILLION


def _linear_rates(price: ModelPrice) -> Rates | None:
    """Per-million-token rates of a plain price, or None when only genai-prices can price it."""
    fields = {k: v for k, v in vars(price).items() if v is not None and not k.startswith("_")}
    if not all(isinstance(v, Decimal) for v in fields.values()):
        return None  # tiered prices depend on the call's size
    if "requests_kcount" in fields:
        return None  # a per-request fee
    # Other units (web searches, audio, images) are never in the token usage we price; the
    # probes below prove the rates reproduce genai-prices for what we do price.
    zero = Decimal(0)
    input_rate = fields.get("input_mtok", zero)
    rates: Rates = (
        input_rate,
        fields.get("cache_read_mtok", input_rate),
        fields.get("cache_write_mtok", input_rate),
        fields.get("output_mtok", zero),
    )
    for probe in _PROBES:
        try:
            expected = price.calc_price(_genai_usage(probe))["total_price"]
        except ValueError:
            return None
        if _linear_total(rates, probe) != expected:
            return None
    return rates


def _model_price(
    model: str, provider: str, base_url: str | None, when: datetime | int
) -> ModelPrice | None:
    # A known provider id prices exactly; an unknown OpenAI-compatible server is matched by
    # its URL if genai-prices knows it, else by the model name alone.
    attempts: list[tuple[str | None, str | None]]
    if provider and provider != UNKNOWN_PROVIDER:
        attempts = [(provider, None)]
    else:
        # An unknown OpenAI-compatible server: genai-prices may know it by URL, or guess the
        # provider from the model name; OpenAI's own price is the last resort for OpenAI names.
        attempts = [(None, base_url)] if base_url else []
        attempts += [(None, None), ("openai", None)]
    snapshot = data_snapshot.get_snapshot()
    for provider_id, api_url in attempts:
        try:
            _, info = snapshot.find_provider_model(model, None, provider_id, api_url)
        except LookupError:
            continue
        if isinstance(info.prices, ModelPrice):
            return info.prices  # one price for all times: no need to know when
        return info.get_prices(when if isinstance(when, datetime) else from_epoch_us(when))
    return None

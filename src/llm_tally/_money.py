"""Exact money: costs are stored as integer nano-USD (1 USD = 10**9)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

NANO_PER_USD = 10**9
_ONE = Decimal(1)


def usd_to_nano(amount: Decimal | int | str) -> int:
    """Convert a USD amount to integer nano-USD, rounding half to even (error < 0.5 nano-USD)."""
    if isinstance(amount, float):
        raise TypeError("money must be Decimal, int or str, never float (floats are inexact)")
    value = Decimal(amount) * NANO_PER_USD
    return int(value.quantize(_ONE, rounding=ROUND_HALF_EVEN))


def nano_to_usd(nano: int) -> Decimal:
    """Convert integer nano-USD back to an exact Decimal of USD."""
    return Decimal(nano).scaleb(-9)


_NANO = Decimal("0.000000001")


def round_usd(amount: Decimal) -> Decimal:
    """``amount`` rounded half to even to the nano-dollar."""
    return amount.quantize(_NANO, rounding=ROUND_HALF_EVEN)


def average_usd(amount: Decimal, count: int) -> Decimal:
    """``amount / count`` rounded half to even to the nano-dollar; 0 when ``count`` is 0."""
    return round_usd(amount / count) if count else round_usd(Decimal(0))

"""Time as stored: integer microseconds since the Unix epoch, UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TimeBound = datetime | date | None


def to_epoch_us(value: datetime | date, field: str = "time") -> int:
    """A datetime (naive = UTC) or a date (midnight UTC) as epoch microseconds."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=UTC)
    else:
        raise ValueError(f"{field} must be a datetime or a date, got {type(value).__name__}")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def bound_to_epoch_us(value: TimeBound, field: str) -> int | None:
    return None if value is None else to_epoch_us(value, field)


def from_epoch_us(value: int) -> datetime:
    """Epoch microseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(value // 1_000_000, tz=UTC).replace(microsecond=value % 1_000_000)

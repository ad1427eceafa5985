"""Time as stored: integer microseconds since the Unix epoch, UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The times llm-tally accepts, in UTC: far enough inside datetime's range (years 1 to 9999)
#: that a time zone offset, a day or a month added on the way never overflows.
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9998, 12, 1, tzinfo=UTC)

TimeBound = datetime | date | None


def to_epoch_us(value: datetime | date, field: str = "time") -> int:
    """A datetime (naive = UTC) or a date (midnight UTC) as epoch microseconds."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=UTC)
    else:
        raise ValueError(f"{field} must be a datetime or a date, got {type(value).__name__}")
    try:
        in_range = EARLIEST <= moment <= LATEST
    except OverflowError:  # an offset that moves the time out of datetime's range
        in_range = False
    if not in_range:
        raise ValueError(
            f"{field} must be a time from 0001-01-02 to 9998-12-01 (UTC), got {value!r}"
        )
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def bound_to_epoch_us(value: TimeBound, field: str) -> int | None:
    return None if value is None else to_epoch_us(value, field)


def from_epoch_us(value: int) -> datetime:
    """Epoch microseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(value // 1_000_000, tz=UTC).replace(microsecond=value % 1_000_000)


def floor_month(us: int) -> int:
    """The start of the UTC month holding ``us`` (epoch microseconds)."""
    moment = from_epoch_us(us)
    return to_epoch_us(datetime(moment.year, moment.month, 1, tzinfo=UTC))


def next_month(us: int) -> int:
    """The start of the UTC month after the one holding ``us``."""
    moment = from_epoch_us(us)
    year, month = divmod(moment.year * 12 + moment.month, 12)
    return to_epoch_us(datetime(year, month + 1, 1, tzinfo=UTC))


def month_period(
    year: int | None = None, month: int | None = None, tz: str = "UTC"
) -> tuple[datetime, datetime]:
    """``[since, until)`` of a calendar month in the time zone ``tz`` (default: this month).

    ``llm_tally.month_period(tz="Europe/Paris")`` is "this month" for a Paris invoice; pass
    both bounds to any query that takes ``since``/``until``.
    """
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"tz must be an IANA time zone such as 'Europe/Paris', got {tz!r}"
        ) from None
    now = datetime.now(zone)
    year = now.year if year is None else year
    month = now.month if month is None else month
    if not 1 <= month <= 12:
        raise ValueError(f"month must be 1 to 12, got {month!r}")
    since = datetime(year, month, 1, tzinfo=zone)
    until = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=zone)
    return since, until


def parse_time_bound(text: str, field: str) -> date | datetime:
    """A date (``2026-11-01``) or an ISO-8601 datetime (``2026-11-01T00:00:00Z``)."""
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{field}: expected an ISO-8601 date (2026-11-01) or datetime "
            f"(2026-11-01T00:00:00Z), got {text[:64]!r}"
        ) from None

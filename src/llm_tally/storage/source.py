"""Where a report reads a period from: monthly rollups, hourly rollups, and raw calls.

A period ``[since, until)`` is split into whole UTC months, whole UTC hours and the minutes
at its edges. Each part is read from the coarsest table that holds it exactly, and the parts
are put together with ``UNION ALL`` into one subquery (a :class:`Source`) whose rows all
have the same columns: a raw call is a row of one request. Reports then sum those columns.
Every time range is read from exactly one table, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Select,
    Subquery,
    case,
    func,
    literal,
    null,
    select,
    union_all,
)

from .._time import floor_month, next_month
from .models import MEASURES, hourly_table, monthly_users_table, usage_table
from .rollups import US_PER_HOUR, catch_up, pending_rows

Range = tuple[int | None, int | None]
#: The measures that add up (the others are the first and last call's time).
SUMMED = MEASURES[:8]

_c = usage_table.c
_h = hourly_table.c
_m = monthly_users_table.c


def _floor_hour(us: int) -> int:
    return us // US_PER_HOUR * US_PER_HOUR


def _ceil_hour(us: int) -> int:
    return -(-us // US_PER_HOUR) * US_PER_HOUR


def _ceil_month(us: int) -> int:
    start = floor_month(us)
    return start if start == us else next_month(us)


@dataclass(frozen=True)
class Parts:
    """A period as month, hour and raw time ranges (``None``: open-ended)."""

    months: Range | None = None
    hours: list[Range] = field(default_factory=list)
    raw: list[Range] = field(default_factory=list)

    @property
    def only_months(self) -> bool:
        return self.months is not None and not self.hours and not self.raw

    @property
    def single_month(self) -> int | None:
        """The month's start when the period is exactly one UTC month."""
        return one_month(self.months) if self.only_months and self.months else None


def _empty(since: int | None, until: int | None) -> bool:
    return since is not None and until is not None and since >= until


def split_period(since: int | None, until: int | None, months: bool = True) -> Parts:
    """``[since, until)`` as whole UTC months (if ``months``), whole hours and raw edges."""
    if _empty(since, until):
        return Parts()
    hour_start = None if since is None else _ceil_hour(since)
    hour_end = None if until is None else _floor_hour(until)
    if _empty(hour_start, hour_end):
        return Parts(raw=[(since, until)])
    raw: list[Range] = []
    if since is not None and hour_start is not None and since < hour_start:
        raw.append((since, hour_start))
    if until is not None and hour_end is not None and hour_end < until:
        raw.append((hour_end, until))
    month_start = None if hour_start is None else _ceil_month(hour_start)
    month_end = None if hour_end is None else floor_month(hour_end)
    if not months or _empty(month_start, month_end):
        return Parts(hours=[(hour_start, hour_end)], raw=raw)
    hours: list[Range] = []
    if hour_start is not None and month_start is not None and hour_start < month_start:
        hours.append((hour_start, month_start))
    if hour_end is not None and month_end is not None and month_end < hour_end:
        hours.append((month_end, hour_end))
    return Parts(months=(month_start, month_end), hours=hours, raw=raw)


def split_windows(start: int, size: int, count: int) -> Parts:
    """``count`` consecutive windows of ``size`` (a whole number of hours) from ``start``.

    Whole hours inside one window come from the hourly rollup; an hour that a window boundary
    cuts (when ``start`` is not on the hour) is read raw, so each call lands in its window.
    """
    end = start + size * count
    hour_start, hour_end = _ceil_hour(start), _floor_hour(end)
    raw: list[Range] = [(start, min(hour_start, end)), (max(hour_end, start), end)]
    cut = sorted(
        {_floor_hour(start + size * i) for i in range(1, count) if (start + size * i) % US_PER_HOUR}
    )
    raw.extend((hour, hour + US_PER_HOUR) for hour in cut)
    hours: list[Range] = []
    position = hour_start
    for hour in [*cut, hour_end]:
        if position < hour:
            hours.append((position, hour))
        position = max(position, hour + US_PER_HOUR)
    return Parts(hours=hours, raw=[r for r in raw if not _empty(*r)])


def within(column: ColumnElement[Any], span: Range) -> list[ColumnElement[bool]]:
    """The conditions of ``column`` in ``[start, end)`` (None: open-ended)."""
    start, end = span
    conditions: list[ColumnElement[bool]] = []
    if start is not None:
        conditions.append(column >= start)
    if end is not None:
        conditions.append(column < end)
    return conditions


def one_month(span: Range) -> int | None:
    """The start of ``span`` when it is exactly one UTC month."""
    start, end = span
    if start is None or end is None or next_month(start) != end:
        return None
    return start


class _Anyone:
    """Every call, with or without a user."""


ANYONE = _Anyone()
#: Only calls made for a user (``users()``, ``count_users()``).
SOME_USER = object()
Who = str | None | _Anyone | object


def _who(column: ColumnElement[Any], who: Who, rollup: bool) -> list[ColumnElement[bool]]:
    if who is ANYONE:
        return []
    if who is SOME_USER:
        # Not "IS NOT NULL": SQLite would walk the whole (user_id, ts) index for it
        # instead of the period's range of the ts index. User ids are never empty.
        return [func.coalesce(column, "") != ""]
    if who is None:
        return [column == ""] if rollup else [column.is_(None)]
    return [column == who]


def _raw_part(span: Range, who: Who) -> Select[Any]:
    return select(
        _c.ts.label("at"),
        _c.user_id.label("user_id"),
        func.coalesce(_c.response_model, _c.request_model).label("model"),
        _c.provider.label("provider"),
        _c.operation.label("operation"),
        _c.properties.label("properties"),
        literal(1, BigInteger).label("requests"),
        case((_c.status != "ok", 1), else_=0).label("errors"),
        _c.input_tokens,
        _c.output_tokens,
        _c.cached_input_tokens,
        _c.reasoning_tokens,
        func.coalesce(_c.cost_nano_usd, 0).label("cost_nano_usd"),
        case((_c.cost_nano_usd.is_(None), 1), else_=0).label("unpriced"),
        _c.ts.label("first_ts"),
        _c.ts.label("last_ts"),
    ).where(*within(_c.ts, span), *_who(_c.user_id, who, rollup=False))


def _hourly_part(span: Range, who: Who) -> Select[Any]:
    return select(
        _h.hour.label("at"),
        func.nullif(_h.user_key, "").label("user_id"),
        func.nullif(_h.model, "").label("model"),
        _h.provider,
        _h.operation,
        _h.properties,
        *(_h[name] for name in MEASURES),
    ).where(*within(_h.hour, span), *_who(_h.user_key, who, rollup=True))


def _monthly_part(span: Range, who: Who) -> Select[Any]:
    return select(
        _m.month.label("at"),
        func.nullif(_m.user_key, "").label("user_id"),
        null().label("model"),
        null().label("provider"),
        null().label("operation"),
        null().label("properties"),
        *(_m[name] for name in MEASURES),
    ).where(*within(_m.month, span), *_who(_m.user_key, who, rollup=True))


def source(
    since: int | None, until: int | None, who: Who = ANYONE, detail: bool = True
) -> Subquery:
    """The period's calls as summable rows. ``detail``: rows keep model, provider, operation
    and properties (monthly rollups are then not used); ``who``: a user id, ``None`` (calls
    without a user), :data:`ANYONE` or :data:`SOME_USER`."""
    return parts_source(split_period(since, until, months=not detail), who)


def parts_source(parts: Parts, who: Who = ANYONE) -> Subquery:
    # One SELECT per time range: SQLite does not walk an index for a list of OR-ed ranges.
    selects: list[Select[Any]] = [_raw_part(span, who) for span in parts.raw]
    selects.extend(_hourly_part(span, who) for span in parts.hours)
    if parts.months is not None:
        selects.append(_monthly_part(parts.months, who))
    if not selects:
        selects.append(_raw_part((0, 0), who))  # an empty period: no rows
    if len(selects) == 1:
        return selects[0].subquery("calls")
    return union_all(*selects).subquery("calls")


def totals_of(calls: Subquery) -> tuple[ColumnElement[Any], ...]:
    """What every report sums over a group of rows of ``calls``, labelled as result fields."""
    columns = calls.c
    return tuple(func.coalesce(func.sum(columns[name]), 0).label(name) for name in SUMMED)


def seen_of(calls: Subquery) -> tuple[ColumnElement[Any], ...]:
    return (
        func.min(calls.c.first_ts).label("first_ts"),
        func.max(calls.c.last_ts).label("last_ts"),
    )


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection that sees one snapshot of the store, after rolling up what is pending.

    SQLite rolls up first (see rollups.py), then reads in one transaction; PostgreSQL reads
    in one REPEATABLE READ transaction, so that reports of several statements agree.
    """
    if engine.dialect.name == "sqlite":
        if pending_rows(engine):
            catch_up(engine)
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                conn.rollback()
    else:
        connection = engine.connect().execution_options(isolation_level="REPEATABLE READ")
        with connection as conn, conn.begin():
            yield conn

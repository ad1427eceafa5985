"""Retention: deleting the calls, and their sums, of the months before a date."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, delete, func, select, text, update

from .._time import floor_month, from_epoch_us
from . import rollups
from .models import ROLLUP_TABLES, hourly_table, meta_table, usage_table


def check_month_start(before_us: int) -> None:
    """Only whole UTC months can be pruned: a month's sums cannot be split."""
    if floor_month(before_us) != before_us:
        moment = from_epoch_us(before_us)
        raise ValueError(
            f"before must be the first instant of a UTC month (such as "
            f"{moment:%Y-%m}-01), got {moment.isoformat()}: monthly totals cannot be split"
        )


def prune(engine: Engine, before_us: int) -> int:
    """Delete every call before ``before_us`` (a UTC month start) and the rollup rows of those
    hours and months, in one transaction. Returns how many calls were deleted.

    Reports over later periods are unchanged. On SQLite the stored calls are rolled up first
    and the watermark is lowered to the newest remaining rowid, so that rows inserted later
    (whose rowids SQLite may reuse) are still rolled up.
    """
    check_month_start(before_us)
    rollups.catch_up(engine)
    with engine.begin() as conn:
        if rollups.lazy(engine):
            # Take the write lock first, and roll up what arrived since.
            conn.execute(
                text(f"UPDATE {meta_table.name} SET value = value WHERE key = :key"),
                {"key": rollups.WATERMARK_KEY},
            )
        deleted = conn.execute(delete(usage_table).where(usage_table.c.ts < before_us)).rowcount
        for table in ROLLUP_TABLES:
            time = table.c.hour if table is hourly_table else table.c.month
            conn.execute(delete(table).where(time < before_us))
        if rollups.lazy(engine):
            newest = conn.execute(select(func.max(text("rowid"))).select_from(usage_table))
            watermark = min(int(newest.scalar() or 0), _watermark(conn))
            conn.execute(
                update(meta_table)
                .where(meta_table.c.key == rollups.WATERMARK_KEY)
                .values(value=str(watermark))
            )
    return int(deleted)


def _watermark(conn: Connection) -> int:
    value = conn.execute(
        select(meta_table.c.value).where(meta_table.c.key == rollups.WATERMARK_KEY)
    ).scalar()
    return int(value or 0)

"""Retention: deleting the calls, and their sums, of the months before a date."""

from __future__ import annotations

from sqlalchemy import Engine, delete

from .._time import floor_month, from_epoch_us
from . import rollups
from .models import ROLLUP_TABLES, hourly_table, usage_table


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
    lazy = rollups.lazy(engine)
    with engine.begin() as conn:
        # Under the write lock: what arrives meanwhile waits, and keeps rowids above ours.
        watermark = rollups.lock_watermark(conn)[0] if lazy else 0
        deleted = conn.execute(delete(usage_table).where(usage_table.c.ts < before_us)).rowcount
        for table in ROLLUP_TABLES:
            time = table.c.hour if table is hourly_table else table.c.month
            conn.execute(delete(table).where(time < before_us))
        if lazy:
            rollups.set_watermark(conn, min(rollups.newest_rowid(conn), watermark))
    return int(deleted)

"""Keeping the rollups up to date: set-based ``INSERT ... SELECT ... GROUP BY`` upserts.

Each stored call is added to its rollup rows exactly once:

- **PostgreSQL** rolls up every batch in the transaction that inserts it. The upserts are
  atomic, so writers in several processes never lose an update.
- **SQLite** rolls up lazily, in large chunks: in the writer when it is idle or when many
  rows wait, and before every report. The rows already rolled up are those up to the rowid
  kept in ``llm_tally_meta`` under ``rolled_up_to``, which the roll-up advances in the same
  transaction. SQLite has one writer at a time and gives new rows increasing rowids, so the
  watermark is exact across processes. Rolling up 2,000 rows per insert would cut SQLite
  ingestion several times over (measured in docs/performance.md); a chunk of 100,000 rows
  touches each rollup page once instead of once per batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Select, func, literal_column, select, text, update

from .._time import floor_month, next_month
from .models import (
    MEASURES,
    hourly_table,
    meta_table,
    monthly_groups_table,
    monthly_pairs_table,
    monthly_users_table,
    monthly_values_table,
    usage_table,
)

#: Dimensions that are columns of a call rather than properties. Properties with these
#: names would be shadowed in ``totals_by``: they are not rolled up.
BUILT_IN_DIMENSIONS = ("user", "model", "provider", "operation")
WATERMARK_KEY = "rolled_up_to"
CHUNK_ROWS = 100_000
US_PER_HOUR = 3_600_000_000

_AGGREGATES = (
    "count(*), "
    "sum(CASE WHEN u.status <> 'ok' THEN 1 ELSE 0 END), "
    "sum(u.input_tokens), sum(u.output_tokens), sum(u.cached_input_tokens), "
    "sum(u.reasoning_tokens), coalesce(sum(u.cost_nano_usd), 0), "
    "sum(CASE WHEN u.cost_nano_usd IS NULL THEN 1 ELSE 0 END), min(u.ts), max(u.ts)"
)
_MODEL = "coalesce(u.response_model, u.request_model, '')"
_USER = "coalesce(u.user_id, '')"
_HOUR = f"(u.ts / {US_PER_HOUR}) * {US_PER_HOUR}"
_EACH = {
    "sqlite": "json_each(u.properties) AS p",
    "postgresql": "jsonb_each_text(u.properties) AS p",
}
_HOURLY_KEY = {
    "sqlite": "hour, user_key, provider, operation, model, properties",
    "postgresql": "hour, user_key, provider, operation, model, md5(CAST(properties AS TEXT))",
}
_OWN_NAMES = ", ".join(f"'{name}'" for name in BUILT_IN_DIMENSIONS)


def _upsert(dialect: str, table: str, keys: Sequence[str], conflict: str, select: str) -> str:
    smaller, larger = ("min", "max") if dialect == "sqlite" else ("LEAST", "GREATEST")
    updates = []
    for name in MEASURES:
        if name == "first_ts":
            value = f"{smaller}({table}.{name}, excluded.{name})"
        elif name == "last_ts":
            value = f"{larger}({table}.{name}, excluded.{name})"
        else:
            value = f"{table}.{name} + excluded.{name}"
        updates.append(f"{name} = {value}")
    return (
        f"INSERT INTO {table} ({', '.join((*keys, *MEASURES))}) {_in_key_order(select)} "
        f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)}"
    )


def _in_key_order(select: str) -> str:
    """``select`` (ending with ``GROUP BY <its keys>``) ordered by its keys: concurrent
    PostgreSQL writers then lock rollup rows in one order, and cannot deadlock."""
    keys = select.rsplit("GROUP BY", 1)[1]
    return f"{select} ORDER BY{keys}"


def _month_of_ts(first: int, last: int) -> str:
    """SQL for the UTC month start of ``u.ts``, for calls between ``first`` and ``last``.

    A CASE over the few month boundaries of a chunk: a date function per call costs more
    than the rest of the roll-up.
    """
    starts = [floor_month(first)]
    while starts[-1] <= last:
        starts.append(next_month(starts[-1]))
    branches = " ".join(
        f"WHEN u.ts < {end} THEN {start}" for start, end in itertools.pairwise(starts)
    )
    return f"CASE {branches} END"


def _statements(dialect: str, selection: str, month: str) -> list[str]:
    """The upserts that add the calls matching ``selection`` (SQL over ``u``) to every rollup;
    ``month`` is the SQL of a call's month."""
    calls = f"FROM {usage_table.name} AS u WHERE {selection}"
    properties = (
        f"FROM {usage_table.name} AS u, {_EACH[dialect]} "
        f"WHERE {selection} AND p.key NOT IN ({_OWN_NAMES})"
    )
    hourly = _upsert(
        dialect,
        hourly_table.name,
        ("hour", "user_key", "provider", "operation", "model", "properties"),
        _HOURLY_KEY[dialect],
        f"SELECT {_HOUR}, {_USER}, u.provider, u.operation, {_MODEL}, u.properties, "
        f"{_AGGREGATES} {calls} GROUP BY 1, 2, 3, 4, 5, 6",
    )
    monthly_users = _upsert(
        dialect,
        monthly_users_table.name,
        ("month", "user_key"),
        "month, user_key",
        f"SELECT {month}, {_USER}, {_AGGREGATES} {calls} GROUP BY 1, 2",
    )
    group_keys = ("month", "dimension", "value", "user_key")
    monthly_groups = []
    for dimension, value, source in (("'model'", _MODEL, calls), ("p.key", "p.value", properties)):
        keys = f"{month} AS month, {dimension} AS dimension, {value} AS value, {_USER} AS user_key"
        upsert = _upsert(
            dialect,
            monthly_groups_table.name,
            group_keys,
            ", ".join(group_keys),
            f"SELECT {keys}, {_AGGREGATES} {source} GROUP BY 1, 2, 3, 4",
        )
        monthly_groups.append(
            _counting_new_users(dialect, f"SELECT DISTINCT {keys} {source}", upsert)
        )
    pair_keys = ("month", "model", "dimension", "value")
    monthly_pairs = [
        _upsert(dialect, monthly_pairs_table.name, pair_keys, ", ".join(pair_keys), select)
        for select in (
            f"SELECT {month}, {_MODEL}, p.key, p.value, {_AGGREGATES} {properties} "
            "GROUP BY 1, 2, 3, 4",
            f"SELECT {month}, {_MODEL}, '', '', {_AGGREGATES} {calls} GROUP BY 1, 2",
        )
    ]
    return [hourly, monthly_users, *itertools.chain(*monthly_groups), *monthly_pairs]


_VALUES = monthly_values_table.name
_GROUPS = monthly_groups_table.name
_ADD_USERS = (
    f"ON CONFLICT (dimension, month, value) DO UPDATE SET users = {_VALUES}.users + excluded.users"
)


def _counting_new_users(dialect: str, keys: str, upsert: str) -> list[str]:
    """``upsert`` into the groups rollup, and add the (month, value, user) rows it creates
    to the users of each value in the values rollup (``keys`` selects the upsert's keys).

    PostgreSQL counts the rows the upsert inserted (``xmax = 0``): concurrent writers
    adding the same new user wait on the row's lock, and only one of them inserts it. On
    SQLite, whose roll-ups never run at once, the rows not there yet are counted first.
    """
    if dialect == "postgresql":
        returning = f"{upsert} RETURNING dimension, month, value, user_key, (xmax = 0) AS new"
        return [
            f"WITH changed AS ({returning}) "
            f"INSERT INTO {_VALUES} (dimension, month, value, users) "
            "SELECT dimension, month, value, count(*) FROM changed "
            f"WHERE new AND user_key <> '' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 {_ADD_USERS}"
        ]
    new_users = (
        f"INSERT INTO {_VALUES} (dimension, month, value, users) "
        f"SELECT c.dimension, c.month, c.value, count(*) FROM ({keys}) AS c "
        f"WHERE c.user_key <> '' AND NOT EXISTS (SELECT 1 FROM {_GROUPS} AS o "
        "WHERE o.dimension = c.dimension AND o.month = c.month AND o.value = c.value "
        f"AND o.user_key = c.user_key) GROUP BY 1, 2, 3 {_ADD_USERS}"
    )
    return [new_users, upsert]


def _roll_up(conn: Connection, selection: str, parameters: dict[str, Any]) -> None:
    span = conn.execute(
        text(f"SELECT min(u.ts), max(u.ts) FROM {usage_table.name} AS u WHERE {selection}"),
        parameters,
    ).one()
    if span[0] is None:
        return
    month = _month_of_ts(int(span[0]), int(span[1]))
    for statement in _statements(conn.dialect.name, selection, month):
        conn.execute(text(statement), parameters)


def roll_up_batch(conn: Connection, ids: Sequence[str], first: int, last: int) -> None:
    """PostgreSQL: add the just-inserted calls ``ids`` (whose times span ``first`` to
    ``last``) to the rollups, in the same transaction."""
    month = _month_of_ts(first, last)
    for statement in _statements("postgresql", "u.id = ANY(:ids)", month):
        conn.execute(text(statement), {"ids": list(ids)})


def roll_up_everything(conn: Connection) -> None:
    """PostgreSQL: add every stored call (when the rollups are created on an existing store)."""
    _roll_up(conn, "true", {})


def lazy(engine: Engine) -> bool:
    """Whether this store rolls up lazily (SQLite) rather than in each insert (PostgreSQL)."""
    return engine.dialect.name == "sqlite"


def pending_rows(engine: Engine) -> int:
    """SQLite: how many stored calls (at most) are not rolled up yet; 0 on PostgreSQL."""
    if not lazy(engine):
        return 0
    with engine.connect() as conn:
        newest, rolled = conn.execute(
            text(
                f"SELECT (SELECT max(rowid) FROM {usage_table.name}), "
                f"(SELECT value FROM {meta_table.name} WHERE key = :key)"
            ),
            {"key": WATERMARK_KEY},
        ).one()
    return max(int(newest or 0) - int(rolled or 0), 0)


def catch_up(engine: Engine, chunk: int = CHUNK_ROWS) -> int:
    """SQLite: roll up every stored call not rolled up yet, ``chunk`` rows per transaction.

    Safe against other processes doing the same: each transaction takes SQLite's write lock
    before it reads the watermark. Returns how many rows were rolled up.
    """
    if not lazy(engine):
        return 0
    done = 0
    while True:
        with engine.begin() as conn:
            low, newest = lock_watermark(conn)
            if newest <= low:
                return done
            high = min(newest, low + chunk)
            _roll_up(conn, "u.rowid > :low AND u.rowid <= :high", {"low": low, "high": high})
            set_watermark(conn, high)
            done += high - low


def lock_watermark(conn: Connection) -> tuple[int, int]:
    """SQLite: take the write lock (a write first, so the reads below happen under it), then
    read the watermark and the newest rowid."""
    key = meta_table.c.key == WATERMARK_KEY
    conn.execute(update(meta_table).where(key).values(value=meta_table.c.value))
    watermark = conn.execute(select(meta_table.c.value).where(key)).scalar()
    return int(watermark or 0), newest_rowid(conn)


def newest_rowid(conn: Connection) -> int:
    """SQLite: the rowid of the newest stored call (0 when there is none)."""
    newest: Select[tuple[Any]] = select(func.max(literal_column("rowid"))).select_from(usage_table)
    return int(conn.execute(newest).scalar() or 0)


def set_watermark(conn: Connection, value: int) -> None:
    """SQLite: calls up to rowid ``value`` are rolled up."""
    conn.execute(
        update(meta_table).where(meta_table.c.key == WATERMARK_KEY).values(value=str(value))
    )


def create_rollup_keys(conn: Connection) -> None:
    """Indexes SQLAlchemy cannot declare for both databases: the hourly rollup's unique key
    (PostgreSQL hashes the properties: an index entry must stay under ~2.7 kB), and on
    SQLite a narrow index of the groups rollup."""
    dialect = conn.dialect.name
    conn.execute(
        text(
            f"CREATE UNIQUE INDEX IF NOT EXISTS ux_{hourly_table.name} "
            f"ON {hourly_table.name} ({_HOURLY_KEY[dialect]})"
        )
    )
    if dialect == "sqlite":
        # The primary key's columns alone: counting a plan's users reads this narrow index
        # rather than the table's wide rows (PostgreSQL's primary key is such an index).
        # Updates of the sums never touch it.
        conn.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS ix_{monthly_groups_table.name}_users "
                f"ON {monthly_groups_table.name} (dimension, month, value, user_key)"
            )
        )

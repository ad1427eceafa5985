"""Opening a store: the engine, SQLite tuning and table creation."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, insert, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from . import rollups
from .models import ROLLUP_TABLES, SCHEMA_VERSION, meta_table, usage_table

DEFAULT_DATABASE_URL = "sqlite:///llm_tally.db"
DATABASE_URL_VARIABLE = "LLM_TALLY_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def resolve_database_url(url: str | None) -> str:
    """``url``, else ``$LLM_TALLY_DATABASE_URL``, else the SQLite file ``./llm_tally.db``."""
    if url is None:
        url = os.environ.get(DATABASE_URL_VARIABLE) or DEFAULT_DATABASE_URL
    if not isinstance(url, str) or not url:
        raise ValueError("database_url must be a SQLAlchemy URL such as 'sqlite:///usage.db'")
    try:
        make_url(url)
    except Exception as exc:
        raise ValueError(
            f"database_url {url!r} is not a SQLAlchemy URL (e.g. 'sqlite:///usage.db' or "
            "'postgresql+psycopg://user@host/db')"
        ) from exc
    return url


def _tune_sqlite(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers and the writer (also in other processes) work at the same time;
    # the busy timeout makes concurrent writers wait instead of failing.
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def create_store_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL mode and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        )
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True)


def create_tables(engine: Engine) -> None:
    """Create the tables if missing; safe when several processes open the same store at once."""
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                _create(conn)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            # Another process created the same table or row between our check and create.
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def _create(conn: Connection) -> None:
    inspector = inspect(conn)
    rollups_missing = not all(inspector.has_table(table.name) for table in ROLLUP_TABLES)
    usage_table.metadata.create_all(conn, tables=[usage_table, meta_table, *ROLLUP_TABLES])
    rollups.create_rollup_keys(conn)
    meta = {
        row.key: row.value for row in conn.execute(select(meta_table.c.key, meta_table.c.value))
    }
    if "schema_version" not in meta:
        conn.execute(insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif int(meta["schema_version"]) < SCHEMA_VERSION:
        conn.execute(
            update(meta_table)
            .where(meta_table.c.key == "schema_version")
            .values(value=str(SCHEMA_VERSION))
        )
    if rollups_missing:
        # New rollups (a store of schema 1), or some were dropped: build all of them again
        # from the stored calls, so that none counts a call twice or misses one.
        for table in ROLLUP_TABLES:
            conn.execute(table.delete())
    if rollups.lazy(conn.engine):
        if rollups.WATERMARK_KEY not in meta:
            conn.execute(insert(meta_table).values(key=rollups.WATERMARK_KEY, value="0"))
        elif rollups_missing:
            rollups.set_watermark(conn, 0)
        # The next catch-up rolls up every stored call.
    elif rollups_missing:
        rollups.roll_up_everything(conn)


def rebuild_rollups(engine: Engine) -> None:
    """Drop the rollup tables and build them again from the stored calls (after a change of
    their layout, or to repair them)."""
    with engine.begin() as conn:
        for table in reversed(ROLLUP_TABLES):
            table.drop(conn, checkfirst=True)
    create_tables(engine)
    rollups.catch_up(engine)

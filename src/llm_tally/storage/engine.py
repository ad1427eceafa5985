"""Opening a store: its URL, the engine and SQLite tuning (its schema: ``schema.py``)."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from . import rollups
from .models import ROLLUP_TABLES
from .schema import upgrade_store

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


def rebuild_rollups(engine: Engine) -> None:
    """Drop the rollup tables and build them again from the stored calls (after a change of
    their layout, or to repair them)."""
    with engine.begin() as conn:
        for table in reversed(ROLLUP_TABLES):
            table.drop(conn, checkfirst=True)
    upgrade_store(engine)
    rollups.catch_up(engine)

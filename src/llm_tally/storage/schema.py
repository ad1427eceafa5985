"""Which revision of the schema a store is at, and bringing it to this release's revision.

The revisions are Alembic migrations (``storage/migrations/versions/``). Opening a store that
is already at the newest revision lists its tables and reads one row: Alembic is imported
only to upgrade. Upgrades are serialised between processes (a PostgreSQL advisory lock,
SQLite's write lock), so several workers can open an old or an empty store at once: the
first upgrades it, the others wait and then find it up to date.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, Table, insert, inspect, select, text
from sqlalchemy.exc import OperationalError

from .._internal import logger
from . import rollups
from .models import ROLLUP_TABLES, meta_table, usage_table

#: Where the store's revision is kept (the host app may use ``alembic_version`` itself).
VERSION_TABLE = "llm_tally_alembic_version"
#: Every table of the newest revision.
TABLES: tuple[Table, ...] = (usage_table, meta_table, *ROLLUP_TABLES)
#: PostgreSQL advisory lock held while a store is upgraded: b"llmtally" as a number.
LOCK_KEY = int.from_bytes(b"llmtally", "big")

_VERSIONS = Path(__file__).with_name("migrations") / "versions"


class StoreNotUpgraded(RuntimeError):
    """The store is behind this release's schema and upgrading it at start is turned off."""


@functools.cache
def revisions() -> tuple[str, ...]:
    """Every revision, oldest first: the numbers that name the files in ``versions/``."""
    return tuple(
        sorted(
            path.name[:4] for path in _VERSIONS.glob("[0-9][0-9][0-9][0-9]_*.py") if path.is_file()
        )
    )


def head() -> str:
    """The newest revision: the one this release reads and writes."""
    return revisions()[-1]


@dataclass(frozen=True)
class StoreState:
    """What a store holds: its recorded revision and which of llm-tally's tables exist."""

    revision: str | None
    tables: frozenset[str]

    @property
    def up_to_date(self) -> bool:
        return self.revision == head()

    @property
    def ahead(self) -> bool:
        """At a revision this release does not know: written by a newer llm-tally."""
        return self.revision is not None and self.revision not in revisions()

    @property
    def missing(self) -> list[Table]:
        return [table for table in TABLES if table.name not in self.tables]

    @property
    def before_migrations(self) -> str | None:
        """For a store created by llm-tally 0.1 (no revision recorded): the revision its
        tables are at. Its rollup tables, or their absence, tell schema 2 from schema 1."""
        if self.revision is not None or not self.tables & {usage_table.name, meta_table.name}:
            return None
        return "0002" if any(t.name in self.tables for t in ROLLUP_TABLES) else "0001"

    def describe(self) -> str:
        if self.up_to_date:
            return f"at revision {self.revision} (up to date)"
        if self.ahead:
            return (
                f"at revision {self.revision}, written by a newer llm-tally "
                f"(this one knows revisions up to {head()})"
            )
        if self.revision is not None:
            return f"at revision {self.revision}, behind this llm-tally's {head()}"
        legacy = self.before_migrations
        if legacy is not None:
            return (
                f"at revision {legacy} (tables of llm-tally 0.1, which recorded no revision), "
                f"behind this llm-tally's {head()}"
            )
        return f"empty: it has no llm-tally tables (this llm-tally's revision is {head()})"


def read_state(conn: Connection) -> StoreState:
    """The store's revision and tables: two cheap queries, no Alembic."""
    tables = frozenset(inspect(conn).get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        versions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        # More than one row would be branches, which these migrations never have.
        revision = versions[0] if len(versions) == 1 else None
    return StoreState(revision, frozenset(t for t in tables if t.startswith("llm_tally_")))


def store_state(engine: Engine) -> StoreState:
    with engine.connect() as conn:
        return read_state(conn)


def prepare(engine: Engine, *, migrate: bool) -> None:
    """At start: upgrade the store (``migrate``), or check that it is up to date."""
    for attempt in range(5):
        try:
            if migrate:
                upgrade_store(engine)
            else:
                check_store(engine)
            return
        except OperationalError as exc:
            # SQLite answers "database is locked" at once, without its busy timeout, to a
            # connection switching a new file to WAL while another process or thread opens
            # it too: several workers starting together. Try again shortly.
            locked = engine.dialect.name == "sqlite" and "locked" in str(exc)
            if not locked or attempt == 4:
                raise
            time.sleep(0.05 * 2**attempt)


def check_store(engine: Engine) -> StoreState:
    """Raise StoreNotUpgraded unless the store is at this release's revision (or newer)."""
    state = store_state(engine)
    if state.ahead:
        _warn_ahead(engine, state)
    elif not state.up_to_date:
        url = shown_url(engine)
        password = " (with its password)" if engine.url.password else ""
        raise StoreNotUpgraded(
            f"the llm-tally store {url} is {state.describe()}, and upgrading it at start is "
            f"turned off (migrate=False). Run `llm-tally db upgrade --database-url '{url}'`"
            f"{password}, or open it with migrate='auto'."
        )
    return state


def upgrade_store(engine: Engine) -> StoreState:
    """Create the store, or upgrade it to this release's revision, and recreate tables that
    were dropped (rebuilding the rollups from the calls if any of theirs was). Safe when
    several processes do it at once. Returns the store's state before."""
    state = store_state(engine)
    if state.ahead:
        _warn_ahead(engine, state)
    if state.ahead or (state.up_to_date and not state.missing):
        return state
    with _locked(engine) as conn:
        # Read again under the lock: another process may have upgraded the store meanwhile.
        state = read_state(conn)
        if state.ahead:
            _warn_ahead(engine, state)
            return state
        rebuild = False
        if not state.up_to_date:
            from . import migrations

            rebuild = migrations.upgrade(conn, state.before_migrations)
        _repair(conn, read_state(conn), rebuild)
    return state


def _repair(conn: Connection, state: StoreState, rebuild: bool) -> None:
    """Recreate dropped tables (the models are the newest revision) and their keys; build
    the rollups again if a revision asked for it or one of their tables was missing."""
    missing = state.missing
    if missing:
        usage_table.metadata.create_all(conn, tables=missing)
    rollups.create_rollup_keys(conn)
    if rebuild or any(table in ROLLUP_TABLES for table in missing):
        for table in ROLLUP_TABLES:
            conn.execute(table.delete())
        if not rollups.lazy(conn.engine):
            rollups.roll_up_everything(conn)
        elif _has_watermark(conn):
            rollups.set_watermark(conn, 0)
        # SQLite: the next catch-up rolls up every stored call.
    if rollups.lazy(conn.engine) and not _has_watermark(conn):
        conn.execute(insert(meta_table).values(key=rollups.WATERMARK_KEY, value="0"))


def _has_watermark(conn: Connection) -> bool:
    key = meta_table.c.key == rollups.WATERMARK_KEY
    return conn.execute(select(meta_table.c.key).where(key)).first() is not None


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A transaction that no other process upgrading the same store runs beside."""
    with engine.connect() as conn, conn.begin():
        if engine.dialect.name == "sqlite":
            # Take the write lock now: without it Python's sqlite3 would run each CREATE
            # outside any transaction, and two processes would both create the tables.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        yield conn


def shown_url(engine: Engine) -> str:
    """The store's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


def _warn_ahead(engine: Engine, state: StoreState) -> None:
    logger.warning(
        "llm-tally: the store %s is %s; it is used as it is. Upgrade llm-tally on every "
        "process that writes to it.",
        shown_url(engine),
        state.describe(),
    )

"""The background writer: records queue in memory and are inserted in batches off the app's path."""

from __future__ import annotations

import json
import operator
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .._internal import logger
from .._record import CallRecord
from . import rollups
from .models import usage_table

# A row: the values of usage_table's columns, in table order.
Row = tuple[Any, ...]
COLUMNS = tuple(column.name for column in usage_table.columns)
# CallRecord attributes by column; only the time is named differently.
_row_of = operator.attrgetter(*(("ts_us" if name == "ts" else name) for name in COLUMNS))


def row_of(record: CallRecord) -> Row:
    """The table row of a record."""
    row: Row = _row_of(record)
    return row


@dataclass
class WriterStats:
    """Counters of one writer; read them through ``Tally.stats()``."""

    queued: int = 0
    written: int = 0
    dropped: int = 0
    write_errors: int = 0
    last_write_error: str | None = None
    #: Unix times of the last successful insert and of the last failure (None: never).
    last_write_at: float | None = None
    last_write_error_at: float | None = None


_JSON_POSITIONS = frozenset(
    i for i, column in enumerate(usage_table.columns) if isinstance(column.type, JSON)
)
_ROWS_PER_STATEMENT = 400  # x 23 columns stays far below SQLite's 32,766 parameters
_SQLITE_INSERTS: dict[int, str] = {}


def _insert_sqlite(conn: Connection, rows: list[Row]) -> None:
    """Multi-row ``INSERT ... VALUES (...), (...)`` straight to the driver.

    SQLAlchemy's executemany costs ~2x more CPU per row on SQLite, and sqlite3's
    executemany gives up the GIL on every row, which starves this thread while the app
    is busy. Rows come from our own code, in our own column order, as bound parameters.
    """
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        statement = _SQLITE_INSERTS.get(len(chunk))
        if statement is None:
            one = "(" + ", ".join("?" * len(COLUMNS)) + ")"
            # DO NOTHING: a record stored twice (a retry after a commit whose reply was lost,
            # a journal replay) is stored once, and rolled up once.
            statement = (
                f"INSERT INTO {usage_table.name} ({', '.join(COLUMNS)}) VALUES "
                + ", ".join([one] * len(chunk))
                + " ON CONFLICT (id) DO NOTHING"
            )
            _SQLITE_INSERTS[len(chunk)] = statement
        parameters: list[Any] = []
        last_value: Any = None
        last_text = "null"
        for row in chunk:
            start = len(parameters)
            parameters.extend(row)
            for i in _JSON_POSITIONS:
                value = row[i]
                # Calls of one request share one properties dict: encode it once.
                if value is not last_value:
                    # ensure_ascii=False: SQLite's JSON paths match non-ASCII keys only unescaped.
                    last_value = value
                    last_text = json.dumps(value, ensure_ascii=False) if value else "{}"
                parameters[start + i] = last_text
        conn.exec_driver_sql(statement, tuple(parameters))


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class BackgroundWriter:
    """Turns queued items into rows (``to_row``, in this thread) and inserts them in batches.

    ``submit`` never blocks and never touches the database: past ``max_queue`` items it
    drops the record, counts it and logs a warning. A failed insert is retried with
    backoff, keeping the batch in memory.

    Rollups: on PostgreSQL each batch is rolled up in its own transaction; on SQLite the
    writer catches up once no record came for ``rollup_idle`` seconds, every
    ``rollup_every`` seconds under steady traffic, and after ``rollup_backlog`` rows in a
    burst (reports catch up before they read, so this only bounds their wait). A burst is
    stored at full speed and rolled up after it.
    """

    def __init__(
        self,
        engine: Engine,
        to_row: Callable[[Any], Row | None],
        *,
        max_queue: int = 100_000,
        batch_size: int = 2_000,
        interval: float = 0.05,
        rollup_backlog: int = 250_000,
        rollup_idle: float = 1.0,
        rollup_every: float = 10.0,
        name: str = "llm-tally-writer",
    ) -> None:
        self._engine = engine
        self._to_row = to_row
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval = interval
        self._sqlite = engine.dialect.name == "sqlite"
        self._rollup_backlog = rollup_backlog
        self._rollup_idle = rollup_idle
        self._rollup_every = rollup_every
        self._last_insert = self._last_catch_up = time.monotonic()
        self._retry_catch_up_at = 0.0
        # SQLite: rows this writer stored that may not be rolled up yet (a read may have
        # rolled them up since; then catching up finds nothing to do).
        self._not_rolled_up = 0
        self._last_catch_up = time.monotonic()
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 10_000 == 0:
                logger.warning(
                    "llm-tally: the write queue is full (%d records); %d record(s) dropped so "
                    "far. Is the store reachable?",
                    self._max_queue,
                    self.stats.dropped,
                )
            return
        queue.append(item)
        if len(queue) >= self._batch_size:
            self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted before this call is stored; False on timeout."""
        if not self._thread.is_alive():
            return not self._queue
        marker = _FlushMarker()
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. True if everything was stored in time."""
        flushed = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return flushed

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        pending: list[Row] = []
        markers: list[_FlushMarker] = []
        backoff = 0.0
        while True:
            self._wake.wait(backoff or self._interval)
            self._wake.clear()
            while self._queue or pending:
                while self._queue and len(pending) < self._batch_size:
                    item = self._queue.popleft()
                    if isinstance(item, _FlushMarker):
                        markers.append(item)
                        if not pending:
                            break
                        continue
                    row = self._to_row(item)
                    if row is not None:
                        pending.append(row)
                if pending and not self._insert(pending):
                    backoff = min(max(backoff * 2, 0.1), 5.0)
                    break
                backoff = 0.0
                pending = []
                for marker in markers:
                    marker.done.set()
                markers = []
                if self._not_rolled_up >= self._rollup_backlog:
                    self._catch_up()
            # Not while closing: shutdown stays quick, and the next report catches up.
            if (
                self._not_rolled_up
                and not self._queue
                and not pending
                and not self._stopping
                and self._quiet_or_due()
            ):
                self._catch_up()
            self.stats.queued = len(self._queue) + len(pending)
            if self._stopping and not self._queue and not pending:
                return

    def _insert(self, rows: list[Row]) -> bool:
        try:
            with self._engine.begin() as conn:
                if self._sqlite:
                    _insert_sqlite(conn, rows)
                else:
                    self._insert_postgres(conn, rows)
        except Exception as exc:
            self.stats.write_errors += 1
            self.stats.last_write_error = f"{type(exc).__name__}: {exc}"[:500]
            self.stats.last_write_error_at = time.time()
            if self.stats.write_errors == 1 or self.stats.write_errors % 100 == 0:
                logger.warning(
                    "llm-tally: storing %d record(s) failed (%s); they stay queued and will be "
                    "retried",
                    len(rows),
                    self.stats.last_write_error,
                )
            return False
        self.stats.written += len(rows)
        self.stats.last_write_at = time.time()
        if self._sqlite:
            self._not_rolled_up += len(rows)
            self._last_insert = time.monotonic()
        return True

    @staticmethod
    def _insert_postgres(conn: Connection, rows: list[Row]) -> None:
        """Insert, skipping records already stored, and roll up the rows actually inserted."""
        rows_as_dicts = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
        statement = (
            pg_insert(usage_table)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(usage_table.c.id, usage_table.c.ts)
        )
        stored = conn.execute(statement, rows_as_dicts).all()
        if stored:
            times = [row.ts for row in stored]
            rollups.roll_up_batch(conn, [row.id for row in stored], min(times), max(times))

    def _quiet_or_due(self) -> bool:
        now = time.monotonic()
        if now < self._retry_catch_up_at:
            return False
        return (
            now - self._last_insert >= self._rollup_idle
            or now - self._last_catch_up >= self._rollup_every
        )

    def _catch_up(self) -> None:
        """SQLite: roll up what is stored. A failure is counted; the rows stay stored and the
        next catch-up (here or before a report) rolls them up."""
        try:
            rollups.catch_up(self._engine)
        except Exception as exc:
            self.stats.write_errors += 1
            self.stats.last_write_error = f"rollup: {type(exc).__name__}: {exc}"[:500]
            self.stats.last_write_error_at = time.time()
            if self.stats.write_errors == 1 or self.stats.write_errors % 100 == 0:
                logger.warning("llm-tally: rolling up stored records failed (%s)", exc)
            self._retry_catch_up_at = time.monotonic() + 5.0
            return
        self._not_rolled_up = 0
        self._last_catch_up = time.monotonic()

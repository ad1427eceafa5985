"""The background writer: records queue in memory and are inserted in batches off the app's path."""

from __future__ import annotations

import json
import operator
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, Engine, insert

from .._internal import logger
from .._record import CallRecord
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
            statement = (
                f"INSERT INTO {usage_table.name} ({', '.join(COLUMNS)}) VALUES "
                + ", ".join([one] * len(chunk))
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
    """

    def __init__(
        self,
        engine: Engine,
        to_row: Callable[[Any], Row | None],
        *,
        max_queue: int = 100_000,
        batch_size: int = 2_000,
        interval: float = 0.05,
        name: str = "llm-tally-writer",
    ) -> None:
        self._engine = engine
        self._to_row = to_row
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval = interval
        self._sqlite = engine.dialect.name == "sqlite"
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
            self.stats.queued = len(self._queue) + len(pending)
            if self._stopping and not self._queue and not pending:
                return

    def _insert(self, rows: list[Row]) -> bool:
        try:
            with self._engine.begin() as conn:
                if self._sqlite:
                    _insert_sqlite(conn, rows)
                else:
                    rows_as_dicts = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
                    conn.execute(insert(usage_table), rows_as_dicts)
        except Exception as exc:
            self.stats.write_errors += 1
            self.stats.last_write_error = f"{type(exc).__name__}: {exc}"[:500]
            if self.stats.write_errors == 1 or self.stats.write_errors % 100 == 0:
                logger.warning(
                    "llm-tally: storing %d record(s) failed (%s); they stay queued and will be "
                    "retried",
                    len(rows),
                    self.stats.last_write_error,
                )
            return False
        self.stats.written += len(rows)
        return True

"""The background writer: records queue in memory and are inserted in batches off the app's path."""

from __future__ import annotations

import json
import marshal
import operator
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .._internal import guard, logger, report_internal_error
from .._record import CallRecord, record_from_entry
from . import rollups
from .journal import MAGIC, Journal, Segment
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

    written: int = 0
    dropped: int = 0
    #: Records that found the queue full and waited in the journal on disk instead.
    spilled: int = 0
    #: Records stored from the journal: left by a process that died, or spilled here.
    replayed: int = 0
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


def _insert_sqlite(conn: Connection, rows: list[Row]) -> int:
    """Multi-row ``INSERT ... VALUES (...), (...)`` straight to the driver.

    SQLAlchemy's executemany costs ~2x more CPU per row on SQLite, and sqlite3's
    executemany gives up the GIL on every row, which starves this thread while the app
    is busy. Rows come from our own code, in our own column order, as bound parameters.
    """
    inserted = 0
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
        inserted += conn.exec_driver_sql(statement, tuple(parameters)).rowcount
    return inserted


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


def _spilled_payload(item: Any) -> bytes:
    """The journal payload of a record that will wait only in the journal: a call is turned
    into its record first, so that its usage (a raw body, an estimate) is not left unknown."""
    record = item if isinstance(item, CallRecord) else item.to_record()
    return marshal.dumps(record.journal_entry(), 2)


def _decode(payload: bytes) -> CallRecord:
    return record_from_entry(marshal.loads(payload))


class BackgroundWriter:
    """Turns queued items into rows (``to_row``, in this thread) and inserts them in batches.

    ``submit`` never blocks on the store. With a ``journal``, each item is first written to
    it (see ``storage/journal.py``); past ``max_queue`` queued items a record waits only in
    the journal ("spilled") and is stored from there once the queue drains. Without a
    journal (or with the disk full) such a record is dropped, counted and logged. A failed
    insert is retried with backoff, keeping the batch in memory.

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
        journal: Journal | None = None,
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
        self._journal = journal
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
        self._stopping = False
        self._start(name)

    def _start(self, name: str) -> None:
        """Empty queue and counters, and the thread that stores what gets queued."""
        self._queue: deque[Any] = deque()
        self._in_flight = 0
        # Journal segments to store from (spilled records, or another process's leftovers),
        # each with whether only its spilled records are missing from the store.
        self._to_replay: list[tuple[Segment, bool]] = []
        self._wake = threading.Event()
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def restart_in_child(self) -> None:
        """After ``fork()``: the child has no writer thread and must not write into the
        parent's journal files or reuse its connections. Start afresh; what the parent
        queued is the parent's to store."""
        if self._journal is not None:
            self._journal = self._journal.reopen_in_child()
        self._engine.dispose(close=False)
        self._start(self._thread.name)

    def submit(self, item: Any) -> None:
        journal = self._journal
        if journal is None:
            if len(self._queue) >= self._max_queue:
                self._drop()
                return
            self._queue.append(item)
            if len(self._queue) >= self._batch_size:
                self._wake.set()
            return
        queue = self._queue
        full = len(queue) >= self._max_queue
        try:
            if full:
                payload: bytes | None = _spilled_payload(item)
            else:
                payload = marshal.dumps(item.journal_entry(), 2)
        except Exception as exc:
            report_internal_error("journal entry", exc)
            payload = None
        with journal.lock:
            segment = journal.current
            journaled = payload is not None and (
                (segment is not None and segment.append(payload, full))
                or self._append_to_new_segment(journal, payload, full)
            )
            if full:
                if journaled:
                    self.stats.spilled += 1
                    if self.stats.spilled == 1:
                        logger.warning(
                            "llm-tally: the write queue is full (%d records); records now wait "
                            "in the journal on disk (%s). Is the store reachable?",
                            self._max_queue,
                            journal.directory,
                        )
                else:
                    self._drop()
                return
            queue.append(item)
        if len(queue) >= self._batch_size:
            self._wake.set()

    def _append_to_new_segment(self, journal: Journal, payload: bytes, spilled: bool) -> bool:
        """Write one frame that did not fit in the current segment (journal lock held) into a
        new one."""
        if journal.current is None:
            return False
        # Rotating queues the old segment: it is deleted once the records before it are stored.
        self._queue.append(journal.rotate())
        self._wake.set()
        segment = journal.current
        return segment is not None and segment.append(payload, spilled)

    def _drop(self) -> None:
        self.stats.dropped += 1
        if self.stats.dropped == 1 or self.stats.dropped % 10_000 == 0:
            logger.warning(
                "llm-tally: the write queue is full (%d records) and the journal cannot hold "
                "more; %d record(s) dropped so far. Is the store reachable, the disk full?",
                self._max_queue,
                self.stats.dropped,
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted before this call is stored; False on timeout."""
        if not self._thread.is_alive():
            return not self._queue
        marker = _FlushMarker()
        journal = self._journal
        if journal is None:
            self._queue.append(marker)
        else:
            with journal.lock:
                # The records so far get a segment of their own, deleted once they are
                # stored: after a flush that returned True the journal holds nothing stored.
                if journal.current is not None and journal.current.written > len(MAGIC):
                    self._queue.append(journal.rotate())
                self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. True if everything was stored in time."""
        flushed = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._journal is not None and flushed and not self._thread.is_alive():
            # Everything is stored. Otherwise the files stay (and the thread keeps retrying
            # until the process exits): the next Tally on this store replays them.
            self._journal.close(delete=True)
        return flushed

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def depth(self) -> int:
        """Records waiting in memory: queued, or in the batch being stored (or retried)."""
        return len(self._queue) + self._in_flight

    @property
    def journal(self) -> Journal | None:
        return self._journal

    def _run(self) -> None:
        if self._journal is not None:
            guard("journal replay", self._adopt_abandoned)
        pending: list[Row] = []
        markers: list[_FlushMarker] = []
        retired: list[Segment] = []
        backoff = 0.0
        while True:
            self._wake.wait(backoff or self._interval)
            self._wake.clear()
            failed = False
            while self._queue or pending:
                # A batch takes only what is queued now (the app keeps queueing meanwhile), and
                # one that failed is retried as it is: memory stays within twice the queue.
                take = 0 if backoff and pending else self._batch_size - len(pending)
                for _ in range(min(take, len(self._queue))):
                    item = self._queue.popleft()
                    if isinstance(item, _FlushMarker):
                        markers.append(item)
                        if not pending:
                            break
                        continue
                    if isinstance(item, Segment):
                        retired.append(item)
                        continue
                    row = self._to_row(item)
                    if row is not None:
                        pending.append(row)
                self._in_flight = len(pending)
                if pending and self._insert(pending) is None:
                    failed = True
                    break
                pending = []
                self._in_flight = 0
                backoff = 0.0
                for segment in retired:
                    self._retire(segment)
                retired = []
                markers = self._release(markers)
                if self._not_rolled_up >= self._rollup_backlog:
                    self._catch_up()
            if self._journal is not None:
                self._journal.prepare_spare()
                if not failed:
                    failed = not self._journal_upkeep(bool(markers))
                    if not failed:
                        markers = self._release(markers)
            backoff = min(max(backoff * 2, 0.1), 5.0) if failed else 0.0
            # Not while closing: shutdown stays quick, and the next report catches up.
            if (
                self._not_rolled_up
                and not self._queue
                and not pending
                and not self._stopping
                and self._quiet_or_due()
            ):
                self._catch_up()
            if self._stopping and not self._queue and not pending:
                return

    def _release(self, markers: list[_FlushMarker]) -> list[_FlushMarker]:
        """Wake flushers, unless spilled records still wait in the journal (then keep them)."""
        if markers and not self.spill_waiting:
            if self._journal is not None:
                # A flush rotated the segment: create the next one before the flusher goes on,
                # or its syscalls compete with the app's next calls for the GIL.
                self._journal.prepare_spare()
            for marker in markers:
                marker.done.set()
            return []
        return markers

    @property
    def spill_waiting(self) -> bool:
        """Whether records wait in the journal that are neither queued nor stored."""
        journal = self._journal
        if journal is None:
            return False
        return bool(
            self._to_replay
            or (journal.current is not None and journal.current.spilled)
            or any(segment.spilled for segment in journal.retired)
        )

    def _retire(self, segment: Segment) -> None:
        """Every queued record of ``segment`` is stored; its spilled ones are still to store."""
        assert self._journal is not None
        if segment.spilled:
            self._to_replay.append((segment, True))
        else:
            self._journal.release(segment)

    def _journal_upkeep(self, flushing: bool) -> bool:
        """Rotate out spilled records once there is room, store them, prepare the next
        segment. False when storing failed (retried with backoff)."""
        journal = self._journal
        assert journal is not None
        current = journal.current
        room = len(self._queue) < self._max_queue // 2
        # The lock can be held by a thread suspended in a signal handler: never wait long.
        rotate = current is not None and current.spilled and (room or flushing)
        if rotate and journal.lock.acquire(timeout=1.0):
            try:
                self._queue.append(journal.rotate())
            finally:
                journal.lock.release()
            self._wake.set()
        while self._to_replay:
            segment, only_spilled = self._to_replay[0]
            if not self._replay(segment, only_spilled):
                return False
            self._to_replay.pop(0)
            journal.release(segment)
        return True

    def _adopt_abandoned(self) -> None:
        """Queue for replay the journal segments of processes that are gone."""
        assert self._journal is not None
        for segment in self._journal.abandoned():
            self._to_replay.append((segment, False))
        if self._to_replay:
            logger.info(
                "llm-tally: replaying %d journal segment(s) left by a process that stopped "
                "before storing them",
                len(self._to_replay),
            )

    def _replay(self, segment: Segment, only_spilled: bool) -> bool:
        """Store the records of a segment (those stored already are skipped by their id)."""
        rows: list[Row] = []
        for payload in segment.frames(only_spilled):
            record = guard("journal replay", _decode, payload)
            row = self._to_row(record) if record is not None else None
            if row is not None:
                rows.append(row)
        for start in range(0, len(rows), self._batch_size):
            inserted = self._insert(rows[start : start + self._batch_size])
            if inserted is None:
                return False
            self.stats.replayed += inserted
        return True

    def _insert(self, rows: list[Row]) -> int | None:
        """Store ``rows``; how many were new (not stored before), or None on failure."""
        try:
            with self._engine.begin() as conn:
                if self._sqlite:
                    inserted = _insert_sqlite(conn, rows)
                else:
                    inserted = self._insert_postgres(conn, rows)
        except Exception as exc:
            if self._note_write_error("", exc):
                logger.warning(
                    "llm-tally: storing %d record(s) failed (%s); they stay queued and will be "
                    "retried",
                    len(rows),
                    self.stats.last_write_error,
                )
            return None
        self.stats.written += inserted
        self.stats.last_write_at = time.time()
        if self._sqlite:
            self._not_rolled_up += inserted
            self._last_insert = time.monotonic()
        return inserted

    def _note_write_error(self, prefix: str, exc: Exception) -> bool:
        """Count a failed write in the stats; whether to log it (the first, then every 100th)."""
        stats = self.stats
        stats.write_errors += 1
        stats.last_write_error = f"{prefix}{type(exc).__name__}: {exc}"[:500]
        stats.last_write_error_at = time.time()
        return stats.write_errors == 1 or stats.write_errors % 100 == 0

    @staticmethod
    def _insert_postgres(conn: Connection, rows: list[Row]) -> int:
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
        return len(stored)

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
            if self._note_write_error("rollup: ", exc):
                logger.warning("llm-tally: rolling up stored records failed (%s)", exc)
            self._retry_catch_up_at = time.monotonic() + 5.0
            return
        self._not_rolled_up = 0
        self._last_catch_up = time.monotonic()

"""Bulk ingestion rate: ``Tally.record()`` into SQLite through the background writer.

Run by hand (not part of the test suite)::

    python benchmarks/bench_ingest.py [--records 200000] [--users 1000] [--batch 2000]
        [--chunk N] [--only SCENARIO ...] [--profile priced|given-cost]

Scenarios, each into a fresh SQLite file in a temporary directory:

- ``given-cost``: ``tally.record(..., cost_usd=Decimal(...))`` for every record, then
  ``tally.flush(timeout=None)``. No pricing in the writer.
- ``priced``: the same records without ``cost_usd``: the writer thread prices every record
  through genai-prices.
- ``given-cost-parked``: as ``given-cost`` but the writer sleeps until ``flush()``: the
  submit rate is ``record()`` alone, then the writer stores everything in one transaction
  with the CPU to itself.
- ``raw-sqlalchemy``: for reference, the same rows (already built, as the writer would
  build them) inserted with SQLAlchemy Core ``executemany`` in transactions of
  ``--batch`` rows, on the same engine settings (WAL, synchronous=NORMAL).
- ``raw-sqlite3``: the floor: the same rows through the ``sqlite3`` module directly.
- ``busy-app``: records queued (cost given), then the main thread runs CPU-bound Python
  for ``--busy-seconds``; reports how many the writer stored meanwhile.

"submit" is the time spent in the ``record()`` calls (the writer runs at the same time, so
they share the GIL); "end to end" runs from the first ``record()`` until ``flush()``
returns, i.e. until every record is committed. Each scenario checks that
``tally.stats()`` reports nothing dropped and that the table holds exactly N rows.

``--profile priced`` (or ``given-cost``) also runs that scenario with cProfile enabled *in
the writer thread* (``--profile-records``, smaller) and prints where the writer's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import print_machine_info, print_table
from sqlalchemy import func, insert, select

from llm_tally import Tally, UsageRecord
from llm_tally.storage import rollups

MODEL = "gpt-4o-mini"
# gpt-4o-mini list prices (USD per token), used only to make the given costs realistic.
INPUT_PRICE = Decimal("0.00000015")
CACHED_PRICE = Decimal("0.000000075")
OUTPUT_PRICE = Decimal("0.0000006")
PLANS = ("free", "pro", "team")

usage_table = UsageRecord.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class Item:
    user_id: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: Decimal
    plan: str


def make_items(records: int, users: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    user_ids = [f"user-{n:05d}" for n in range(users)]
    items = []
    for _ in range(records):
        input_tokens = rng.randint(20, 8_000)
        output_tokens = rng.randint(1, 1_500)
        cached = rng.choice((0, 0, 0, (input_tokens // 1024) * 1024))
        cost = (
            (input_tokens - cached) * INPUT_PRICE + cached * CACHED_PRICE
        ) + output_tokens * OUTPUT_PRICE
        items.append(
            Item(rng.choice(user_ids), input_tokens, output_tokens, cached, cost, rng.choice(PLANS))
        )
    return items


@dataclass
class Outcome:
    name: str
    records: int
    submit_s: float | None
    total_s: float
    cpu_s: float
    rows: int
    dropped: int
    written_at_submit_end: int | None = None


def count_rows(tally: Tally) -> int:
    with tally.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage_table)).scalar_one())


def run_tally(
    name: str,
    db: Path,
    items: list[Item],
    *,
    with_cost: bool,
    batch: int,
    max_queue: int,
    chunk: int,
    parked: bool = False,
) -> Outcome:
    if parked:
        # The writer sleeps until flush(): record() runs alone, then the writer drains
        # everything in one batch (one transaction) with the CPU to itself.
        tally = Tally(
            f"sqlite:///{db}",
            instrument=False,
            max_queue=max_queue,
            batch_size=max(max_queue, len(items)),
            flush_interval=3600.0,
        )
    else:
        tally = Tally(f"sqlite:///{db}", instrument=False, max_queue=max_queue, batch_size=batch)
    try:
        record = tally.record
        submit_s = 0.0
        cpu_start = time.process_time()
        start = time.perf_counter()
        for first in range(0, len(items), chunk):
            chunk_start = time.perf_counter()
            if with_cost:
                for item in items[first : first + chunk]:
                    record(
                        user_id=item.user_id,
                        model=MODEL,
                        input_tokens=item.input_tokens,
                        output_tokens=item.output_tokens,
                        cached_input_tokens=item.cached_input_tokens,
                        cost_usd=item.cost_usd,
                        properties={"plan": item.plan},
                    )
            else:
                for item in items[first : first + chunk]:
                    record(
                        user_id=item.user_id,
                        model=MODEL,
                        input_tokens=item.input_tokens,
                        output_tokens=item.output_tokens,
                        cached_input_tokens=item.cached_input_tokens,
                        properties={"plan": item.plan},
                    )
            submit_s += time.perf_counter() - chunk_start
            written_at_submit_end = tally.stats()["written"]
            if chunk < len(items) and not tally.flush(timeout=None):
                raise SystemExit(f"{name}: flush failed")
        if not tally.flush(timeout=None):
            raise SystemExit(f"{name}: flush failed")
        total_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        stats = tally.stats()
        rows = count_rows(tally)
        if stats["write_errors"]:
            raise SystemExit(f"{name}: write errors: {stats['last_write_error']}")
        return Outcome(
            name,
            len(items),
            submit_s,
            total_s,
            cpu_s,
            rows,
            stats["dropped"],
            written_at_submit_end if chunk >= len(items) else None,
        )
    finally:
        tally.close()


def run_roll_up(db: Path, items: list[Item], batch: int) -> str:
    """SQLite rolls up lazily: store the records, close (closing does not roll up), then time
    the catch-up that the idle writer or the next report would run."""
    with Tally(f"sqlite:///{db}", instrument=False, max_queue=len(items), batch_size=batch) as t:
        for item in items:
            t.record(
                user_id=item.user_id,
                model=MODEL,
                input_tokens=item.input_tokens,
                output_tokens=item.output_tokens,
                cost_usd=item.cost_usd,
                properties={"plan": item.plan},
            )
    with Tally(f"sqlite:///{db}", instrument=False) as tally:
        start = time.perf_counter()
        rolled = rollups.catch_up(tally.engine)
        took = time.perf_counter() - start
    return (
        f"roll-up: {rolled:,} stored records rolled up in {took:.2f} s "
        f"({rolled / took:,.0f} records/s, on the writer thread when idle, off the app's path)"
    )


def writer_rows(items: list[Item]) -> list[dict[str, Any]]:
    """Rows shaped like the ones the background writer inserts."""
    base_ts = time.time_ns() // 1000
    rows = []
    for n, item in enumerate(items):
        rows.append(
            {
                "id": f"{base_ts * 1000 + n:016x}{n:016x}",
                "ts": base_ts + n,
                "user_id": item.user_id,
                "properties": {"plan": item.plan},
                "provider": "openai",
                "operation": "manual",
                "request_model": MODEL,
                "response_model": MODEL,
                "input_tokens": item.input_tokens,
                "output_tokens": item.output_tokens,
                "cached_input_tokens": item.cached_input_tokens,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "cost_nano_usd": int(item.cost_usd * 10**9),
                "cost_source": "given",
                "latency_us": None,
                "ttft_us": None,
                "status": "ok",
                "error_type": None,
                "http_status": None,
                "retries": 0,
                "usage_source": "manual",
                "request_id": None,
            }
        )
    return rows


def run_busy_app(db: Path, items: list[Item], batch: int, busy_seconds: float) -> str:
    """How fast the writer stores while the app's own thread is busy with CPU-bound Python.

    The records are submitted first (with their cost, so no pricing), then the main thread
    spins for ``busy_seconds`` and the rows stored meanwhile are counted.
    """
    tally = Tally(f"sqlite:///{db}", instrument=False, max_queue=len(items) + 1, batch_size=batch)
    try:
        for item in items:
            tally.record(
                user_id=item.user_id,
                model=MODEL,
                input_tokens=item.input_tokens,
                output_tokens=item.output_tokens,
                cached_input_tokens=item.cached_input_tokens,
                cost_usd=item.cost_usd,
                properties={"plan": item.plan},
            )
        before = tally.stats()["written"]
        start = time.perf_counter()
        spins = 0
        while time.perf_counter() - start < busy_seconds:
            spins += sum(range(200))  # stands for the app's request handling
        elapsed = time.perf_counter() - start
        during = tally.stats()["written"] - before
        if not tally.flush(timeout=None):
            raise SystemExit("busy-app: flush failed")
        stats = tally.stats()
        if count_rows(tally) != len(items) or stats["dropped"]:
            raise SystemExit("busy-app: rows missing or dropped")
    finally:
        tally.close()
    left = len(items) - before - during
    return (
        f"  busy-app: {len(items):,} records queued ({before:,} stored while queueing), then "
        f"the app thread ran CPU-bound Python for {elapsed:.1f} s: the writer stored "
        f"{during:,} records meanwhile ({'at least ' if not left else ''}"
        f"{during / elapsed:,.0f} records/s); {left:,} were still queued when it went idle"
    )


def run_raw_sqlalchemy(db: Path, rows: list[dict[str, Any]], batch: int) -> Outcome:
    # A Tally only to get the same engine settings and schema; its writer stays idle.
    tally = Tally(f"sqlite:///{db}", instrument=False)
    try:
        statement = insert(usage_table)
        cpu_start = time.process_time()
        start = time.perf_counter()
        for first in range(0, len(rows), batch):
            with tally.engine.begin() as conn:
                conn.execute(statement, rows[first : first + batch])
        total_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        return Outcome("raw-sqlalchemy", len(rows), None, total_s, cpu_s, count_rows(tally), 0)
    finally:
        tally.close()


def run_raw_sqlite3(db: Path, rows: list[dict[str, Any]], batch: int) -> Outcome:
    # Same schema (created by a Tally), then the stdlib driver alone.
    Tally(f"sqlite:///{db}", instrument=False).close()
    columns = list(rows[0])
    sql = (
        f"INSERT INTO {usage_table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        cpu_start = time.process_time()
        start = time.perf_counter()
        for first in range(0, len(rows), batch):
            values = [
                tuple(
                    json.dumps(row[c]) if c == "properties" else row[c]
                    for c in columns  # the JSON column is serialised as SQLAlchemy does
                )
                for row in rows[first : first + batch]
            ]
            conn.execute("BEGIN")
            conn.executemany(sql, values)
            conn.execute("COMMIT")
        total_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        count = conn.execute(f"SELECT count(*) FROM {usage_table.name}").fetchone()[0]
    finally:
        conn.close()
    return Outcome("raw-sqlite3", len(rows), None, total_s, cpu_s, count, 0)


def profile_writer(db: Path, items: list[Item], batch: int, limit: int, with_cost: bool) -> None:
    """cProfile the writer thread while it stores ``items`` (priced by it unless with_cost)."""
    profiler = cProfile.Profile()
    state = {"started": False}

    def start_in_writer(frame: Any, event: str, arg: Any) -> None:
        # Installed by threading.setprofile() in every new thread; the writer thread turns
        # it into a real cProfile profiler, other threads drop it.
        if threading.current_thread().name.startswith("llm-tally") and not state["started"]:
            state["started"] = True
            profiler.enable()
        else:
            sys.setprofile(None)

    threading.setprofile(start_in_writer)
    try:
        tally = Tally(
            f"sqlite:///{db}", instrument=False, max_queue=len(items) + 1, batch_size=batch
        )
    finally:
        threading.setprofile(None)
    try:
        for item in items:
            tally.record(
                user_id=item.user_id,
                model=MODEL,
                input_tokens=item.input_tokens,
                output_tokens=item.output_tokens,
                cached_input_tokens=item.cached_input_tokens,
                cost_usd=item.cost_usd if with_cost else None,
                properties={"plan": item.plan},
            )
        tally.flush(timeout=None)
    finally:
        tally.close()
    if not state["started"]:
        print("  (the writer thread was not found: nothing profiled)")
        return
    profiler.create_stats()
    stats = pstats.Stats(profiler)
    per = 1e6 / len(items)
    entries = [
        (key, calls, own, cumulative)
        for key, (_, calls, own, cumulative, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    # Lock acquisition in the writer is waiting for work (Event.wait) or for flush markers:
    # idle time, not cost; it is reported apart and left out of the shares.
    idle = sum(e[2] for e in entries if e[0][2] == "<method 'acquire' of '_thread.lock' objects>")
    entries = [e for e in entries if e[0][2] != "<method 'acquire' of '_thread.lock' objects>"]
    total = sum(e[2] for e in entries)
    print(
        f"writer thread under cProfile, {len(items):,} records "
        f"({'cost given' if with_cost else 'priced by the writer'}; profiled times are "
        f"inflated, compare shares). Busy {total * per:.1f} µs/record, idle (waiting on a "
        f"lock) {idle * per:.1f} µs/record."
    )
    print()
    print("  by cumulative time (selected frames)")
    rows: list[list[object]] = []
    interesting = (
        "_to_row",
        "cost_nano_usd",
        "calc_price",
        "_insert",
        "execute",
        "_genai_price",
        "usd_to_nano",
        "from_epoch_us",
        "_run",
    )
    for (filename, line, function), calls, _own, cumulative in sorted(entries, key=lambda e: -e[3]):
        if function in interesting and calls:
            rows.append(
                [
                    f"{_short(filename)}:{line} {function}",
                    calls,
                    cumulative * per,
                    f"{100 * cumulative / total:.0f}%" if function != "_run" else "-",
                ]
            )
    print_table(["function", "calls", "cum µs/record", "share"], rows[:14])
    print()
    print(f"  top {limit} by own time")
    rows = [
        [f"{_short(filename)}:{line} {function}", calls, own * per, f"{100 * own / total:.0f}%"]
        for (filename, line, function), calls, own, _cum in sorted(entries, key=lambda e: -e[2])[
            :limit
        ]
    ]
    print_table(["function", "calls", "own µs/record", "share"], rows)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def report(outcomes: list[Outcome], target: float) -> None:
    rows: list[list[object]] = []
    notes: list[str] = []
    for o in outcomes:
        rows.append(
            [
                o.name,
                o.records,
                f"{o.records / o.submit_s:,.0f}" if o.submit_s else "-",
                f"{o.submit_s:.2f}" if o.submit_s else "-",
                f"{o.records / o.total_s:,.0f}",
                f"{o.total_s:.2f}",
                f"{o.cpu_s / o.records * 1e6:.1f}",
                o.rows,
                o.dropped,
            ]
        )
        if o.written_at_submit_end is not None and o.submit_s:
            drained = o.records - o.written_at_submit_end
            drain_s = o.total_s - o.submit_s
            notes.append(
                f"  {o.name}: {o.written_at_submit_end:,} records stored while record() was "
                f"being called; the other {drained:,} in the {drain_s:.2f} s after it "
                f"({drained / drain_s:,.0f} records/s, writer alone)"
            )
    print_table(
        [
            "scenario",
            "records",
            "submit rec/s",
            "submit s",
            "stored rec/s",
            "end-to-end s",
            "cpu µs/rec",
            "rows",
            "dropped",
        ],
        rows,
    )
    print()
    if notes:
        print("\n".join(notes))
        print()
    for o in outcomes:
        if o.submit_s is None:
            continue
        rate = o.records / o.total_s
        verdict = "meets" if rate >= target else "MISSES"
        print(f"  {o.name}: {rate:,.0f} records/s stored -> {verdict} the >= {target:,.0f} target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records per scenario")
    parser.add_argument("--users", type=int, default=1_000, help="distinct user ids")
    parser.add_argument("--batch", type=int, default=2_000, help="writer batch size (Tally)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="Tally max_queue (default: enough for all records, so nothing is dropped)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="submit in chunks of this many records with a flush after each (default: one go)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--target", type=float, default=50_000, help="records/s target")
    parser.add_argument(
        "--only",
        choices=SCENARIOS,
        action="append",
        help="run only these scenarios (repeatable)",
    )
    parser.add_argument(
        "--profile",
        choices=["given-cost", "priced"],
        help="also cProfile the writer thread for this scenario",
    )
    parser.add_argument("--profile-records", type=int, default=20_000)
    parser.add_argument(
        "--busy-records", type=int, default=100_000, help="records queued for busy-app"
    )
    parser.add_argument(
        "--busy-seconds", type=float, default=2.0, help="CPU-bound app time in busy-app"
    )
    args = parser.parse_args()
    scenarios = args.only or list(SCENARIOS)
    chunk = args.chunk or args.records
    max_queue = args.max_queue or max(chunk, 100_000)

    print_machine_info()
    print(
        f"settings: {args.records:,} records per scenario, {args.users:,} users, model {MODEL}, "
        f"writer batch {args.batch:,}, max_queue {max_queue:,}, submit chunk {chunk:,}"
    )
    print()
    items = make_items(args.records, args.users, args.seed)
    outcomes: list[Outcome] = []
    runners: dict[str, Callable[[Path], Outcome]] = {
        "given-cost": lambda db: run_tally(
            "given-cost",
            db,
            items,
            with_cost=True,
            batch=args.batch,
            max_queue=max_queue,
            chunk=chunk,
        ),
        "priced": lambda db: run_tally(
            "priced",
            db,
            items,
            with_cost=False,
            batch=args.batch,
            max_queue=max_queue,
            chunk=chunk,
        ),
        "given-cost-parked": lambda db: run_tally(
            "given-cost-parked",
            db,
            items,
            with_cost=True,
            batch=args.batch,
            max_queue=max_queue,
            chunk=chunk,
            parked=True,
        ),
        "raw-sqlalchemy": lambda db: run_raw_sqlalchemy(db, writer_rows(items), args.batch),
        "raw-sqlite3": lambda db: run_raw_sqlite3(db, writer_rows(items), args.batch),
    }
    busy_note = roll_up_note = ""
    with tempfile.TemporaryDirectory(prefix="llm-tally-ingest-") as tmp:
        for name in scenarios:
            if name == "roll-up":
                roll_up_note = run_roll_up(Path(tmp) / "roll-up.db", items, args.batch)
                continue
            if name == "busy-app":
                busy_note = run_busy_app(
                    Path(tmp) / "busy.db",
                    items[: args.busy_records],
                    args.batch,
                    args.busy_seconds,
                )
                continue
            outcome = runners[name](Path(tmp) / f"{name}.db")
            print(f"  {name}: done in {outcome.total_s:.1f} s")
            if outcome.rows != outcome.records or outcome.dropped:
                raise SystemExit(
                    f"{name}: {outcome.rows:,} rows stored, {outcome.dropped:,} dropped "
                    f"(expected {outcome.records:,} and 0)"
                )
            outcomes.append(outcome)
        print()
        report(outcomes, args.target)
        if busy_note:
            print()
            print(busy_note)
        if roll_up_note:
            print()
            print(roll_up_note)
        if args.profile:
            print()
            profile_writer(
                Path(tmp) / "profile.db",
                items[: args.profile_records],
                args.batch,
                limit=15,
                with_cost=args.profile == "given-cost",
            )


SCENARIOS = (
    "roll-up",
    "given-cost",
    "priced",
    "given-cost-parked",
    "raw-sqlalchemy",
    "raw-sqlite3",
    "busy-app",
)

if __name__ == "__main__":
    main()

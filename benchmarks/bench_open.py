"""Time opening a store: ``Tally()`` on a SQLite store that is up to date (the common case:
tests, short scripts, every worker start), and the one-off upgrade of an llm-tally 0.1
store (which imports Alembic).

Each sample is a fresh Python process, so the first open pays what a script pays; each
process then opens and closes the store ``--cycles`` more times.

    python benchmarks/bench_open.py [--processes 12] [--cycles 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import print_machine_info, print_table, summary

SAMPLE = """
import json, sys, time
url, cycles = sys.argv[1], int(sys.argv[2])
from llm_tally import Tally
started = time.perf_counter()
Tally(url, instrument=False).close()
first = time.perf_counter() - started
started = time.perf_counter()
for _ in range(cycles):
    Tally(url, instrument=False).close()
again = (time.perf_counter() - started) / max(cycles, 1)
print(json.dumps({"first": first, "again": again, "alembic": "alembic" in sys.modules}))
"""

SCHEMA_2_OF_0_1 = """
import sys
from sqlalchemy import create_engine, text
sys.path.insert(0, sys.argv[2])
from tests.stores_0_1 import create_store
engine = create_engine(sys.argv[1])
with engine.begin() as conn:
    create_store(conn, 2)
engine.dispose()
"""


def sample(url: str, cycles: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", SAMPLE, url, str(cycles)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=12)
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    print_machine_info()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/up-to-date.db"
        sample(url, 0)  # creates it
        current = [sample(url, args.cycles) for _ in range(args.processes)]
        upgrades = []
        for i in range(max(args.processes // 2, 1)):
            old = f"sqlite:///{tmp}/old-{i}.db"
            subprocess.run([sys.executable, "-c", SCHEMA_2_OF_0_1, old, str(root)], check=True)
            upgrades.append(sample(old, 0))
    rows = []
    for label, samples, key in (
        ("first Tally() of a process, store up to date", current, "first"),
        ("each later open and close", current, "again"),
        ("first Tally() of a process, 0.1 store (upgrade)", upgrades, "first"),
    ):
        stats = summary([s[key] * 1000 for s in samples])
        rows.append((label, stats["n"], stats["median"], stats["p90"]))
    print("opening a SQLite store (ms)")
    print_table(("case", "n", "median", "p90"), rows)
    imported = sorted({bool(s["alembic"]) for s in current})
    print(f"\n  Alembic imported when the store is up to date: {imported}")


if __name__ == "__main__":
    main()

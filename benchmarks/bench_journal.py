"""What the crash journal adds to a call, in isolation.

Run by hand (not part of the test suite)::

    python benchmarks/bench_journal.py [--calls 20000] [--rounds 7]

Real OpenAI SDK calls (chat, sync, through an ``httpx2.MockTransport`` returning a realistic
completion with usage) are made inside ``llm_tally.user(...)`` with a Tally whose writer does
not run, so the finished calls stay queued. Then the steps the journal adds on the caller's
path are timed on those very calls, in a tight loop, best of ``--rounds``:

- ``entry``: the call's journal entry (record id, usage read from the SDK object, fields);
- ``entry + marshal``: plus its encoding;
- ``journal append``: what ``BackgroundWriter.submit`` does with a journal, minus queueing:
  entry, encoding, the journal lock and the copy into the memory-mapped segment.

``bench_call_overhead.py`` measures whole calls (mode ``instr. no journal`` vs
``instrumented``); on a noisy machine this isolated figure is the sharper one.
"""

from __future__ import annotations

import argparse
import marshal
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import mock_chat_client, print_machine_info

import llm_tally
from llm_tally import Tally
from llm_tally.storage.journal import Journal


def finished_calls(directory: Path, calls: int) -> list[Any]:
    """``calls`` real SDK calls, recorded and left in the queue of an idle writer."""
    client = mock_chat_client()
    tally = Tally(
        f"sqlite:///{directory / 'bench.db'}",
        flush_interval=3600.0,
        batch_size=10_000_000,
        max_queue=10_000_000,
        journal=False,
    )
    with llm_tally.user("user-123", plan="pro", feature="chat"):
        for _ in range(calls):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Capital of France?"}]
            )
    found = list(tally._writer._queue)
    tally.close()
    return found


def best_per_call(step: Any, items: list[Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        for item in items:
            item.record_id = None  # each round makes its entries afresh
        started = time.perf_counter()
        for item in items:
            step(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print_machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        items = finished_calls(Path(tmp), args.calls)
        journal = Journal(Path(tmp) / "journal", segment_bytes=64 << 20)

        def entry(item: Any) -> None:
            item.journal_entry()

        def encoded(item: Any) -> None:
            marshal.dumps(item.journal_entry(), 2)

        def append(item: Any) -> None:
            payload = marshal.dumps(item.journal_entry(), 2)
            with journal.lock:
                assert journal.current is not None
                journal.current.append(payload, False)

        size = len(marshal.dumps(items[0].journal_entry(), 2))
        print(f"{len(items):,} finished chat calls; a journal frame is {size + 8} bytes")
        print()
        print("step, µs per call (best of rounds)")
        steps = (("entry", entry), ("entry + marshal", encoded), ("journal append", append))
        for name, step in steps:
            print(f"  {name:18s} {best_per_call(step, items, args.rounds):6.2f}")
        journal.close(delete=True)


if __name__ == "__main__":
    main()

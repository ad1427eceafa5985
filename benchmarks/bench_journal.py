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

A tight loop runs with warm caches; a real call does not: the SDK's own work in between
evicts what the journal touches. So the same ``submit`` is also timed **in place**, inside
real calls (``--calls`` of them, in alternating blocks of 200 with and without a journal):
the difference of the two medians is the journal's cost where it runs. A third mode, the
``journal floor``, writes a constant 8-field entry instead of the call's: what any journal
written from Python costs on this path, whatever its entry.

``bench_call_overhead.py`` measures whole calls (mode ``idle, no journal`` vs
``instr. writer idle``); on a noisy machine these isolated figures are the sharper ones.
"""

from __future__ import annotations

import argparse
import marshal
import statistics
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


def submit_in_place(directory: Path, calls: int, block: int = 200) -> dict[str, list[float]]:
    """µs per ``BackgroundWriter.submit`` inside real calls: with and without a journal, and
    the floor of a journal write (a constant entry encoded, the lock, the copy, queueing)."""
    client = mock_chat_client()
    tallies = {
        mode: Tally(
            f"sqlite:///{directory / f'in-place-{n}.db'}",
            flush_interval=3600.0,
            batch_size=10_000_000,
            max_queue=10_000_000,
            journal=mode != "no journal",
        )
        for n, mode in enumerate(IN_PLACE)
    }
    times: dict[str, list[float]] = {name: [] for name in tallies}
    for name, tally in tallies.items():
        writer = tally._writer
        submit = writer.submit if name != "journal floor" else floor_submit(writer)

        def timed(item: Any, submit: Any = submit, out: Any = times[name]) -> None:
            started = time.perf_counter_ns()
            submit(item)
            out.append((time.perf_counter_ns() - started) / 1000)

        writer.submit = timed  # type: ignore[method-assign]
    for _ in range(-(-calls // block)):
        for tally in tallies.values():
            with llm_tally.user("user-123", plan="pro", feature="chat", tally=tally):
                for _ in range(block):
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "Capital of France?"}],
                    )
    for tally in tallies.values():
        tally.close()
    return times


IN_PLACE = ("journal", "no journal", "journal floor")
CONSTANT_ENTRY = (0,) * 8


def floor_submit(writer: Any) -> Any:
    """The least a journal write can do: encode a constant, copy it in under the lock."""
    journal, queue = writer.journal, writer._queue

    def submit(item: Any) -> None:
        payload = marshal.dumps(CONSTANT_ENTRY, 2)
        with journal.lock:
            journal.current.append(payload, False)
            queue.append(item)

    return submit


def best_per_call(step: Any, items: list[Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        for item in items:
            item.record_sequence = None  # each round makes its entries afresh
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
        print()
        print(f"BackgroundWriter.submit in place, inside {args.calls:,} real calls each, µs")
        in_place = submit_in_place(Path(tmp), args.calls)
        for name, values in in_place.items():
            values.sort()
            print(
                f"  {name:18s} median {statistics.median(values):6.2f}"
                f"   p90 {values[int(len(values) * 0.9)]:6.2f}"
            )
        without = statistics.median(in_place["no journal"])
        added = statistics.median(in_place["journal"]) - without
        floor = statistics.median(in_place["journal floor"]) - without
        print(
            f"  the journal adds   {added:6.2f} (difference of the medians); its floor {floor:.2f}"
        )


if __name__ == "__main__":
    main()

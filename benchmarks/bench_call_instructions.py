"""Instructions llm-tally adds to an OpenAI SDK call, counted by valgrind (callgrind).

Run by hand (not part of the test suite; needs ``valgrind``, takes a few minutes)::

    python benchmarks/bench_call_instructions.py [--calls 400] [--cache-sim]

Timings on a shared virtual machine move by more than the few microseconds measured here;
instruction counts do not (callgrind counts the same for the same work, whatever else the
machine does). Each mode runs in its own process under callgrind twice, with ``--calls``
and ``2 x --calls`` sync chat calls through an ``httpx2.MockTransport``; the difference
divided by ``--calls`` is the cost of one call, start-up excluded:

- ``bare``: llm-tally not instrumenting;
- ``no journal``: recorded, ``Tally(journal=False)``;
- ``journal``: recorded with the crash journal (the default).

The writers never run (``flush_interval`` of an hour; the process ends with ``os._exit``
before anything is stored), so the counts are the caller's path: the hooks, and the journal.
For the counts to repeat from run to run, string hashing is fixed (``PYTHONHASHSEED=0``),
addresses are not randomised (``setarch --addr-no-randomize``) and the garbage collector is
off during the calls (a full collection of the growing queue would land in one run and not
the other): two runs differ by a few hundred instructions in billions.

Instructions are not time: a call's first touch of code and data that the SDK's own work
pushed out of the CPU caches costs more than the instructions. ``--cache-sim`` adds
callgrind's simulated first-level cache misses (instruction fetches, data reads and writes)
per call, to show how much more memory the journal touches.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODES = ("bare", "no journal", "journal")


def run_calls(mode: str, calls: int, directory: str) -> None:
    """The measured process: ``calls`` sync chat calls in ``mode``."""
    from _common import mock_chat_client

    import llm_tally
    from llm_tally import Tally

    client = mock_chat_client()
    Tally(  # the process default: records every call below
        f"sqlite:///{directory}/bench.db",
        flush_interval=3600.0,
        batch_size=10_000_000,
        max_queue=10_000_000,
        journal=mode == "journal",
    )
    if mode == "bare":
        llm_tally.uninstrument_openai()
    messages = [{"role": "user", "content": "Capital of France?"}]
    # The queue only grows here (the writer never runs), and a full collection of it now and
    # then would add millions of instructions to one run and not the other.
    gc.disable()
    with llm_tally.user("user-123", plan="pro"):
        for _ in range(calls):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    llm_tally.uninstrument_openai()
    os._exit(0)  # the counts stop here: no flush, no close, no exit handlers


# callgrind's event names: instructions; with --cache-sim, also first-level misses (I1mr:
# instruction fetches, D1mr / D1mw: data reads / writes).
EVENTS = {
    "Ir": "instructions",
    "I1mr": "I1 misses",
    "D1mr": "D1 read misses",
    "D1mw": "D1 write misses",
}


def counts(mode: str, calls: int, cache_sim: bool) -> dict[str, int]:
    """callgrind's totals for one process making ``calls`` calls in ``mode``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                # Without address randomisation, object addresses (and so id()-keyed caches
                # and sets) are the same in every run.
                "setarch",
                platform.machine(),
                "--addr-no-randomize",
                "valgrind",
                "--tool=callgrind",
                f"--cache-sim={'yes' if cache_sim else 'no'}",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--run",
                mode,
                "--calls",
                str(calls),
                "--directory",
                tmp,
            ],
            check=True,
            capture_output=True,
            # The same string hashes in every run: dict layouts, and so the counts, repeat.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        text = out.read_text()
        events = re.search(r"^events:\s+(.+)$", text, re.MULTILINE)
        summary = re.search(r"^summary:\s+(.+)$", text, re.MULTILINE)
        assert events and summary, "no summary in callgrind's output"
        totals = dict(zip(events.group(1).split(), map(int, summary.group(1).split()), strict=True))
        return {name: totals[name] for name in EVENTS if name in totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument(
        "--cache-sim", action="store_true", help="also count first-level cache misses (slower)"
    )
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_calls(args.run, args.calls, args.directory)
        return
    jobs = [(mode, n) for mode in MODES for n in (args.calls, 2 * args.calls)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = dict(
            zip(jobs, pool.map(lambda job: counts(*job, args.cache_sim), jobs), strict=True)
        )
    for event, label in EVENTS.items():
        if event not in found[MODES[0], args.calls]:
            continue
        per_call = {
            mode: (found[mode, 2 * args.calls][event] - found[mode, args.calls][event]) / args.calls
            for mode in MODES
        }
        bare = per_call["bare"]
        print(f"{label} per sync chat call ({args.calls} and {2 * args.calls} calls per mode)")
        for mode in MODES:
            added = per_call[mode] - bare
            share = 100 * added / bare
            print(f"  {mode:11s} {per_call[mode]:12,.0f}   added {added:10,.0f} ({share:.2f} %)")
        journal = per_call["journal"] - per_call["no journal"]
        hooks = per_call["no journal"] - bare
        print(f"  the journal: {journal:,.0f} per call; the hooks without it: {hooks:,.0f}")
        print()


if __name__ == "__main__":
    main()

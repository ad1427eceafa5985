"""Instructions llm-tally adds to an OpenAI SDK call, counted by valgrind (callgrind).

Run by hand (not part of the test suite; needs ``valgrind``, takes a few minutes)::

    python benchmarks/bench_call_instructions.py [--calls 400]

Timings on a shared virtual machine move by more than the few microseconds measured here;
instruction counts do not (callgrind counts the same for the same work, whatever else the
machine does). Each mode runs in its own process under callgrind twice, with ``--calls``
and ``2 x --calls`` sync chat calls through an ``httpx2.MockTransport``; the difference
divided by ``--calls`` is the cost of one call, start-up excluded:

- ``bare``: llm-tally not instrumenting;
- ``no journal``: recorded, ``Tally(journal=False)``;
- ``journal``: recorded with the crash journal (the default).

Writers only run between the counted calls' batches at the end (``flush_interval`` of an
hour), so the counts are the caller's path: the hooks, and the journal.
"""

from __future__ import annotations

import argparse
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
    with llm_tally.user("user-123", plan="pro"):
        for _ in range(calls):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    llm_tally.uninstrument_openai()
    import os

    os._exit(0)  # the counts stop here: no flush, no close, no exit handlers


def instructions(mode: str, calls: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
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
        )
        found = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
        assert found, "no summary in callgrind's output"
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_calls(args.run, args.calls, args.directory)
        return
    jobs = [(mode, n) for mode in MODES for n in (args.calls, 2 * args.calls)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: instructions(*job), jobs), strict=True))
    per_call = {
        mode: (counts[mode, 2 * args.calls] - counts[mode, args.calls]) / args.calls
        for mode in MODES
    }
    bare = per_call["bare"]
    print(f"instructions per sync chat call ({args.calls} and {2 * args.calls} calls per mode)")
    for mode in MODES:
        added = per_call[mode] - bare
        share = 100 * added / bare
        print(f"  {mode:11s} {per_call[mode]:12,.0f}   added {added:10,.0f} ({share:.2f} %)")
    journal = per_call["journal"] - per_call["no journal"]
    print(
        f"  the journal: {journal:,.0f} instructions per call, "
        f"{100 * journal / (per_call['no journal'] - bare):.0f} % of the hooks' own"
    )


if __name__ == "__main__":
    main()

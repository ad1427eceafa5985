"""Time added to an OpenAI SDK call by llm-tally's instrumentation.

Run by hand (not part of the test suite)::

    python benchmarks/bench_call_overhead.py [--calls 4000] [--stream-calls 2000]
        [--block 200] [--warmup 200] [--only sync ...] [--profile]

Everything stays in this process: the SDK talks to an ``httpx2.MockTransport`` that returns
a fixed, pre-serialised chat completion (or SSE stream of 21 chunks, the last one carrying
usage), so what is timed is the SDK's own work plus llm-tally's hooks, with no network or
server noise. The stores are SQLite files in a temporary directory.

Four modes, run in alternating blocks of ``--block`` calls (the order rotates every round)
so that drift (CPU frequency, cache warmth, other load) hits all of them equally:

- ``bare``: the SDK uninstrumented (``llm_tally.uninstrument_openai()``): nothing recorded;
- ``instrumented``: hooks installed, calls made inside
  ``with llm_tally.user("u1", plan="pro")``, recorded by a Tally with default settings
  whose background writer prices and inserts while the calls run (it shares the GIL);
- ``instr. writer idle``: the same hooks, recorded by a second Tally whose writer only runs
  when flushed, so the numbers show the hooks' own cost without the writer competing;
- ``idle, no journal``: like ``instr. writer idle`` with the crash journal off
  (``Tally(journal=False)``): the hooks alone; the difference to ``instr. writer idle`` is
  the journal's cost.

After every block the Tallies are flushed outside the timed calls; "cpu/call" is the process
CPU time (all threads) of the block plus that flush: the full cost of a recorded call,
including the writer's pricing and insert. ``--profile`` adds a cProfile comparison of
instrumented and bare calls (sync and sync stream) listing the functions the hooks add.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import itertools
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
from _common import print_machine_info, print_table, summary
from sqlalchemy import func, select

import llm_tally
from llm_tally import Tally, UsageRecord

MODEL = "gpt-4o-mini"
RESPONSE_MODEL = "gpt-4o-mini-2024-07-18"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a travel booking site."},
    {"role": "user", "content": "Suggest three things to do in Lisbon on a rainy afternoon."},
]
PROMPT_TOKENS = 41
COMPLETION_TOKENS = 96
CACHED_TOKENS = 0
STREAM_CONTENT_CHUNKS = 18  # plus a role chunk, a finish chunk and a usage chunk

usage_table = UsageRecord.__table__  # type: ignore[attr-defined]

REPLY = (
    "1. Visit the Gulbenkian Museum, whose collection spans Egyptian art to Lalique jewellery. "
    "2. Ride tram 28 through Alfama and stop for a pastel de nata in a cafe along the way. "
    "3. Explore the LX Factory: bookshops, design stores and restaurants under one roof."
)

HEADERS = {
    "content-type": "application/json",
    "x-request-id": "req_0123456789abcdef0123456789abcdef",
    "openai-processing-ms": "412",
    "openai-version": "2020-10-01",
}


def _usage() -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_body() -> bytes:
    body = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1764201600,
        "model": RESPONSE_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": REPLY,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(),
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
    }
    return json.dumps(body).encode()


def stream_events() -> list[bytes]:
    """One SSE event per list item: role chunk, content chunks, finish chunk, usage chunk."""
    base = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1764201600,
        "model": RESPONSE_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
    }
    words = REPLY.split(" ")
    size = len(words) / STREAM_CONTENT_CHUNKS
    bounds = [round(n * size) for n in range(STREAM_CONTENT_CHUNKS + 1)]
    pieces = [" ".join(words[a:b]) + " " for a, b in itertools.pairwise(bounds)]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": piece} for piece in pieces]
    chunks = [
        {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            "usage": None,
        }
        for delta in deltas
    ]
    chunks.append(
        {
            **base,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            "usage": None,
        }
    )
    chunks.append({**base, "choices": [], "usage": _usage()})
    events = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks]
    events.append(b"data: [DONE]\n\n")
    return events


BODY = completion_body()
EVENTS = stream_events()
DATA_CHUNKS = len(EVENTS) - 1  # SSE data events that carry a chunk (not [DONE])
SSE_HEADERS = {**HEADERS, "content-type": "text/event-stream; charset=utf-8"}


def _is_stream(request: httpx2.Request) -> bool:
    return b'"stream":true' in request.content or b'"stream": true' in request.content


def sync_handler(request: httpx2.Request) -> httpx2.Response:
    if _is_stream(request):
        return httpx2.Response(200, headers=SSE_HEADERS, content=iter(EVENTS))
    return httpx2.Response(200, headers=HEADERS, content=BODY)


async def _aiter_events() -> AsyncIterator[bytes]:
    for event in EVENTS:
        yield event


def async_handler(request: httpx2.Request) -> httpx2.Response:
    if _is_stream(request):
        return httpx2.Response(200, headers=SSE_HEADERS, content=_aiter_events())
    return httpx2.Response(200, headers=HEADERS, content=BODY)


def make_sync_client() -> openai.OpenAI:
    return openai.OpenAI(
        base_url="https://api.openai.com/v1",
        api_key="x",
        http_client=httpx2.Client(transport=httpx2.MockTransport(sync_handler)),
        max_retries=0,
    )


def make_async_client() -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="https://api.openai.com/v1",
        api_key="x",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(async_handler)),
        max_retries=0,
    )


# -- one call of each kind -------------------------------------------------------------------


def sync_call(client: openai.OpenAI) -> int:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.usage is not None
    return 1


def sync_stream_call(client: openai.OpenAI) -> int:
    count = 0
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    for _chunk in stream:
        count += 1
    return count


async def async_call(client: openai.AsyncOpenAI) -> int:
    completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.usage is not None
    return 1


async def async_stream_call(client: openai.AsyncOpenAI) -> int:
    count = 0
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    async for _chunk in stream:
        count += 1
    return count


# -- the interleaved runner ------------------------------------------------------------------

BARE = "bare"
INSTRUMENTED = "instrumented"
IDLE_WRITER = "instr. writer idle"
NO_JOURNAL = "idle, no journal"
MODES = (BARE, INSTRUMENTED, IDLE_WRITER, NO_JOURNAL)
RECORDING = (INSTRUMENTED, IDLE_WRITER, NO_JOURNAL)


class Modes:
    """The three Tallies: one with default writer settings, and two whose writers only run
    when flushed (between blocks), with and without the journal: they separate the hooks'
    own cost, the journal's and the writer's."""

    def __init__(self, tmp: Path) -> None:
        self.tally = Tally(f"sqlite:///{tmp / 'bench.db'}")
        self.idle = Tally(
            f"sqlite:///{tmp / 'bench-idle-writer.db'}",
            flush_interval=3600.0,
            batch_size=1_000_000,
            max_queue=1_000_000,
        )
        self.no_journal = Tally(
            f"sqlite:///{tmp / 'bench-no-journal.db'}",
            flush_interval=3600.0,
            batch_size=1_000_000,
            max_queue=1_000_000,
            journal=False,
        )

    def enter(self, mode: str) -> llm_tally.user:
        """Install or remove the hooks for ``mode``; the user scope the block runs in."""
        if mode == BARE:
            llm_tally.uninstrument_openai()
        else:
            llm_tally.instrument_openai()
        tally = {IDLE_WRITER: self.idle, NO_JOURNAL: self.no_journal}.get(mode, self.tally)
        return llm_tally.user("u1", plan="pro", tally=tally)

    def flush(self) -> None:
        self.tally.flush(timeout=None)
        self.idle.flush(timeout=None)
        self.no_journal.flush(timeout=None)

    def close(self) -> None:
        self.tally.close()
        self.idle.close()
        self.no_journal.close()


class Result:
    def __init__(self, name: str, chunks_per_call: int) -> None:
        self.name = name
        self.chunks_per_call = chunks_per_call
        self.times: dict[str, list[float]] = {mode: [] for mode in MODES}
        self.block_medians: dict[str, list[float]] = {mode: [] for mode in MODES}
        self.cpu: dict[str, float] = dict.fromkeys(MODES, 0.0)
        self.seen_chunks: dict[str, int] = dict.fromkeys(MODES, 0)

    def add_block(self, mode: str, times_us: list[float], cpu_s: float, chunks: int) -> None:
        self.times[mode].extend(times_us)
        self.block_medians[mode].append(statistics.median(times_us))
        self.cpu[mode] += cpu_s
        self.seen_chunks[mode] += chunks


def block_order(block: int) -> tuple[str, ...]:
    """Rotate the order of the modes from one round of blocks to the next."""
    shift = block % len(MODES)
    return MODES[shift:] + MODES[:shift]


def run_sync(
    modes: Modes, result: Result, call: Callable[[], int], calls: int, block: int, warmup: int
) -> None:
    clock = time.perf_counter_ns
    for mode in MODES:
        with modes.enter(mode):
            for _ in range(warmup):
                call()
    modes.flush()
    for number in range(-(-calls // block)):
        for mode in block_order(number):
            scope = modes.enter(mode)
            gc.collect()
            times: list[float] = []
            chunks = 0
            cpu_start = time.process_time()
            with scope:
                for _ in range(block):
                    start = clock()
                    chunks += call()
                    times.append((clock() - start) / 1000)
            modes.flush()  # outside the timed calls, inside the CPU time
            result.add_block(mode, times, time.process_time() - cpu_start, chunks)
    llm_tally.instrument_openai()


async def run_async(
    modes: Modes,
    result: Result,
    call: Callable[[], Awaitable[int]],
    calls: int,
    block: int,
    warmup: int,
) -> None:
    clock = time.perf_counter_ns
    for mode in MODES:
        with modes.enter(mode):
            for _ in range(warmup):
                await call()
    modes.flush()
    for number in range(-(-calls // block)):
        for mode in block_order(number):
            scope = modes.enter(mode)
            gc.collect()
            times: list[float] = []
            chunks = 0
            cpu_start = time.process_time()
            with scope:
                for _ in range(block):
                    start = clock()
                    chunks += await call()
                    times.append((clock() - start) / 1000)
            modes.flush()
            result.add_block(mode, times, time.process_time() - cpu_start, chunks)
    llm_tally.instrument_openai()


def measure_user_scope(iterations: int) -> float:
    """µs to enter and leave ``with llm_tally.user("u1", plan="pro")`` (once per request)."""
    start = time.perf_counter_ns()
    for _ in range(iterations):
        with llm_tally.user("u1", plan="pro"):
            pass
    return (time.perf_counter_ns() - start) / 1000 / iterations


# -- profile ---------------------------------------------------------------------------------


def profile_calls(modes: Modes, name: str, call: Callable[[], int], calls: int) -> None:
    """cProfile ``calls`` bare and instrumented calls; print what the instrumented ones add."""
    profiled: dict[str, dict[Any, Any]] = {}
    for mode in (BARE, NO_JOURNAL):
        with modes.enter(mode):
            for _ in range(100):
                call()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                call()
            profiler.disable()
        modes.flush()
        profiler.create_stats()
        profiled[mode] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    llm_tally.instrument_openai()
    bare, inst = profiled[BARE], profiled[NO_JOURNAL]
    extra_calls = (sum(v[1] for v in inst.values()) - sum(v[1] for v in bare.values())) / calls
    extra_own = (sum(v[2] for v in inst.values()) - sum(v[2] for v in bare.values())) / calls
    print(
        f"{name}: cProfile of {calls:,} calls, instrumented (writer idle) vs bare: "
        f"{extra_calls:+.0f} Python function calls and {extra_own * 1e6:+.1f} µs per call "
        "(profiled, so inflated)"
    )
    # Functions the hooks call (their call count changed); SDK functions run the same number
    # of times in both modes and only differ by profiler noise, so they are left out.
    hooked = [
        key for key in set(bare) | set(inst) if inst.get(key, (0, 0))[1] != bare.get(key, (0, 0))[1]
    ]
    rows: list[list[object]] = []
    own_diff = {k: inst.get(k, (0, 0, 0.0))[2] - bare.get(k, (0, 0, 0.0))[2] for k in hooked}
    print(
        f"  own time of the {len(hooked)} functions whose call count changed: "
        f"+{sum(own_diff.values()) / calls * 1e6:.1f} µs per call"
    )
    for key in sorted(hooked, key=lambda k: -own_diff[k])[:20]:
        before = bare.get(key, (0, 0, 0.0, 0.0))
        after = inst.get(key, (0, 0, 0.0, 0.0))
        filename, line, function = key
        rows.append(
            [
                f"{_short(filename)}:{line} {function}",
                f"{(after[1] - before[1]) / calls:+.1f}",
                f"{(after[2] - before[2]) / calls * 1e6:+.2f}",
                f"{after[3] / calls * 1e6:.2f}",
            ]
        )
    print_table(["function", "calls/call", "own µs/call", "cum µs/call (instr.)"], rows)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# -- report ----------------------------------------------------------------------------------


def report(results: list[Result], target_us: float) -> None:
    print("per call, µs (perf_counter around the SDK call; cpu/call = process CPU incl. writer)")
    rows: list[list[object]] = []
    for result in results:
        for mode in MODES:
            s = summary(result.times[mode])
            calls = int(s["n"])
            rows.append(
                [
                    f"{result.name} {mode}",
                    calls,
                    s["median"],
                    s["p90"],
                    s["p99"],
                    s["mean"],
                    result.cpu[mode] / calls * 1e6,
                ]
            )
    print_table(["scenario", "calls", "median", "p90", "p99", "mean", "cpu/call"], rows)
    print()
    print("added by llm-tally, µs per call (mode - bare)")
    rows = []
    verdicts: list[str] = []
    for result in results:
        bare = summary(result.times[BARE])
        for mode in RECORDING:
            inst = summary(result.times[mode])
            median_diff = inst["median"] - bare["median"]
            paired = statistics.median(
                i - b
                for i, b in zip(result.block_medians[mode], result.block_medians[BARE], strict=True)
            )
            cpu_diff = (result.cpu[mode] / inst["n"] - result.cpu[BARE] / bare["n"]) * 1e6
            per_chunk = (
                f"{median_diff / result.chunks_per_call:.2f}" if result.chunks_per_call > 1 else "-"
            )
            rows.append(
                [
                    f"{result.name} {mode}",
                    median_diff,
                    f"{100 * median_diff / bare['median']:.1f}%",
                    paired,
                    inst["p90"] - bare["p90"],
                    inst["mean"] - bare["mean"],
                    cpu_diff,
                    per_chunk,
                ]
            )
        median_diff = summary(result.times[INSTRUMENTED])["median"] - bare["median"]
        verdicts.append(
            f"  {result.name}: median +{median_diff:.1f} µs -> "
            + ("meets" if median_diff <= target_us else "MISSES")
            + f" the <= {target_us:g} µs target"
        )
    print_table(
        ["scenario", "median", "rel.", "paired", "p90", "mean", "cpu/call", "median/chunk"],
        rows,
    )
    print(
        "  paired = median over rounds of (block median - adjacent bare block median); "
        "median/chunk = median / chunks per stream"
    )
    print()
    print("\n".join(verdicts))


def check_store(tally: Tally, expected: int) -> None:
    stats = tally.stats()
    with tally.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(usage_table)).scalar_one()
        sources = conn.execute(
            select(usage_table.c.cost_source, func.count()).group_by(usage_table.c.cost_source)
        ).all()
    totals = tally.user_totals("u1")
    print(
        f"  {tally.database_url.rsplit('/', 1)[-1]}: {rows:,} rows (expected {expected:,}), "
        f"written={stats['written']:,} dropped={stats['dropped']} "
        f"write_errors={stats['write_errors']}, cost sources {dict(sources)}, "
        f"u1: {totals.requests:,} requests, {totals.input_tokens:,} input tokens, "
        f"${totals.cost_usd}"
    )
    if rows != expected or stats["dropped"] or totals.input_tokens != expected * PROMPT_TOKENS:
        raise SystemExit("store check failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="timed calls per mode")
    parser.add_argument("--stream-calls", type=int, default=2000, help="timed streams per mode")
    parser.add_argument("--block", type=int, default=200, help="calls per alternating block")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per mode first")
    parser.add_argument("--target-us", type=float, default=10.0, help="target median overhead")
    parser.add_argument(
        "--only",
        choices=SCENARIOS,
        action="append",
        help="run only these scenarios (repeatable)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile sync and sync-stream calls and show what the hooks add",
    )
    args = parser.parse_args()
    scenarios = args.only or list(SCENARIOS)

    print_machine_info()
    print(
        f"settings: {args.calls:,} calls / {args.stream_calls:,} streams per mode, blocks of "
        f"{args.block}, {args.warmup} warm-up calls per mode; a completion body is "
        f"{len(BODY)} B, a stream carries {DATA_CHUNKS} chunks (incl. the usage chunk)"
    )
    print(f"modes: {BARE!r}: SDK uninstrumented, nothing recorded; {INSTRUMENTED!r}: default")
    print(f"  Tally, writer running concurrently; {IDLE_WRITER!r}: hooks only, the writer runs")
    print("  between blocks (untimed)")
    print()

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="llm-tally-bench-") as tmp:
        modes = Modes(Path(tmp))
        try:
            scope_us = measure_user_scope(20_000)
            print(f"user() scope enter+exit: {scope_us:.2f} µs (once per request, not included)")
            sync_client = make_sync_client()
            async_client = make_async_client()
            calls_of: dict[str, Callable[[], Any]] = {
                "sync": lambda: sync_call(sync_client),
                "sync-stream": lambda: sync_stream_call(sync_client),
                "async": lambda: async_call(async_client),
                "async-stream": lambda: async_stream_call(async_client),
            }
            recorded = dict.fromkeys(MODES, 0)
            for name in scenarios:
                stream = name.endswith("stream")
                calls = args.stream_calls if stream else args.calls
                result = Result(name, DATA_CHUNKS if stream else 1)
                started = time.perf_counter()
                if name.startswith("async"):
                    asyncio.run(
                        run_async(modes, result, calls_of[name], calls, args.block, args.warmup)
                    )
                else:
                    run_sync(modes, result, calls_of[name], calls, args.block, args.warmup)
                for mode in RECORDING:
                    recorded[mode] += args.warmup + len(result.times[mode])
                seen = ", ".join(
                    f"{mode} {result.seen_chunks[mode] / len(result.times[mode]):g}"
                    for mode in MODES
                )
                print(
                    f"  {name}: done in {time.perf_counter() - started:.1f} s; chunks seen by "
                    f"the caller per call: {seen}"
                )
                results.append(result)
            print()
            modes.flush()
            print("store check (bare calls record nothing):")
            check_store(modes.tally, recorded[INSTRUMENTED])
            check_store(modes.idle, recorded[IDLE_WRITER])
            check_store(modes.no_journal, recorded[NO_JOURNAL])
            if args.profile:
                print()
                profile_calls(modes, "sync", calls_of["sync"], 2000)
                print()
                profile_calls(modes, "sync-stream", calls_of["sync-stream"], 1000)
        finally:
            modes.close()
    print()
    report(results, args.target_us)


SCENARIOS = ("sync", "sync-stream", "async", "async-stream")

if __name__ == "__main__":
    main()

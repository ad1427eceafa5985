"""Time the reporting queries on a large store: 10 million calls, 100,000 users, 90 days.

Generates the store through the public ``tally.record`` path (reused when it exists), then
times the questions of issue 4 against their targets:

    one user's month totals        <= 5 ms
    top-100 users for a month      <= 50 ms
    totals by plan for a month     <= 50 ms
    dashboard users page           <= 200 ms

    python benchmarks/bench_queries.py [--records 10000000] [--users 100000] [--days 90]
                                       [--path /tmp/llm-tally-bench.db] [--repeat 5]
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from _common import print_machine_info

from llm_tally import Tally, month_period
from llm_tally.storage import rollups
from llm_tally.web import dashboard

PLANS = (("free", 0.7), ("pro", 0.25), ("team", 0.05))
FEATURES = ("chat", "search", "summarize", "agent")
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini")
END = datetime(2026, 11, 27, tzinfo=UTC)


def generate(tally: Tally, records: int, users: int, days: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    plans = [p for p, _ in PLANS]
    weights = [w for _, w in PLANS]
    user_plan = {u: rng.choices(plans, weights)[0] for u in range(users)}
    # Zipf (s = 1) over every user: user-000000 makes ~8% of the calls, user-099999 a few
    # per month, and nearly all 100,000 users are active each month.
    cumulative = list(itertools.accumulate(1 / (u + 1) for u in range(users)))
    total_weight = cumulative[-1]
    start = END - timedelta(days=days)
    span_us = days * 86_400_000_000
    began = time.perf_counter()
    for i in range(records):
        u = bisect.bisect(cumulative, rng.random() * total_weight)
        tally.record(
            user_id=f"user-{u:06d}",
            model=rng.choice(MODELS),
            input_tokens=rng.randint(20, 4000),
            output_tokens=rng.randint(1, 1500),
            cost_usd=Decimal(rng.randint(1, 20_000)) / 1_000_000,
            # In time order, as production traffic arrives (a minute of jitter).
            ts=start + timedelta(microseconds=i * span_us // records + rng.randrange(60_000_000)),
            properties={"plan": user_plan[u], "feature": rng.choice(FEATURES)},
        )
        if i % 100_000 == 99_999:
            tally.flush(timeout=None)
            rate = (i + 1) / (time.perf_counter() - began)
            print(f"\r  generated {i + 1:,} records ({rate:,.0f}/s)", end="", flush=True)
    tally.flush(timeout=None)
    print()
    began = time.perf_counter()
    rolled = rollups.catch_up(tally.engine)
    print(f"  rolled up the last {rolled:,} records in {time.perf_counter() - began:.1f} s")


def timed(name: str, target_ms: float | None, fn: Callable[[], Any], repeat: int) -> None:
    fn()  # warm the page cache
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    median = statistics.median(times)
    if target_ms is None:
        print(f"  {name:<34} median {median:10.1f} ms  (no target)")
        return
    verdict = "meets" if median <= target_ms else "MISSES"
    print(f"  {name:<34} median {median:10.1f} ms  (target {target_ms:g} ms: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--path", default="/tmp/llm-tally-bench-queries.db")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print_machine_info()
    url = f"sqlite:///{args.path}"
    fresh = not os.path.exists(args.path)
    with Tally(url, instrument=False, max_queue=200_000) as tally:
        if fresh:
            print(f"generating {args.records:,} records, {args.users:,} users, {args.days} days")
            generate(tally, args.records, args.users, args.days)
        stored = tally.count_records()
        size = os.path.getsize(args.path) / 1e9
        print(f"store: {stored:,} records, {size:.2f} GB at {args.path}\n")
        month = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
        paris = month_period(2026, 11, tz="Europe/Paris")
        heavy = tally.users(*month, limit=1)[0].user_id
        typical = "user-050000"
        timed(
            "one user's month totals (heavy)",
            5,
            lambda: tally.user_totals(heavy, *month),
            args.repeat,
        )
        timed(
            "one user's month totals (typical)",
            5,
            lambda: tally.user_totals(typical, *month),
            args.repeat,
        )
        timed(
            "one user's Paris month (heavy)",
            None,
            lambda: tally.user_totals(heavy, *paris),
            args.repeat,
        )
        timed("top-100 users for a month", 50, lambda: tally.users(*month, limit=100), args.repeat)
        timed(
            "top-100 users, by requests",
            None,
            lambda: tally.users(*month, order_by="requests", limit=100),
            args.repeat,
        )
        timed(
            "totals by plan for a month", 50, lambda: tally.totals_by("plan", *month), args.repeat
        )
        timed("users in the month", None, lambda: tally.count_users(*month), args.repeat)
        timed(
            "costliest (model, feature) pairs",
            None,
            lambda: tally.expensive_pairs("feature", *month),
            args.repeat,
        )
        timed("period totals", None, lambda: tally.totals(*month), args.repeat)
        timed(
            "heavy user's daily chart",
            None,
            lambda: tally.user_daily(heavy, *month),
            args.repeat,
        )
        timed("anomalies, last hour", None, lambda: tally.anomalies("hour", now=END), args.repeat)
        timed("anomalies, last day", None, lambda: tally.anomalies("day", now=END), args.repeat)
        timed(
            "top-100 users, Paris month", None, lambda: tally.users(*paris, limit=100), args.repeat
        )
        timed(
            "totals by plan, Paris month",
            None,
            lambda: tally.totals_by("plan", *paris),
            args.repeat,
        )
        params = {"since": "2026-11-01", "until": "2026-12-01"}
        timed(
            "dashboard users page",
            200,
            lambda: dashboard.users_page(tally, params, now=END),
            args.repeat,
        )
        timed(
            "dashboard anomalies page",
            None,
            lambda: dashboard.anomalies_page(tally, params, now=END),
            args.repeat,
        )
        timed(
            "dashboard page of the heavy user",
            None,
            lambda: dashboard.user_page(tally, heavy, params, now=END),
            args.repeat,
        )


if __name__ == "__main__":
    main()

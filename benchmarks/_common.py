"""Shared helpers of the benchmark scripts (machine info, statistics, table printing, a
mock-served chat client)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGES = ("llm-tally", "openai", "httpx2", "sqlalchemy", "sqlmodel", "genai-prices")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def print_machine_info() -> None:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    print("machine")
    print(f"  python       {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"  platform     {platform.platform()}")
    print(f"  cpus         {os.cpu_count()}" + (f" x {cpu_model}" if cpu_model else ""))
    try:
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        print(f"  load avg     {load} (1, 5, 15 min; other work on the machine adds noise)")
    except OSError:
        pass
    for name in PACKAGES:
        print(f"  {name:<12} {package_version(name)}")
    print()


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "mean": statistics.fmean(ordered),
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for number, row in enumerate(cells):
        first = row[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        print(f"  {first}  {rest}")
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# A small chat completion with usage, as OpenAI sends it.
CHAT_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital of France."},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 41,
            "completion_tokens": 8,
            "total_tokens": 49,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    }
).encode()


def mock_chat_client() -> Any:
    """A sync ``openai.OpenAI`` for OpenAI's API whose every answer is CHAT_BODY, in memory."""
    import httpx2
    import openai

    return openai.OpenAI(
        base_url="https://api.openai.com/v1",
        api_key="sk-bench",
        http_client=httpx2.Client(
            transport=httpx2.MockTransport(
                lambda request: httpx2.Response(
                    200, content=CHAT_BODY, headers={"content-type": "application/json"}
                )
            )
        ),
    )

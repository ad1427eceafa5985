"""One LLM call as it travels from the hook to the store (in memory only)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_ABORTED = "aborted"

USAGE_PROVIDER = "provider"  # counted by the provider and reported in its response
USAGE_ESTIMATED = "estimated"  # counted here with tiktoken (no usage in the response)
USAGE_MANUAL = "manual"  # given to Tally.record()


def new_record_id() -> str:
    """A 32-hex-digit id: time-ordered (good for B-tree inserts) and unique across processes."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


@dataclass(slots=True)
class Estimate:
    """What tiktoken needs when the provider reported no usage. Never stored."""

    model: str | None
    prompt: Any = None  # the request body's messages / input, counted in the writer thread
    output_parts: list[str] = field(default_factory=list)
    count_prompt: bool = True
    count_output: bool = True


@dataclass(slots=True)
class CallRecord:
    """A finished call, waiting for the background writer to price and store it."""

    id: str
    ts_us: int
    user_id: str | None
    properties: dict[str, str]
    provider: str
    operation: str
    request_model: str | None
    response_model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano_usd: int | None = None
    cost_source: str | None = None
    latency_us: int | None = None
    ttft_us: int | None = None
    status: str = STATUS_OK
    error_type: str | None = None
    http_status: int | None = None
    retries: int = 0
    usage_source: str = USAGE_PROVIDER
    request_id: str | None = None
    base_url: str | None = None
    # Run by the writer thread before pricing (parse a raw body, count estimated tokens):
    # work kept off the caller's path. Holds request/response data only until then.
    resolve: Callable[[CallRecord], None] | None = None

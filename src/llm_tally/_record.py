"""One LLM call as it travels from the hook to the store (in memory only)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_ABORTED = "aborted"

USAGE_PROVIDER = "provider"  # counted by the provider and reported in its response
USAGE_ESTIMATED = "estimated"  # counted here with tiktoken (no usage in the response)
USAGE_MANUAL = "manual"  # given to Tally.record()


def new_record_id(ts_us: int | None = None) -> str:
    """A 32-hex-digit id: time-ordered (good for B-tree inserts) and unique across processes."""
    ts_ns = time.time_ns() if ts_us is None else ts_us * 1000
    return f"{ts_ns:016x}{os.urandom(8).hex()}"


class PendingRecord(Protocol):
    """A finished call the writer thread still has to turn into a record."""

    def to_record(self) -> CallRecord: ...


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
    base_url: str | None = None  # of an OpenAI-compatible server, to look its prices up

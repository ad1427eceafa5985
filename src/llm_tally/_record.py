"""One LLM call as it travels from the hook to the store (in memory only)."""

from __future__ import annotations

import itertools
import operator
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_ABORTED = "aborted"

USAGE_PROVIDER = "provider"  # counted by the provider and reported in its response
USAGE_ESTIMATED = "estimated"  # counted here with tiktoken (no usage in the response)
USAGE_MANUAL = "manual"  # given to Tally.record()
# Replayed from the crash journal, which holds no prompt or output to count tokens from: the
# process died before it read the usage of a response it had kept raw (or had to estimate).
USAGE_UNKNOWN = "unknown"

_id_prefix = os.urandom(4).hex()
_id_sequence = itertools.count()


def _new_id_prefix() -> None:
    global _id_prefix
    _id_prefix = os.urandom(4).hex()


# A forked child must not share its parent's ids.
os.register_at_fork(after_in_child=_new_id_prefix)


def new_record_id(ts_us: int | None = None) -> str:
    """A 32-hex-digit id: time-ordered (good for B-tree inserts) and unique across processes
    (a random 32-bit prefix per process, then a per-process sequence)."""
    if ts_us is None:
        ts_us = time.time_ns() // 1000
    return format_record_id(ts_us, _id_prefix, next(_id_sequence))


def new_record_sequence() -> tuple[str, int]:
    """The parts of a new record id, formatted later by :func:`format_record_id`: formatting
    is left off the caller's path."""
    return _id_prefix, next(_id_sequence)


def format_record_id(ts_us: int, prefix: str, sequence: int) -> str:
    """The id of a record made at ``ts_us`` (see :func:`new_record_id`)."""
    return f"{ts_us * 1000:016x}{prefix}{sequence & 0xFFFFFFFF:08x}"


class PendingRecord(Protocol):
    """A finished call the writer thread still has to turn into a record."""

    user_id: str | None

    def journal_entry(self) -> tuple[Any, ...]: ...

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

    def journal_entry(self) -> tuple[Any, ...]:
        """This record as a journal entry (see :func:`record_from_entry`)."""
        return (
            ENTRY_VERSION,
            self.id,
            None,
            journal_fields(self),
            token_counts(self),
            self.cost_nano_usd,
            self.cost_source,
            self.usage_source,
        )


# A journal entry is made on the caller's path for every call, so it is built from C-level
# steps (one attrgetter for most fields, marshal for the bytes) and is a tuple:
#
#     (ENTRY_VERSION, id or id prefix, None or id sequence, JOURNAL_FIELDS' values,
#      the 5 token counts or None, cost_nano_usd, cost_source, usage_source)
#
# The id is formatted when the entry is read (format_record_id). Bump the version when the
# layout changes: entries of another version are not replayed (each is counted as a "journal
# replay" internal error), so once a release has written one, keep reading its layout too.
ENTRY_VERSION = 2
JOURNAL_FIELDS = (
    "ts_us",
    "user_id",
    "properties",
    "provider",
    "operation",
    "request_model",
    "response_model",
    "latency_us",
    "ttft_us",
    "status",
    "error_type",
    "http_status",
    "retries",
    "request_id",
    "base_url",
)
journal_fields = operator.attrgetter(*JOURNAL_FIELDS)
# The token counts, in the order usage_counts() gives them.
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
token_counts = operator.attrgetter(*TOKEN_FIELDS)
_NO_TOKENS = (0,) * len(TOKEN_FIELDS)


def record_from_entry(entry: Any) -> CallRecord:
    """The record a journal entry holds; ValueError for an entry this version cannot read."""
    if not isinstance(entry, tuple) or len(entry) != 8 or entry[0] != ENTRY_VERSION:
        raise ValueError("not a journal entry of this llm-tally version")
    _, id_or_prefix, sequence, values, tokens, cost_nano_usd, cost_source, usage_source = entry
    record_id = (
        id_or_prefix if sequence is None else format_record_id(values[0], id_or_prefix, sequence)
    )
    return CallRecord(
        id=record_id,
        **dict(zip(JOURNAL_FIELDS, values, strict=True)),
        **dict(zip(TOKEN_FIELDS, tokens or _NO_TOKENS, strict=True)),
        cost_nano_usd=cost_nano_usd,
        cost_source=cost_source,
        usage_source=usage_source,
    )

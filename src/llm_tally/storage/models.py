"""The schema. One row per LLM call; prompts and completions are never stored.

Times are integer microseconds since the Unix epoch (UTC) and money is integer
nano-USD: both compare and sum exactly and identically on SQLite and PostgreSQL,
and stay compact over tens of millions of rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1

_JSON = JSON().with_variant(JSONB(), "postgresql")


class UsageRecord(SQLModel, table=True):
    """One LLM call (or one manual record) and what it cost."""

    __tablename__ = "llm_tally_usage"
    __table_args__ = (
        # Per-user totals over a period: the most frequent query.
        Index("ix_llm_tally_usage_user_ts", "user_id", "ts"),
        # Everything in a period (top users, exports, pruning).
        Index("ix_llm_tally_usage_ts", "ts"),
    )

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    ts: int = Field(sa_column=Column(BigInteger, nullable=False))
    user_id: str | None = Field(default=None, sa_column=Column(String(256)))
    properties: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(_JSON, nullable=False)
    )
    provider: str = Field(sa_column=Column(String(64), nullable=False))
    operation: str = Field(sa_column=Column(String(32), nullable=False))
    request_model: str | None = Field(default=None, sa_column=Column(String(256)))
    response_model: str | None = Field(default=None, sa_column=Column(String(256)))
    input_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    output_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    cached_input_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    cache_write_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    reasoning_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    cost_nano_usd: int | None = Field(default=None, sa_column=Column(BigInteger))
    cost_source: str = Field(sa_column=Column(String(32), nullable=False))
    latency_us: int | None = Field(default=None, sa_column=Column(BigInteger))
    ttft_us: int | None = Field(default=None, sa_column=Column(BigInteger))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    error_type: str | None = Field(default=None, sa_column=Column(String(128)))
    http_status: int | None = Field(default=None, sa_column=Column(Integer))
    retries: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    usage_source: str = Field(sa_column=Column(String(16), nullable=False))
    request_id: str | None = Field(default=None, sa_column=Column(String(128)))


class StoreMeta(SQLModel, table=True):
    """Key/value facts about the store itself (schema version, for migrations)."""

    __tablename__ = "llm_tally_meta"

    key: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(String(256), nullable=False))


usage_table = UsageRecord.__table__  # type: ignore[attr-defined]
meta_table = StoreMeta.__table__  # type: ignore[attr-defined]

"""The schema. One row per LLM call; prompts and completions are never stored.

Times are integer microseconds since the Unix epoch (UTC) and money is integer
nano-USD: both compare and sum exactly and identically on SQLite and PostgreSQL,
and stay compact over tens of millions of rows.

These models are the newest revision of the schema. Stores are created and upgraded by
the migrations in ``migrations/versions/``: change a table here and add a revision there
(docs/migrations.md).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, String, Table
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

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
    """Key/value facts about the store itself (SQLite's rollup watermark; ``schema_version``
    is what llm-tally 0.1 recorded, before revisions)."""

    __tablename__ = "llm_tally_meta"

    key: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(String(256), nullable=False))


usage_table = UsageRecord.__table__  # type: ignore[attr-defined]
meta_table = StoreMeta.__table__  # type: ignore[attr-defined]


# -- rollups ---------------------------------------------------------------------------------
# Sums of the calls, kept up to date as records are written (see rollups.py), so that reports
# over long periods read a few rows per user instead of every call. They hold no more than
# the calls they sum. "No user" and "no model" are stored as '' (key columns are NOT NULL on
# every database); user ids and property keys are never empty, so '' cannot be confused.


#: What every rollup row sums: ``cost_nano_usd`` is the priced calls' cost, ``unpriced``
#: counts the others; ``first_ts``/``last_ts`` are the earliest and latest call.
MEASURES = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "unpriced",
    "first_ts",
    "last_ts",
)


def _measures() -> list[Column[Any]]:
    return [Column(name, BigInteger, nullable=False) for name in MEASURES]


_metadata = SQLModel.metadata

#: Per UTC hour, user, provider, operation, model and set of properties. The unique key is
#: not declared here (PostgreSQL indexes a hash of the properties): migration 0002 and
#: rollups.create_rollup_keys create it.
hourly_table = Table(
    "llm_tally_rollup_hourly",
    _metadata,
    Column("hour", BigInteger, nullable=False),
    Column("user_key", String(256), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("model", String(256), nullable=False),
    Column("properties", _JSON, nullable=False),
    *_measures(),
    Index("ix_llm_tally_rollup_hourly_user", "user_key", "hour"),
)

#: Per user and UTC month: one user's months, and "top users" through the cost index.
monthly_users_table = Table(
    "llm_tally_rollup_monthly_users",
    _metadata,
    Column("user_key", String(256), primary_key=True),
    Column("month", BigInteger, primary_key=True),
    *_measures(),
    Index("ix_llm_tally_rollup_monthly_users_cost", "month", "cost_nano_usd"),
    sqlite_with_rowid=False,
)

#: Per dimension (the model or a property), UTC month, value and user: the distinct users
#: of each plan, and per-user totals of one plan. (Provider and operation: hourly rollup.)
monthly_groups_table = Table(
    "llm_tally_rollup_monthly_groups",
    _metadata,
    Column("dimension", String(64), primary_key=True),
    Column("month", BigInteger, primary_key=True),
    Column("value", String(256), primary_key=True),
    Column("user_key", String(256), primary_key=True),
    *_measures(),
    sqlite_with_rowid=False,
)

#: Per property name, UTC month, model and property value (no user): totals by plan and
#: the costliest (model, feature) pairs in a few rows. Dimension '' and value '' hold all
#: the calls of each model: the month's totals.
monthly_pairs_table = Table(
    "llm_tally_rollup_monthly_pairs",
    _metadata,
    Column("dimension", String(64), primary_key=True),
    Column("month", BigInteger, primary_key=True),
    Column("model", String(256), primary_key=True),
    Column("value", String(256), primary_key=True),
    *_measures(),
    sqlite_with_rowid=False,
)

#: Per dimension, UTC month and value: how many distinct users (not counting calls without
#: a user), kept as the groups rollup gains rows, so that "users per plan" reads one row.
monthly_values_table = Table(
    "llm_tally_rollup_monthly_values",
    _metadata,
    Column("dimension", String(64), primary_key=True),
    Column("month", BigInteger, primary_key=True),
    Column("value", String(256), primary_key=True),
    Column("users", BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

ROLLUP_TABLES = (
    hourly_table,
    monthly_users_table,
    monthly_groups_table,
    monthly_pairs_table,
    monthly_values_table,
)

"""Schema 2: the rollup tables (sums of the calls per hour and per month), built from the
calls already stored."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from llm_tally.storage.migrations import rebuild_rollups_at_head

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_MEASURES = (
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


def _measures() -> list[sa.Column[int]]:
    return [sa.Column(name, sa.BigInteger, nullable=False) for name in _MEASURES]


def _key(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(256), primary_key=True)


def upgrade() -> None:
    hourly = "llm_tally_rollup_hourly"
    op.create_table(
        hourly,
        sa.Column("hour", sa.BigInteger, nullable=False),
        sa.Column("user_key", sa.String(256), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("properties", _JSON, nullable=False),
        *_measures(),
    )
    op.create_index("ix_llm_tally_rollup_hourly_user", hourly, ["user_key", "hour"])
    # PostgreSQL indexes a hash of the properties: an index entry must stay under ~2.7 kB.
    properties = "md5(CAST(properties AS TEXT))" if _dialect() == "postgresql" else "properties"
    op.execute(
        f"CREATE UNIQUE INDEX ux_{hourly} "
        f"ON {hourly} (hour, user_key, provider, operation, model, {properties})"
    )

    op.create_table(
        "llm_tally_rollup_monthly_users",
        _key("user_key"),
        sa.Column("month", sa.BigInteger, primary_key=True),
        *_measures(),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_llm_tally_rollup_monthly_users_cost",
        "llm_tally_rollup_monthly_users",
        ["month", "cost_nano_usd"],
    )

    groups = "llm_tally_rollup_monthly_groups"
    op.create_table(
        groups,
        sa.Column("dimension", sa.String(64), primary_key=True),
        sa.Column("month", sa.BigInteger, primary_key=True),
        _key("value"),
        _key("user_key"),
        *_measures(),
        sqlite_with_rowid=False,
    )
    if _dialect() == "sqlite":
        # The primary key's columns alone, for counting a plan's users without reading the
        # wide rows (PostgreSQL's primary key is such an index).
        op.create_index(f"ix_{groups}_users", groups, ["dimension", "month", "value", "user_key"])

    op.create_table(
        "llm_tally_rollup_monthly_pairs",
        sa.Column("dimension", sa.String(64), primary_key=True),
        sa.Column("month", sa.BigInteger, primary_key=True),
        _key("model"),
        _key("value"),
        *_measures(),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "llm_tally_rollup_monthly_values",
        sa.Column("dimension", sa.String(64), primary_key=True),
        sa.Column("month", sa.BigInteger, primary_key=True),
        _key("value"),
        sa.Column("users", sa.BigInteger, nullable=False),
        sqlite_with_rowid=False,
    )
    op.execute("UPDATE llm_tally_meta SET value = '2' WHERE key = 'schema_version'")
    # The calls stored before are summed once the store has reached the newest revision.
    rebuild_rollups_at_head()


def _dialect() -> str:
    return op.get_bind().dialect.name


def downgrade() -> None:
    raise NotImplementedError("llm-tally migrations only go forward: restore a backup instead")

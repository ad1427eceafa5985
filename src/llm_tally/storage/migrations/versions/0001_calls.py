"""Schema 1 (llm-tally 0.1): the calls and the store's key/value facts."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "llm_tally_usage",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.String(256)),
        sa.Column("properties", _JSON, nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("request_model", sa.String(256)),
        sa.Column("response_model", sa.String(256)),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger, nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger, nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_nano_usd", sa.BigInteger),
        sa.Column("cost_source", sa.String(32), nullable=False),
        sa.Column("latency_us", sa.BigInteger),
        sa.Column("ttft_us", sa.BigInteger),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_type", sa.String(128)),
        sa.Column("http_status", sa.Integer),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("usage_source", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(128)),
    )
    op.create_index("ix_llm_tally_usage_user_ts", "llm_tally_usage", ["user_id", "ts"])
    op.create_index("ix_llm_tally_usage_ts", "llm_tally_usage", ["ts"])
    meta = op.create_table(
        "llm_tally_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    # What llm-tally 0.1 recorded; the revision is kept in llm_tally_alembic_version now.
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    raise NotImplementedError("llm-tally migrations only go forward: restore a backup instead")

"""The DDL llm-tally 0.1 ran to create a store, before it recorded revisions: its models'
create_all() and its raw index statements, captured from the code of schema 1 (commit
9fc2612) and schema 2 (commit dd1358e). Frozen: tests build the stores of that release
from them, whatever the models say today."""

from __future__ import annotations

from sqlalchemy import Connection, text

SCHEMA_1: dict[str, list[str]] = {
    "sqlite": [
        (
            "CREATE TABLE llm_tally_usage (id VARCHAR(32) NOT NULL, ts BIGINT NOT NULL, user_id "
            "VARCHAR(256), properties JSON NOT NULL, provider VARCHAR(64) NOT NULL, operation "
            "VARCHAR(32) NOT NULL, request_model VARCHAR(256), response_model VARCHAR(256), "
            "input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cached_input_tokens "
            "BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT "
            "NULL, cost_nano_usd BIGINT, cost_source VARCHAR(32) NOT NULL, latency_us BIGINT, "
            "ttft_us BIGINT, status VARCHAR(16) NOT NULL, error_type VARCHAR(128), http_status "
            "INTEGER, retries INTEGER NOT NULL, usage_source VARCHAR(16) NOT NULL, request_id "
            "VARCHAR(128), PRIMARY KEY (id))"
        ),
        "CREATE INDEX ix_llm_tally_usage_ts ON llm_tally_usage (ts)",
        "CREATE INDEX ix_llm_tally_usage_user_ts ON llm_tally_usage (user_id, ts)",
        (
            'CREATE TABLE llm_tally_meta ("key" VARCHAR(64) NOT NULL, value VARCHAR(256) NOT '
            'NULL, PRIMARY KEY ("key"))'
        ),
    ],
    "postgresql": [
        (
            "CREATE TABLE llm_tally_usage (id VARCHAR(32) NOT NULL, ts BIGINT NOT NULL, user_id "
            "VARCHAR(256), properties JSONB NOT NULL, provider VARCHAR(64) NOT NULL, operation "
            "VARCHAR(32) NOT NULL, request_model VARCHAR(256), response_model VARCHAR(256), "
            "input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cached_input_tokens "
            "BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT "
            "NULL, cost_nano_usd BIGINT, cost_source VARCHAR(32) NOT NULL, latency_us BIGINT, "
            "ttft_us BIGINT, status VARCHAR(16) NOT NULL, error_type VARCHAR(128), http_status "
            "INTEGER, retries INTEGER NOT NULL, usage_source VARCHAR(16) NOT NULL, request_id "
            "VARCHAR(128), PRIMARY KEY (id))"
        ),
        "CREATE INDEX ix_llm_tally_usage_ts ON llm_tally_usage (ts)",
        "CREATE INDEX ix_llm_tally_usage_user_ts ON llm_tally_usage (user_id, ts)",
        (
            "CREATE TABLE llm_tally_meta (key VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, "
            "PRIMARY KEY (key))"
        ),
    ],
}

SCHEMA_2: dict[str, list[str]] = {
    "sqlite": [
        (
            "CREATE TABLE llm_tally_usage (id VARCHAR(32) NOT NULL, ts BIGINT NOT NULL, user_id "
            "VARCHAR(256), properties JSON NOT NULL, provider VARCHAR(64) NOT NULL, operation "
            "VARCHAR(32) NOT NULL, request_model VARCHAR(256), response_model VARCHAR(256), "
            "input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cached_input_tokens "
            "BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT "
            "NULL, cost_nano_usd BIGINT, cost_source VARCHAR(32) NOT NULL, latency_us BIGINT, "
            "ttft_us BIGINT, status VARCHAR(16) NOT NULL, error_type VARCHAR(128), http_status "
            "INTEGER, retries INTEGER NOT NULL, usage_source VARCHAR(16) NOT NULL, request_id "
            "VARCHAR(128), PRIMARY KEY (id))"
        ),
        "CREATE INDEX ix_llm_tally_usage_ts ON llm_tally_usage (ts)",
        "CREATE INDEX ix_llm_tally_usage_user_ts ON llm_tally_usage (user_id, ts)",
        (
            'CREATE TABLE llm_tally_meta ("key" VARCHAR(64) NOT NULL, value VARCHAR(256) NOT '
            'NULL, PRIMARY KEY ("key"))'
        ),
        (
            "CREATE TABLE llm_tally_rollup_hourly (hour BIGINT NOT NULL, user_key VARCHAR(256) "
            "NOT NULL, provider VARCHAR(64) NOT NULL, operation VARCHAR(32) NOT NULL, model "
            "VARCHAR(256) NOT NULL, properties JSON NOT NULL, requests BIGINT NOT NULL, errors "
            "BIGINT NOT NULL, input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, "
            "cached_input_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL, "
            "cost_nano_usd BIGINT NOT NULL, unpriced BIGINT NOT NULL, first_ts BIGINT NOT NULL, "
            "last_ts BIGINT NOT NULL)"
        ),
        (
            "CREATE INDEX ix_llm_tally_rollup_hourly_user ON llm_tally_rollup_hourly (user_key, "
            "hour)"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_users (user_key VARCHAR(256) NOT NULL, month "
            "BIGINT NOT NULL, requests BIGINT NOT NULL, errors BIGINT NOT NULL, input_tokens "
            "BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT "
            "NULL, reasoning_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL, unpriced "
            "BIGINT NOT NULL, first_ts BIGINT NOT NULL, last_ts BIGINT NOT NULL, PRIMARY KEY "
            "(user_key, month)) WITHOUT ROWID"
        ),
        (
            "CREATE INDEX ix_llm_tally_rollup_monthly_users_cost ON "
            "llm_tally_rollup_monthly_users (month, cost_nano_usd)"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_groups (dimension VARCHAR(64) NOT NULL, month "
            "BIGINT NOT NULL, value VARCHAR(256) NOT NULL, user_key VARCHAR(256) NOT NULL, "
            "requests BIGINT NOT NULL, errors BIGINT NOT NULL, input_tokens BIGINT NOT NULL, "
            "output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT NULL, "
            "reasoning_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL, unpriced BIGINT "
            "NOT NULL, first_ts BIGINT NOT NULL, last_ts BIGINT NOT NULL, PRIMARY KEY "
            "(dimension, month, value, user_key)) WITHOUT ROWID"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_pairs (dimension VARCHAR(64) NOT NULL, month "
            "BIGINT NOT NULL, model VARCHAR(256) NOT NULL, value VARCHAR(256) NOT NULL, requests "
            "BIGINT NOT NULL, errors BIGINT NOT NULL, input_tokens BIGINT NOT NULL, "
            "output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT NULL, "
            "reasoning_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL, unpriced BIGINT "
            "NOT NULL, first_ts BIGINT NOT NULL, last_ts BIGINT NOT NULL, PRIMARY KEY "
            "(dimension, month, model, value)) WITHOUT ROWID"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_values (dimension VARCHAR(64) NOT NULL, month "
            "BIGINT NOT NULL, value VARCHAR(256) NOT NULL, users BIGINT NOT NULL, PRIMARY KEY "
            "(dimension, month, value)) WITHOUT ROWID"
        ),
        (
            "CREATE UNIQUE INDEX IF NOT EXISTS ux_llm_tally_rollup_hourly ON "
            "llm_tally_rollup_hourly (hour, user_key, provider, operation, model, properties)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS ix_llm_tally_rollup_monthly_groups_users ON "
            "llm_tally_rollup_monthly_groups (dimension, month, value, user_key)"
        ),
    ],
    "postgresql": [
        (
            "CREATE TABLE llm_tally_usage (id VARCHAR(32) NOT NULL, ts BIGINT NOT NULL, user_id "
            "VARCHAR(256), properties JSONB NOT NULL, provider VARCHAR(64) NOT NULL, operation "
            "VARCHAR(32) NOT NULL, request_model VARCHAR(256), response_model VARCHAR(256), "
            "input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cached_input_tokens "
            "BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT "
            "NULL, cost_nano_usd BIGINT, cost_source VARCHAR(32) NOT NULL, latency_us BIGINT, "
            "ttft_us BIGINT, status VARCHAR(16) NOT NULL, error_type VARCHAR(128), http_status "
            "INTEGER, retries INTEGER NOT NULL, usage_source VARCHAR(16) NOT NULL, request_id "
            "VARCHAR(128), PRIMARY KEY (id))"
        ),
        "CREATE INDEX ix_llm_tally_usage_ts ON llm_tally_usage (ts)",
        "CREATE INDEX ix_llm_tally_usage_user_ts ON llm_tally_usage (user_id, ts)",
        (
            "CREATE TABLE llm_tally_meta (key VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, "
            "PRIMARY KEY (key))"
        ),
        (
            "CREATE TABLE llm_tally_rollup_hourly (hour BIGINT NOT NULL, user_key VARCHAR(256) "
            "NOT NULL, provider VARCHAR(64) NOT NULL, operation VARCHAR(32) NOT NULL, model "
            "VARCHAR(256) NOT NULL, properties JSONB NOT NULL, requests BIGINT NOT NULL, errors "
            "BIGINT NOT NULL, input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, "
            "cached_input_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL, "
            "cost_nano_usd BIGINT NOT NULL, unpriced BIGINT NOT NULL, first_ts BIGINT NOT NULL, "
            "last_ts BIGINT NOT NULL)"
        ),
        (
            "CREATE INDEX ix_llm_tally_rollup_hourly_user ON llm_tally_rollup_hourly (user_key, "
            "hour)"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_users (user_key VARCHAR(256) NOT NULL, month "
            "BIGINT NOT NULL, requests BIGINT NOT NULL, errors BIGINT NOT NULL, input_tokens "
            "BIGINT NOT NULL, output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT "
            "NULL, reasoning_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL, unpriced "
            "BIGINT NOT NULL, first_ts BIGINT NOT NULL, last_ts BIGINT NOT NULL, PRIMARY KEY "
            "(user_key, month))"
        ),
        (
            "CREATE INDEX ix_llm_tally_rollup_monthly_users_cost ON "
            "llm_tally_rollup_monthly_users (month, cost_nano_usd)"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_groups (dimension VARCHAR(64) NOT NULL, month "
            "BIGINT NOT NULL, value VARCHAR(256) NOT NULL, user_key VARCHAR(256) NOT NULL, "
            "requests BIGINT NOT NULL, errors BIGINT NOT NULL, input_tokens BIGINT NOT NULL, "
            "output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT NULL, "
            "reasoning_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL, unpriced BIGINT "
            "NOT NULL, first_ts BIGINT NOT NULL, last_ts BIGINT NOT NULL, PRIMARY KEY "
            "(dimension, month, value, user_key))"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_pairs (dimension VARCHAR(64) NOT NULL, month "
            "BIGINT NOT NULL, model VARCHAR(256) NOT NULL, value VARCHAR(256) NOT NULL, requests "
            "BIGINT NOT NULL, errors BIGINT NOT NULL, input_tokens BIGINT NOT NULL, "
            "output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT NULL, "
            "reasoning_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL, unpriced BIGINT "
            "NOT NULL, first_ts BIGINT NOT NULL, last_ts BIGINT NOT NULL, PRIMARY KEY "
            "(dimension, month, model, value))"
        ),
        (
            "CREATE TABLE llm_tally_rollup_monthly_values (dimension VARCHAR(64) NOT NULL, month "
            "BIGINT NOT NULL, value VARCHAR(256) NOT NULL, users BIGINT NOT NULL, PRIMARY KEY "
            "(dimension, month, value))"
        ),
        (
            "CREATE UNIQUE INDEX IF NOT EXISTS ux_llm_tally_rollup_hourly ON "
            "llm_tally_rollup_hourly (hour, user_key, provider, operation, model, "
            "md5(CAST(properties AS TEXT)))"
        ),
    ],
}


def create_store(conn: Connection, schema: int) -> None:
    """The empty store llm-tally 0.1 created at ``schema`` (1 or 2), with the rows it kept
    in llm_tally_meta."""
    statements = (SCHEMA_1 if schema == 1 else SCHEMA_2)[conn.dialect.name]
    for statement in statements:
        conn.execute(text(statement))
    conn.execute(
        text("INSERT INTO llm_tally_meta VALUES ('schema_version', :v)"), {"v": str(schema)}
    )
    if schema == 2 and conn.dialect.name == "sqlite":
        conn.execute(text("INSERT INTO llm_tally_meta VALUES ('rolled_up_to', '0')"))

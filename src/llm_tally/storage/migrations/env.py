"""Alembic's entry point, run by ``migrations.upgrade()`` on the connection it was given."""

from alembic import context

from llm_tally.storage.schema import VERSION_TABLE

context.configure(connection=context.config.attributes["connection"], version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()

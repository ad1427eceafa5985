"""The store's Alembic migrations, run in-process: no ``alembic.ini``, no ``alembic`` command.

Each file in ``versions/`` is one revision, named after its number: ``0003_budgets.py``
holds ``revision = "0003"`` and ``down_revision = "0002"``. The store's revision is kept in
the table ``llm_tally_alembic_version`` (not ``alembic_version``, which the host app's own
migrations may use). ``storage/schema.py`` decides when to run them; contributors read
docs/migrations.md.

Importing this module imports Alembic (a few hundred milliseconds): only ``schema`` does,
and only when a store is not at the newest revision.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command, op
from alembic.config import Config
from sqlalchemy import Connection

_REBUILD_ROLLUPS = "llm_tally.rebuild_rollups"
# Alembic's ``op`` and ``context`` are module globals: one upgrade at a time per process
# (two stores upgraded from two threads would share them).
_one_at_a_time = threading.Lock()


def upgrade(conn: Connection, stamp: str | None, to: str = "head") -> bool:
    """Bring the store of ``conn`` to the newest revision (or ``to``), in ``conn``'s
    transaction.

    ``stamp`` records the revision of a store created before migrations existed, first.
    Returns whether a revision asked for the rollups to be built again from the calls.
    """
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = conn
    with _one_at_a_time:
        if stamp is not None:
            command.stamp(config, stamp)
        command.upgrade(config, to)
    return bool(config.attributes.get(_REBUILD_ROLLUPS))


def rebuild_rollups_at_head() -> None:
    """For revisions that add or change rollup tables: sum every stored call into the
    rollups again, once the store is at the newest revision (the roll-up code of this
    release writes the newest layout, so it cannot run in the middle of an upgrade)."""
    config = op.get_context().config
    assert config is not None, "revisions run through migrations.upgrade()"
    config.attributes[_REBUILD_ROLLUPS] = True

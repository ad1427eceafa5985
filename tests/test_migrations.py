"""Schema migrations: new stores, stores of llm-tally 0.1 (schema 1 and 2, no revision
recorded), ``migrate=False``, several processes opening one store at once, ``llm-tally db``.

Everything runs on real SQLite files and on the real PostgreSQL. Old stores are built from
the DDL that llm-tally 0.1 ran (tests/stores_0_1.py), filled with seeded calls, and every
report is compared with the calls after the upgrade.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, select, text

from llm_tally import Tally
from llm_tally.cli import main
from llm_tally.storage import migrations, rollups, schema
from llm_tally.storage.engine import create_store_engine
from llm_tally.storage.models import ROLLUP_TABLES, usage_table
from llm_tally.storage.schema import VERSION_TABLE, StoreNotUpgraded

from .conftest import POSTGRES_URL, open_tally
from .stores_0_1 import SCHEMA_1, SCHEMA_2, create_store
from .test_rollups import (
    PERIODS,
    Call,
    assert_rollups_match_raw,
    check_reports,
    insert_raw,
    meta,
    raw_table_rows,
    seeded_calls,
    store,
)

#: Reports over these periods read every kind of source (months, hours, raw calls); the
#: rollups themselves are compared with the calls row by row (assert_rollups_match_raw).
SOME_PERIODS = {
    n: PERIODS[n]
    for n in ("open", "one-utc-month", "paris-month", "us-bounds-across-months", "sub-hour")
}


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = create_store_engine(store_url)
    yield engine
    engine.dispose()


def drop_everything(engine: Engine) -> None:
    with engine.begin() as conn:
        for name in schema.store_state(engine).tables | {VERSION_TABLE}:
            conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


def versions_recorded(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


def schema_of(engine: Engine) -> dict[str, Any]:
    """llm-tally's tables, columns, keys and indexes as the database reports them (not the
    revision table)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.execute(
                text(
                    "SELECT name, type, tbl_name, sql FROM sqlite_master "
                    "WHERE tbl_name LIKE 'llm_tally_%' AND tbl_name <> :version"
                ),
                {"version": VERSION_TABLE},
            )
            return {row.name: (row.type, row.tbl_name, _spaces(row.sql or "")) for row in rows}
        ours = "LIKE 'llm\\_tally\\_%' AND {0} <> '" + VERSION_TABLE + "'"
        columns = conn.execute(
            text(
                "SELECT table_name, ordinal_position, column_name, data_type, "
                "character_maximum_length, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = current_schema() "
                f"AND table_name {ours.format('table_name')}"
            )
        )
        indexes = conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                f"AND tablename {ours.format('tablename')}"
            )
        )
        constraints = conn.execute(
            text(
                "SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint k "
                "JOIN pg_class c ON c.oid = k.conrelid "
                f"WHERE c.relname {ours.format('c.relname')}"
            )
        )
        return {
            "columns": sorted(tuple(row) for row in columns),
            "indexes": dict(tuple(row) for row in indexes),  # type: ignore[misc]
            "constraints": sorted(tuple(row) for row in constraints),
        }


def _spaces(sql: str) -> str:
    return re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", re.sub(r"\s+", " ", sql))).strip()


def store_0_1(engine: Engine, version: int, calls: list[Call]) -> None:
    """A store of llm-tally 0.1 at schema ``version`` holding ``calls``. At schema 2 its
    rollups hold the calls as 0.1 kept them: PostgreSQL summed each insert; SQLite rolled
    up lazily, and the later half of the calls waits for the next catch-up."""
    with engine.begin() as conn:
        create_store(conn, version)
    if version == 1:
        insert_raw(engine, calls)
        return
    half = len(calls) // 2
    insert_raw(engine, calls[:half])
    if rollups.lazy(engine):
        rollups.catch_up(engine)
    insert_raw(engine, calls[half:])
    if not rollups.lazy(engine):
        with engine.begin() as conn:
            rollups.roll_up_everything(conn)


# -- the revisions ---------------------------------------------------------------------------


def test_revision_files_form_one_chain_numbered_like_their_file_names() -> None:
    scripts = ScriptDirectory(str(Path(migrations.__file__).parent))
    chain = list(reversed(list(scripts.walk_revisions())))
    assert [s.revision for s in chain] == list(schema.revisions())
    assert scripts.get_current_head() == schema.head() == schema.revisions()[-1]
    previous = None
    for script in chain:
        assert Path(script.path).name.startswith(f"{script.revision}_"), script.path
        assert script.down_revision == previous, script.path
        previous = script.revision


def test_a_new_store_is_created_at_the_newest_revision_with_the_models_tables(
    engine: Engine, store_url: str, opened: list[Tally]
) -> None:
    assert schema.store_state(engine).describe().startswith("empty")
    open_tally(opened, store_url).close()
    state = schema.store_state(engine)
    assert state.up_to_date and not state.missing
    assert versions_recorded(engine) == [schema.head()]
    migrated = schema_of(engine)
    expected_meta = {"schema_version": "2"}
    if rollups.lazy(engine):
        expected_meta[rollups.WATERMARK_KEY] = "0"
    assert meta(engine) == expected_meta
    # The models (what this release's code reads and writes) describe the same tables.
    drop_everything(engine)
    with engine.begin() as conn:
        usage_table.metadata.create_all(conn, tables=list(schema.TABLES))
        rollups.create_rollup_keys(conn)
    assert schema_of(engine) == migrated


@pytest.mark.parametrize(("revision", "ddl"), [("0001", SCHEMA_1), ("0002", SCHEMA_2)])
def test_each_revision_creates_the_tables_of_llm_tally_0_1_exactly(
    engine: Engine, revision: str, ddl: dict[str, list[str]]
) -> None:
    with engine.begin() as conn:
        migrations.upgrade(conn, None, to=revision)
    assert versions_recorded(engine) == [revision]
    migrated = schema_of(engine)
    drop_everything(engine)
    with engine.begin() as conn:
        for statement in ddl[engine.dialect.name]:
            conn.execute(text(statement))
    assert schema_of(engine) == migrated


# -- stores of llm-tally 0.1 -----------------------------------------------------------------


def test_a_schema_1_store_is_recognised_upgraded_and_rolled_up(
    engine: Engine, store_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(51)
    store_0_1(engine, 1, calls)
    state = schema.store_state(engine)
    assert (state.revision, state.before_migrations) == (None, "0001")
    tally = open_tally(opened, store_url)
    assert versions_recorded(engine) == [schema.head()]
    assert meta(engine)["schema_version"] == "2"
    if rollups.lazy(engine):
        # Every call stored before is rolled up by the first catch-up.
        assert rollups.pending_rows(engine) == len(calls)
    check_reports(tally, calls, SOME_PERIODS)
    assert_rollups_match_raw(engine)
    # New calls add up as usual; reopening rolls nothing up twice.
    more = seeded_calls(52)[:80]
    store(tally, more)
    assert tally.flush(60)
    check_reports(open_tally(opened, store_url), calls + more, SOME_PERIODS)
    assert_rollups_match_raw(engine)


def test_a_schema_2_store_is_recognised_and_stamped_without_rebuilding_its_rollups(
    engine: Engine, store_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(53)
    store_0_1(engine, 2, calls)
    state = schema.store_state(engine)
    assert (state.revision, state.before_migrations) == (None, "0002")
    with engine.connect() as conn:
        rollups_before = raw_table_rows(conn)
    meta_before = meta(engine)
    tally = open_tally(opened, store_url)
    assert versions_recorded(engine) == [schema.head()]
    # Nothing was rolled up again: the same rows, and SQLite's watermark where it was.
    assert meta(engine) == meta_before
    with engine.connect() as conn:
        assert raw_table_rows(conn) == rollups_before
    if rollups.lazy(engine):
        assert int(meta_before[rollups.WATERMARK_KEY]) == len(calls) // 2
    check_reports(tally, calls, SOME_PERIODS)
    assert_rollups_match_raw(engine)


def test_a_schema_2_store_missing_a_rollup_table_gets_it_back_rebuilt(
    engine: Engine, store_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(54)
    store_0_1(engine, 2, calls)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {ROLLUP_TABLES[2].name}"))
    tally = open_tally(opened, store_url)
    assert schema.store_state(engine).missing == []
    check_reports(tally, calls, SOME_PERIODS)
    assert_rollups_match_raw(engine)


# -- migrate=False ---------------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["empty", "revision 0001", "schema 1", "schema 2"])
def test_without_upgrades_a_store_behind_is_refused_with_the_command_to_run(
    engine: Engine, store_url: str, store_kind: str, opened: list[Tally]
) -> None:
    if store_kind == "revision 0001":
        with engine.begin() as conn:
            migrations.upgrade(conn, None, to="0001")
    elif store_kind != "empty":
        store_0_1(engine, int(store_kind[-1]), seeded_calls(55)[:40])
    before = schema.store_state(engine)
    with pytest.raises(StoreNotUpgraded) as refused:
        Tally(store_url, instrument=False, migrate=False)
    message = str(refused.value)
    assert "llm-tally db upgrade" in message and "migrate=False" in message
    assert before.describe() in message
    assert schema.store_state(engine) == before  # left as it was
    # Upgraded, it opens without upgrades.
    assert main(["db", "upgrade", "--database-url", store_url]) == 0
    tally = open_tally(opened, store_url, migrate=False)
    assert tally.count_records() == (0 if store_kind in ("empty", "revision 0001") else 40)


def test_without_upgrades_missing_tables_are_not_created(
    engine: Engine, store_url: str, opened: list[Tally]
) -> None:
    open_tally(opened, store_url).close()
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {ROLLUP_TABLES[0].name}"))
    open_tally(opened, store_url, migrate=False).close()
    assert schema.store_state(engine).missing == [ROLLUP_TABLES[0]]
    open_tally(opened, store_url, migrate="auto")
    assert schema.store_state(engine).missing == []


def test_migrate_and_its_former_name_create_tables_are_checked(
    tmp_path: Path, opened: list[Tally]
) -> None:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    for bad in ("yes", "manual", 1, None):
        with pytest.raises(ValueError, match="migrate must be 'auto'"):
            Tally(url, instrument=False, migrate=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="create_tables must be True or False"):
        Tally(url, instrument=False, create_tables="no")  # type: ignore[arg-type]
    with (
        pytest.warns(DeprecationWarning, match="create_tables"),
        pytest.raises(ValueError, match="create_tables=True contradicts migrate=False"),
    ):
        Tally(url, instrument=False, migrate=False, create_tables=True)
    assert not Path(url.removeprefix("sqlite:///")).exists()
    with (
        pytest.warns(DeprecationWarning, match="use migrate='auto' or migrate=False"),
        pytest.raises(StoreNotUpgraded),
    ):
        Tally(url, instrument=False, create_tables=False)
    with pytest.warns(DeprecationWarning):
        open_tally(opened, url, create_tables=True)
    assert schema.store_state(opened[0].engine).up_to_date
    open_tally(opened, url, migrate=True)


def test_a_store_of_a_newer_llm_tally_is_used_as_it_is_with_a_warning(
    engine: Engine, store_url: str, opened: list[Tally], caplog: pytest.LogCaptureFixture
) -> None:
    open_tally(opened, store_url).close()
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with caplog.at_level(logging.WARNING, logger="llm_tally"):
        tally = open_tally(opened, store_url)
        open_tally(opened, store_url, migrate=False)
    warnings = [r.getMessage() for r in caplog.records if "9999" in r.getMessage()]
    assert len(warnings) == 2 and "written by a newer llm-tally" in warnings[0]
    assert versions_recorded(engine) == ["9999"]
    tally.record(user_id="u", model="gpt-4o-mini", input_tokens=3)
    assert tally.flush(10) and tally.user_totals("u").input_tokens == 3


# -- several processes at once ---------------------------------------------------------------

WORKERS = 4
_start_together: Any = None


def _init_worker(barrier: Any) -> None:
    global _start_together
    _start_together = barrier


def open_and_record(url: str, index: int) -> int:
    """A worker process starting: opens the store at the same moment as the others, then
    records its calls."""
    _start_together.wait(60)
    with Tally(url, instrument=False) as tally:
        store(tally, worker_calls(index))
        assert tally.flush(60)
        assert tally.stats()["write_errors"] == 0
    return os.getpid()


def worker_calls(index: int) -> list[Call]:
    return seeded_calls(100 + index)[:50]


@pytest.fixture(scope="module")
def workers() -> Iterator[ProcessPoolExecutor]:
    """Four worker processes (as ``uvicorn --workers 4``), started once for these tests."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    with ProcessPoolExecutor(
        WORKERS, mp_context=context, initializer=_init_worker, initargs=(barrier,)
    ) as pool:
        yield pool


@pytest.mark.parametrize("store_kind", ["empty", "schema 1"])
def test_workers_opening_one_store_at_once_all_start_and_it_is_upgraded_once(
    workers: ProcessPoolExecutor,
    engine: Engine,
    store_url: str,
    store_kind: str,
    opened: list[Tally],
) -> None:
    before = seeded_calls(56) if store_kind == "schema 1" else []
    if before:
        store_0_1(engine, 1, before)
    futures = [workers.submit(open_and_record, store_url, i) for i in range(WORKERS)]
    pids = {future.result(timeout=300) for future in futures}
    assert len(pids) == WORKERS  # four processes, past the barrier together
    assert versions_recorded(engine) == [schema.head()]
    calls = before + [call for i in range(WORKERS) for call in worker_calls(i)]
    tally = open_tally(opened, store_url)
    assert tally.count_records() == len(calls)
    check_reports(tally, calls, SOME_PERIODS)
    assert_rollups_match_raw(engine)


def test_threads_opening_a_schema_2_store_at_once_stamp_it_once(
    engine: Engine, store_url: str, opened: list[Tally]
) -> None:
    calls = seeded_calls(57)
    store_0_1(engine, 2, calls)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait(30)
        try:
            Tally(store_url, instrument=False).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert versions_recorded(engine) == [schema.head()]
    check_reports(open_tally(opened, store_url), calls, SOME_PERIODS)


# -- llm-tally db ----------------------------------------------------------------------------


def test_db_current_and_upgrade_on_a_schema_1_store(
    engine: Engine, store_url: str, capsys: pytest.CaptureFixture[str], opened: list[Tally]
) -> None:
    calls = seeded_calls(58)[:120]
    store_0_1(engine, 1, calls)
    assert main(["db", "current", "--database-url", store_url]) == 1
    out = capsys.readouterr().out
    assert "at revision 0001 (tables of llm-tally 0.1" in out and "behind" in out
    assert main(["db", "upgrade", "--database-url", store_url]) == 0
    out = capsys.readouterr().out
    assert f"upgraded to revision {schema.head()} (it was at revision 0001 (tables of" in out
    assert main(["db", "current", "--database-url", store_url]) == 0
    assert capsys.readouterr().out.endswith(f"is at revision {schema.head()} (up to date)\n")
    assert main(["db", "upgrade", "--database-url", store_url]) == 0
    assert "already at revision" in capsys.readouterr().out
    check_reports(open_tally(opened, store_url, migrate=False), calls, SOME_PERIODS)


def test_db_commands_on_an_empty_store_a_missing_file_and_a_newer_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert main(["db", "current", "--database-url", url]) == 2
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "new.db").exists()
    monkeypatch.setenv("LLM_TALLY_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 0
    assert "created llm-tally's tables at revision" in capsys.readouterr().out
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    finally:
        engine.dispose()
    assert main(["db", "current"]) == 1
    assert "written by a newer llm-tally" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 1
    assert "left as it is" in capsys.readouterr().out


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLM_TALLY_TEST_POSTGRES_URL": POSTGRES_URL}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


OPEN_AND_TELL = """
import sys
from llm_tally import Tally
Tally(sys.argv[1], instrument=False).close()
print("alembic" in sys.modules)
"""


def test_opening_an_up_to_date_store_does_not_import_alembic(
    engine: Engine, store_url: str
) -> None:
    with engine.begin() as conn:
        migrations.upgrade(conn, None, to="0001")
    behind = run_python(OPEN_AND_TELL, store_url)
    assert behind.returncode == 0, behind.stderr
    assert behind.stdout.strip() == "True"  # upgraded, with Alembic
    up_to_date = run_python(OPEN_AND_TELL, store_url)
    assert up_to_date.returncode == 0, up_to_date.stderr
    assert up_to_date.stdout.strip() == "False"


def test_the_installed_command_upgrades_a_store(engine: Engine, store_url: str) -> None:
    store_0_1(engine, 2, seeded_calls(59)[:30])
    done = subprocess.run(
        [sys.executable, "-m", "llm_tally", "db", "upgrade", "--database-url", store_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert versions_recorded(engine) == [schema.head()]
    with engine.connect() as conn:
        assert len(conn.execute(select(usage_table.c.id)).all()) == 30


@pytest.mark.postgres
def test_messages_never_show_the_password(
    pg_url: str, capsys: pytest.CaptureFixture[str], opened: list[Tally]
) -> None:
    url = pg_url.replace("postgres@", "postgres:s3cret-word@", 1)
    assert "s3cret-word" in url  # the server trusts loopback: any password opens it
    with pytest.raises(StoreNotUpgraded) as refused:
        Tally(url, instrument=False, migrate=False)
    assert "s3cret-word" not in str(refused.value) and "***" in str(refused.value)
    assert "(with its password)" in str(refused.value)
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert main(["db", "current", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "s3cret-word" not in out and out.count("postgres:***@") == 2

"""Shared fixtures: a fake OpenAI server over loopback HTTP, real SQLite files, real PostgreSQL."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from sqlalchemy import create_engine, select, text
from werkzeug.serving import WSGIRequestHandler, make_server

import llm_tally
from llm_tally import Tally
from llm_tally._internal import internal_error_counts, set_raise_internal_errors
from llm_tally.demo.fake_llm import FakeLLM
from llm_tally.demo.serve import BackgroundServer
from llm_tally.storage.models import usage_table

# Stored record column -> the fake provider's ledger field.
TOKEN_FIELDS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cached_input_tokens", "cached"),
    ("reasoning_tokens", "reasoning"),
)

POSTGRES_URL = os.environ.get(
    "LLM_TALLY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True, scope="session")
def _raise_internal_errors() -> Iterator[None]:
    # In tests a bug of ours must fail loudly instead of being logged and counted.
    set_raise_internal_errors(True)
    yield
    set_raise_internal_errors(False)


@pytest.fixture(autouse=True)
def _own_journal_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Stores without a file of their own (PostgreSQL) journal under one directory per URL:
    # give each test its own, so a test that kills a process leaves nothing for the next.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM_TALLY_JOURNAL_DIR", str(tmp_path_factory.mktemp("journals")))
        yield


@pytest.fixture(autouse=True)
def _no_leftover_tallies() -> Iterator[None]:
    internal_error_counts.clear()
    yield
    leftover = llm_tally.default_tally()
    while leftover is not None:
        leftover.close()
        leftover = llm_tally.default_tally()
    assert not llm_tally.is_openai_instrumented(), "closing every Tally must uninstrument"


class FakeServer:
    def __init__(self, fake: FakeLLM, url: str) -> None:
        self.fake = fake
        self.url = url
        self.base_url = f"{url}/v1"

    @property
    def ledger(self) -> list[dict[str, Any]]:
        return self.fake.ledger


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeServer]:
    fake = FakeLLM()
    with BackgroundServer(fake.app) as server:
        yield FakeServer(fake, server.url)


@pytest.fixture
def db_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'usage.db'}"


@pytest.fixture
def opened() -> Iterator[list[Tally]]:
    """Tallies a test opens (with :func:`open_tally`): closed at its end, even when it fails."""
    tallies: list[Tally] = []
    yield tallies
    for tally in tallies:
        tally.close()


def open_tally(opened: list[Tally], url: str, **options: Any) -> Tally:
    tally = Tally(url, instrument=False, **options)
    opened.append(tally)
    return tally


@pytest.fixture
def tally(db_url: str) -> Iterator[Tally]:
    t = Tally(db_url)
    yield t
    t.close()


@pytest.fixture
def client(fake_llm: FakeServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=fake_llm.base_url, api_key="test-key", max_retries=0)
    yield c
    c.close()


@pytest.fixture
async def aclient(fake_llm: FakeServer) -> Any:
    c = openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="test-key", max_retries=0)
    yield c
    await c.close()


def stored_rows(tally: Tally) -> list[dict[str, Any]]:
    """Every stored record, oldest first (flushes first)."""
    assert tally.flush(10), "records were not stored in time"
    with tally.engine.connect() as conn:
        result = conn.execute(select(usage_table).order_by(usage_table.c.ts, usage_table.c.id))
        return [dict(row._mapping) for row in result]


def only_row(tally: Tally) -> dict[str, Any]:
    rows = stored_rows(tally)
    assert len(rows) == 1, rows
    return rows[0]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The real PostgreSQL on 127.0.0.1:5432, database ``test``, with llm-tally's tables dropped."""
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.begin() as conn:
            names = conn.execute(
                text("SELECT tablename FROM pg_tables WHERE tablename LIKE 'llm\\_tally\\_%'")
            ).scalars()
            for name in list(names):
                conn.execute(text(f'DROP TABLE IF EXISTS "{name}"'))
    except Exception as exc:  # pragma: no cover - CI starts PostgreSQL; say so when it is not
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}")
    finally:
        engine.dispose()
    yield POSTGRES_URL


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, db_url: str) -> str:
    """Each store llm-tally supports, empty: a SQLite file, then the real PostgreSQL."""
    if request.param == "sqlite":
        return db_url
    url: str = request.getfixturevalue("pg_url")
    return url


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@contextmanager
def serve_wsgi(app: Any, *, threaded: bool = True) -> Iterator[str]:
    """A real werkzeug server for the WSGI ``app`` on a loopback port; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=threaded, request_handler=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()

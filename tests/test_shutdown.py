"""Shutdown: a real server under load gets SIGTERM; every call it answered is stored after.

The served app (tests/served_app.py) writes with a 30 s flush interval, so only what runs
at shutdown can store the last calls in time: uvicorn's lifespan shutdown, gunicorn
workers' exit handlers, and the SIGTERM handler the WSGI middleware installs for werkzeug's
server, which would otherwise end the process at once.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
import pytest
from flask import Flask

from llm_tally import LLMUsageWSGIMiddleware, Tally
from llm_tally._shutdown import _flush_then_terminate, flush_before_exit

from .conftest import FakeServer
from .servers import free_port, load_then_signal, python_command, serve

FLASK_FACTORY = "tests.served_app:make_flask_app()"


def gunicorn(port: int, *options: str, workers: int = 2) -> list[str]:
    return python_command(
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--config",
        "python:tests.gunicorn_conf",
        *options,
        FLASK_FACTORY,
    )


# name: (command for a port, worker processes, exit code after SIGTERM)
SERVERS: dict[str, tuple[Any, int, int]] = {
    # uvicorn re-raises SIGTERM after its graceful shutdown: no exit handlers run.
    "uvicorn": (
        lambda port: python_command(
            "-m", "uvicorn", "--factory", "tests.served_app:make_fastapi_app", "--port", str(port)
        ),
        1,
        -signal.SIGTERM,
    ),
    # gunicorn's workers leave through sys.exit(): exit handlers run.
    "gunicorn-sync": (lambda port: gunicorn(port), 2, 0),
    "gunicorn-gthread": (lambda port: gunicorn(port, "-k", "gthread", "--threads", "4"), 2, 0),
    # werkzeug's server leaves SIGTERM alone: killed by it, as it is without llm-tally.
    "werkzeug-app-run": (lambda port: python_command("-m", "tests.served_app", str(port)), 1, -15),
    "flask-run": (
        lambda port: python_command("-m", "flask", "--app", FLASK_FACTORY, "run", "-p", str(port)),
        1,
        -signal.SIGTERM,
    ),
}


def stored_markers(db_url: str) -> list[str]:
    # journal=False: only what the server stored counts, not what a replay would recover.
    with Tally(db_url, instrument=False, journal=False) as reader:
        return [record["properties"]["n"] for record in reader.iter_records()]


def replayed_markers(db_url: str) -> list[str]:
    """The stored calls after the next Tally replayed what the server left in its journal."""
    with Tally(db_url, instrument=False) as tally:
        assert tally.flush(30)
        return [record["properties"]["n"] for record in tally.iter_records()]


@pytest.mark.parametrize("name", SERVERS)
def test_a_server_stopped_by_sigterm_under_load_stores_every_answered_call(
    name: str, tmp_path: Path, fake_llm: FakeServer
) -> None:
    """8 clients keep calling while the server gets SIGTERM: every request that was
    answered (so its LLM call returned to the app) is stored once afterwards, and the
    server ends with the exit code it has without llm-tally."""
    command, workers, exit_code = SERVERS[name]
    db_url = f"sqlite:///{tmp_path / 'usage.db'}"
    env = {"TEST_DB_URL": db_url, "TEST_LLM_URL": fake_llm.base_url, "TEST_FLUSH_INTERVAL": "30"}
    port = free_port()
    with serve(command(port), port, env) as server:
        server.wait_ready(workers)
        answered, code = load_then_signal(server, lambda n: f"/ask?n={n}&user=user-{n % 7}")
    stored = stored_markers(db_url)
    missing = answered - set(stored)
    assert not missing, f"{len(missing)} answered calls not stored; server said:\n{server.stderr}"
    assert len(stored) == len(set(stored)), "a call was stored twice"
    assert len(answered) >= 100
    assert code == exit_code, server.stderr
    assert "llm-tally" not in server.stderr, server.stderr
    # What the server left in its crash journal (calls made while it stopped) is stored by
    # the next Tally, and what was stored already is not counted twice.
    replayed = replayed_markers(db_url)
    assert len(replayed) == len(set(replayed)) and set(stored) <= set(replayed)


def test_gunicorn_preload_stores_the_calls_of_its_forked_workers(
    tmp_path: Path, fake_llm: FakeServer
) -> None:
    db_url = f"sqlite:///{tmp_path / 'usage.db'}"
    env = {"TEST_DB_URL": db_url, "TEST_LLM_URL": fake_llm.base_url}
    port = free_port()
    command = gunicorn(port, "--preload", "--graceful-timeout", "3")
    with serve(command, port, env) as server:
        server.wait_ready(2)
        answered, _ = load_then_signal(server, lambda n: f"/ask?n={n}&user=user-{n % 7}", 50)
    assert answered <= set(stored_markers(db_url))


# -- the SIGTERM handler -------------------------------------------------------------------


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    """SIGTERM at its default disposition for the test; whatever it was is restored after."""
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b""]


def test_the_wsgi_middleware_handles_sigterm_only_where_nothing_else_does(
    default_sigterm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Created in another thread: signal handlers belong to the main thread.
    thread = threading.Thread(target=LLMUsageWSGIMiddleware, args=(wsgi_app,))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # Inside uWSGI (or mod_wsgi), which handle signals in C out of Python's sight.
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "uwsgi", ModuleType("uwsgi"))
        LLMUsageWSGIMiddleware(wsgi_app)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # A handler of the server's or the app's own, or SIGTERM ignored, stays.
    for disposition in (signal.SIG_IGN, signal.default_int_handler):
        signal.signal(signal.SIGTERM, disposition)
        tally_app = Flask(__name__)
        LLMUsageWSGIMiddleware(tally_app.wsgi_app)
        assert signal.getsignal(signal.SIGTERM) is disposition
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    LLMUsageWSGIMiddleware(wsgi_app)
    assert signal.getsignal(signal.SIGTERM) is _flush_then_terminate


def lock_sqlite(path: Path) -> sqlite3.Connection:
    """Hold SQLite's write lock: the writer waits (its busy timeout is 10 s) until released."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_the_shutdown_flush_is_bounded_and_says_what_it_left(
    tally: Tally, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
    assert tally.flush(10)
    lock = lock_sqlite(tmp_path / "usage.db")
    try:
        for _ in range(3):
            tally.record(user_id="u", model="gpt-4o-mini", input_tokens=1)
        with caplog.at_level(logging.WARNING, logger="llm_tally"):
            assert flush_before_exit([tally], timeout=0.2) is False
        assert "records still waiting to be stored after 0.2 s at shutdown" in caplog.text
    finally:
        lock.close()
    assert flush_before_exit([tally], timeout=10) is True
    assert tally.count_records() == 4


def test_a_second_sigterm_ends_a_waiting_flush_at_once(
    tmp_path: Path, fake_llm: FakeServer
) -> None:
    path = tmp_path / "usage.db"
    env = {"TEST_DB_URL": f"sqlite:///{path}", "TEST_LLM_URL": fake_llm.base_url}
    env["TEST_FLUSH_INTERVAL"] = "30"
    port = free_port()
    with serve(python_command("-m", "tests.served_app", str(port)), port, env) as server:
        server.wait_ready()
        assert httpx2.get(f"{server.url}/ask?n=1&user=u", timeout=10).status_code == 200
        lock = lock_sqlite(path)
        try:
            server.process.send_signal(signal.SIGTERM)
            # Still there: its flush waits for the store.
            with pytest.raises(subprocess.TimeoutExpired):
                server.process.wait(1)
            assert server.stop(signal.SIGTERM, timeout=5) == -signal.SIGTERM
        finally:
            lock.close()
    assert stored_markers(f"sqlite:///{path}") == []

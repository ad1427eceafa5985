"""A store outage of 60 s under 100 calls/s: calls are unaffected, records wait in memory then
on disk, and every one arrives exactly once when the store is back.

Both stores are broken for real and at the same time (one test, so CI waits once): the
PostgreSQL server becomes unreachable (its TCP connections are cut and new ones refused,
through a loopback proxy), and the SQLite file is locked by another process.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy.engine import make_url

import llm_tally
from llm_tally import Tally

from .conftest import POSTGRES_URL, FakeServer

OUTAGE_SECONDS = float(os.environ.get("LLM_TALLY_TEST_OUTAGE_SECONDS", "60"))
CALLS_PER_SECOND = 100
MAX_QUEUE = 500  # records in memory; the rest of the outage waits on disk


class TcpProxy:
    """Forwards a loopback port to ``target``; ``cut()`` kills every connection and refuses
    new ones until ``restore()``: to its clients the server is gone."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        # shutdown() first: close() alone does not stop an accept() blocked in another thread.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(a, selectors.EVENT_READ, b)
            selector.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in selector.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            a.close()
            b.close()


def lock_sqlite_file(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process takes SQLite's write lock on ``path`` and keeps it for ``seconds``."""
    script = textwrap.dedent(
        f"""
        import sqlite3, sys, time
        conn = sqlite3.connect({str(path)!r}, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep({seconds})
        conn.execute("COMMIT")
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    """Wait for the lock holder to commit and exit."""
    holder.wait(timeout=30)
    assert holder.stdout is not None
    holder.stdout.close()


class Traffic:
    """CALLS_PER_SECOND chat calls charged to 20 users, through the real SDK, in a thread."""

    def __init__(self, tally: Tally, client: openai.OpenAI) -> None:
        self.tally = tally
        self.client = client
        self.calls: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        started = time.monotonic()
        n = 0
        while not self.stop.is_set():
            user = f"user-{n % 20}"
            try:
                with llm_tally.user(user, tally=self.tally, plan="pro" if n % 3 else "free"):
                    reply = self.client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"q {n}"}]
                    )
                assert reply.usage is not None and reply.choices[0].message.content
                self.calls[user] += 1
                self.tokens[user] += reply.usage.total_tokens
            except BaseException as exc:  # the test fails on any
                self.failures.append(exc)
            n += 1
            pause = started + n / CALLS_PER_SECOND - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def during_outage(
    traffic: Traffic, cut: Callable[[], Any], restore: Callable[[], Any]
) -> dict[str, Any]:
    """Run the traffic; cut the store after 2 s for OUTAGE_SECONDS; returns stats seen
    during the outage."""
    traffic.thread.start()
    time.sleep(2)
    cut()
    time.sleep(OUTAGE_SECONDS)
    seen = {**traffic.tally.stats(), "health": traffic.tally.health()["status"]}
    restore()
    time.sleep(2)
    traffic.stop.set()
    traffic.thread.join()
    return seen


def assert_all_arrived(traffic: Traffic, seen: dict[str, Any]) -> None:
    tally = traffic.tally
    assert not traffic.failures, traffic.failures[:3]  # the app's calls never noticed
    assert tally.flush(timeout=120), tally.stats()
    made = sum(traffic.calls.values())
    assert made >= CALLS_PER_SECOND * OUTAGE_SECONDS * 0.5  # the load really ran
    # The outage was real, and visible: writes failed, records waited in memory and on disk.
    assert seen["health"] == "degraded", seen
    # SQLite's writer waits 10 s for the lock before its insert fails.
    assert seen["write_errors"] > 0 or OUTAGE_SECONDS < 15, seen
    # In memory: at most the queue and the batch being retried.
    assert seen["spilled"] > 0 and seen["queue_depth"] <= 2 * MAX_QUEUE, seen
    assert seen["dropped"] == 0
    stats = tally.stats()
    assert stats["dropped"] == 0 and stats["replayed"] == stats["spilled"], stats
    assert tally.count_records() == made
    for user, calls in traffic.calls.items():
        totals = tally.user_totals(user)
        assert totals.requests == calls, user
        assert totals.input_tokens + totals.output_tokens == traffic.tokens[user], user
    by_plan = {group.value: group.requests for group in tally.totals_by("plan")}
    assert sum(by_plan.values()) == made
    assert all(group.cost_usd > Decimal(0) for group in tally.totals_by("plan"))


@pytest.mark.postgres
def test_a_60_s_outage_of_both_stores_loses_nothing_and_never_blocks_the_app(
    tmp_path: Path, pg_url: str, fake_llm: FakeServer
) -> None:
    target = make_url(POSTGRES_URL)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    sqlite_file = tmp_path / "usage.db"
    postgres = Tally(proxied, max_queue=MAX_QUEUE, flush_interval=0.02)
    sqlite = Tally(f"sqlite:///{sqlite_file}", max_queue=MAX_QUEUE, flush_interval=0.02)
    clients = [
        openai.OpenAI(base_url=fake_llm.base_url, api_key="k", max_retries=0) for _ in range(2)
    ]
    try:
        traffics = [Traffic(postgres, clients[0]), Traffic(sqlite, clients[1])]
        holder: list[subprocess.Popen[str]] = []
        seen: dict[int, dict[str, Any]] = {}

        def sqlite_outage() -> None:
            seen[1] = during_outage(
                traffics[1],
                lambda: holder.append(lock_sqlite_file(sqlite_file, OUTAGE_SECONDS)),
                lambda: release(holder[0]),
            )

        other = threading.Thread(target=sqlite_outage)
        other.start()
        seen[0] = during_outage(traffics[0], proxy.cut, proxy.restore)
        other.join()
        for traffic, index in zip(traffics, (0, 1), strict=True):
            assert_all_arrived(traffic, seen[index])
    finally:
        for client in clients:
            client.close()
        postgres.close(timeout=10)
        sqlite.close(timeout=10)
        if proxy._listener is not None:
            proxy.cut()

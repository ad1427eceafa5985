"""Pseudonymisation: with a key, the store and the journal hold keyed hashes of user ids,
never the ids, and every lookup by the real id (Python API, /api/me) still works."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from pathlib import Path

import httpx2
import openai
import pytest
from fastapi import FastAPI, Request

import llm_tally
from llm_tally import Tally
from llm_tally._pseudonym import is_pseudonym
from llm_tally.demo.serve import BackgroundServer

from .conftest import FakeServer

KEY = "a-test-key-of-32-characters-long"
USERS = {"alice@example.com": 3, "bob@example.org": 2}


def everything_in(database: Path) -> str:
    """Every value of every table of a SQLite file, as one text."""
    with sqlite3.connect(database) as conn:
        tables = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return " ".join(
            str(row) for table in tables for row in conn.execute(f'SELECT * FROM "{table}"')
        )


def test_ids_are_stored_as_keyed_hashes_and_found_by_the_real_id(
    tmp_path: Path, fake_llm: FakeServer
) -> None:
    database = tmp_path / "usage.db"
    journal = tmp_path / "journal"
    tally = Tally(f"sqlite:///{database}", pseudonymize_key=KEY, journal=journal)
    app = FastAPI()
    tally.init_app(
        app, identify=lambda request: request.headers.get("x-user"), authorize=lambda r: True
    )
    client = openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="k", max_retries=0)

    @app.get("/ask")
    async def ask(request: Request) -> dict[str, int]:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        return {"tokens": reply.usage.total_tokens if reply.usage else 0}

    try:
        with BackgroundServer(app) as server, httpx2.Client(base_url=server.url) as http:
            for user, calls in USERS.items():
                for _ in range(calls):
                    assert http.get("/ask", headers={"x-user": user}).status_code == 200
            journal_bytes = b"".join(p.read_bytes() for p in journal.glob("*.journal"))
            assert tally.flush(10)
            me = http.get("/llm-usage/api/me", headers={"x-user": "alice@example.com"}).json()
            listed = http.get("/llm-usage/api/users").json()
            alice = tally.pseudonym("alice@example.com")
            by_pseudonym = http.get(f"/llm-usage/api/users/{alice}").json()
            page = http.get(f"/llm-usage/users/{alice}").text
            # The real id works on the dashboard too: totals and recent calls are alice's.
            by_email = http.get("/llm-usage/users/alice@example.com").text
        tally.record(user_id="carol@example.net", model="gpt-4o-mini", input_tokens=5)
        assert tally.flush(10)
        stored = everything_in(database)
    finally:
        tally.close()

    expected = hmac.new(KEY.encode(), b"alice@example.com", hashlib.sha256).hexdigest()[:32]
    assert alice == f"h:{expected}" and is_pseudonym(alice)
    for user in (*USERS, "carol@example.net"):
        assert user not in stored and user.encode() not in journal_bytes
    assert alice in stored and b"h:" in journal_bytes
    assert me["requests"] == 3 and me["user_id"] == alice
    assert {u["user_id"] for u in listed["users"]} == {tally.pseudonym(u) for u in USERS}
    assert by_pseudonym["requests"] == 3 and "alice@" not in page and alice in page
    assert by_email.count("gpt-4o-mini") >= 3 and 'id="no-activity"' not in by_email
    with Tally(f"sqlite:///{database}", pseudonymize_key=KEY, journal=False) as again:
        assert again.user_totals("bob@example.org").requests == 2
        assert again.user_totals(again.pseudonym("bob@example.org")).requests == 2
        assert again.user_totals("carol@example.net").requests == 1
        assert [r["user_id"] for r in again.iter_records(user_id="alice@example.com")] == [
            alice
        ] * 3
    # Another key gives other pseudonyms: the ids cannot be matched without the key.
    with Tally(f"sqlite:///{database}", pseudonymize_key=KEY + "!", journal=False) as other:
        assert other.pseudonym("alice@example.com") != alice
        assert other.user_totals("alice@example.com").requests == 0


def test_the_key_can_come_from_the_environment(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_TALLY_PSEUDONYMIZE_KEY", KEY)
    with Tally(db_url, instrument=False) as tally:
        with llm_tally.user("dave"):
            pass
        tally.record(user_id="dave", model="gpt-4o-mini", input_tokens=1)
        assert tally.flush(10)
        assert [u.user_id for u in tally.users()] == [tally.pseudonym("dave")]
        assert tally.pseudonym("dave") != "dave" and tally.pseudonym(None) is None
    monkeypatch.delenv("LLM_TALLY_PSEUDONYMIZE_KEY")
    with Tally(db_url, instrument=False) as plain:
        assert plain.pseudonym("dave") == "dave"  # without a key ids are stored as given
        assert plain.user_totals("dave").requests == 0


@pytest.mark.parametrize("key", ["short", b"", 12345])
def test_a_weak_or_wrong_key_is_refused(db_url: str, key: object) -> None:
    with pytest.raises(ValueError, match="pseudonymize_key"):
        Tally(db_url, pseudonymize_key=key)  # type: ignore[arg-type]

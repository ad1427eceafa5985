"""The README's quickstarts are copy-paste correct: their code runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx2
import pytest

from llm_tally.demo.serve import BackgroundServer

from .conftest import FakeServer, serve_wsgi

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {heading}'"
    return match.group(1)


@pytest.fixture
def readme_env(fake_llm: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The snippets build OpenAI() clients from the environment, as users do.
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("LLM_TALLY_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)


def test_fastapi_quickstart(readme_env: None, fake_llm: FakeServer) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_fastapi"}
    exec(compile(snippet("FastAPI quickstart"), "README.md", "exec"), namespace)
    tally = namespace["tally"]
    try:
        with (
            BackgroundServer(namespace["app"]) as server,
            httpx2.Client(base_url=server.url) as http,
        ):
            assert http.post("/ask", params={"question": "hi"}).status_code == 422
            denied = http.post(
                "/ask", params={"question": "hi"}, headers={"Authorization": "Bearer nope"}
            )
            assert denied.status_code == 401
            answer = http.post(
                "/ask",
                params={"question": "how are you today"},
                headers={"Authorization": "Bearer secret-token-1"},
            )
            assert answer.status_code == 200 and answer.json()["answer"]
            tally.flush()
            listed = http.get("/llm-usage/api/users").json()
        totals = tally.user_totals("user-123")
        assert totals.requests == 1
        assert totals.input_tokens == fake_llm.ledger[-1]["input"] == 4
        assert [u["user_id"] for u in listed["users"]] == ["user-123"]
        assert Path("llm_tally.db").exists()
    finally:
        tally.close()


def test_flask_quickstart(readme_env: None, fake_llm: FakeServer) -> None:
    from flask import request
    from flask_login import UserMixin, login_user

    namespace: dict[str, Any] = {"__name__": "readme_flask"}
    exec(compile(snippet("Flask quickstart"), "README.md", "exec"), namespace)
    app, tally = namespace["app"], namespace["tally"]

    # What "your user_loader, login views... as usual" stands for.
    class User(UserMixin):
        def __init__(self, user_id: str) -> None:
            self.id = user_id
            self.is_admin = user_id == "admin"

    app.secret_key = "test"
    namespace["login_manager"].user_loader(User)

    @app.post("/login")
    def login() -> str:
        login_user(User(request.args["user"]))
        return "ok"

    try:
        with (
            serve_wsgi(app) as base,
            httpx2.Client(base_url=base) as alice,
            httpx2.Client(base_url=base) as admin,
        ):
            assert alice.post("/ask").status_code == 401
            alice.post("/login", params={"user": "alice"}).raise_for_status()
            assert alice.post("/ask").json()["answer"]
            tally.flush()
            assert alice.get("/llm-usage/api/users").status_code == 403
            assert alice.get("/llm-usage/api/me").json()["requests"] == 1
            admin.post("/login", params={"user": "admin"}).raise_for_status()
            listed = admin.get("/llm-usage/api/users").json()
        assert [u["user_id"] for u in listed["users"]] == ["alice"]
        assert tally.user_totals("alice").requests == 1
    finally:
        tally.close()

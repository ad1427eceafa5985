"""``llm-tally demo``: a FastAPI app whose users call a built-in fake LLM, with ``/llm-usage``.

One uvicorn server on 127.0.0.1 serves the demo app, the fake OpenAI-compatible API
(mounted at ``/fake-openai``) and the usage endpoint (open to loopback). A scripted
client plays a few users on different plans; then the server keeps running so you can
open the usage endpoint, until Ctrl-C (or exits at once with ``--once``).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from typing import Annotated, Any

import httpx2
import openai
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse

import llm_tally
from llm_tally import Tally

from .fake_llm import FakeLLM
from .serve import BackgroundServer

# The demo's "user database": API token -> (user id, plan).
ACCOUNTS = {
    "token-alice": ("alice@example.com", "free"),
    "token-bob": ("bob@example.com", "pro"),
    "token-carol": ("carol@example.com", "pro"),
    "token-dave": ("dave@example.com", "enterprise"),
}
CALLS_PER_PLAN = {"free": 3, "pro": 8, "enterprise": 15}


def current_account(authorization: Annotated[str, Header()] = "") -> tuple[str, str]:
    """The app's own authentication, as a FastAPI dependency; it tells llm-tally who it is."""
    token = authorization.removeprefix("Bearer ").strip()
    if token not in ACCOUNTS:
        raise HTTPException(status_code=401, detail="unknown token")
    user_id, plan = ACCOUNTS[token]
    llm_tally.bind_user(user_id)  # every LLM call of this request is charged to the user
    llm_tally.tag(plan=plan)
    return user_id, plan


# FastAPI resolves annotations by name, so this alias lives at module level.
Account = Annotated[tuple[str, str], Depends(current_account)]


def create_app(tally: Tally) -> FastAPI:
    """The demo app: three endpoints that call an LLM, authenticated by a bearer token.

    Set ``app.state.llm_base_url`` before the first request (the fake LLM is mounted at
    ``/fake-openai`` of this very app, so its URL is known once the server listens).
    """
    app = FastAPI(title="llm-tally demo")
    app.mount("/fake-openai", FakeLLM().app)
    holder: dict[str, Any] = {}
    lock = threading.Lock()

    def clients() -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
        with lock:
            if not holder:
                base = app.state.llm_base_url
                holder["sync"] = openai.OpenAI(base_url=base, api_key="demo", max_retries=0)
                holder["async"] = openai.AsyncOpenAI(base_url=base, api_key="demo", max_retries=0)
        return holder["sync"], holder["async"]

    @app.get("/chat")
    async def chat(account: Account, words: int = 20, reply: int = 50) -> dict[str, Any]:
        llm_tally.tag(feature="chat")
        _, aclient = clients()
        result = await aclient.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": " ".join(["word"] * words)}],
            max_completion_tokens=reply,
        )
        return {"user": account[0], "reply": result.choices[0].message.content}

    @app.get("/summarize")
    def summarize(account: Account, words: int = 200) -> dict[str, Any]:
        llm_tally.tag(feature="summarize")
        client, _ = clients()
        result = client.responses.create(
            model="gpt-4o", input=" ".join(["text"] * words), max_output_tokens=80
        )
        return {"user": account[0], "summary": result.output_text}

    @app.get("/stream")
    async def stream(account: Account, reply: int = 30) -> StreamingResponse:
        llm_tally.tag(feature="stream")
        _, aclient = clients()

        async def relay() -> Any:
            chunks = await aclient.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "tell me a story"}],
                max_completion_tokens=reply,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in chunks:
                if chunk.choices:
                    yield chunk.choices[0].delta.content or ""

        return StreamingResponse(relay(), media_type="text/plain")

    @app.get("/")
    def home() -> dict[str, Any]:
        return {"endpoints": ["/chat", "/summarize", "/stream"], "usage": "/llm-usage/"}

    tally.init_app(app)
    return app


def play_users(base_url: str, seed: int = 7) -> int:
    """The scripted traffic: each user calls the demo app according to their plan."""
    rng = random.Random(seed)
    made = 0
    with httpx2.Client(base_url=base_url, timeout=30) as http:
        for token, (_, plan) in ACCOUNTS.items():
            headers = {"Authorization": f"Bearer {token}"}
            for _ in range(CALLS_PER_PLAN[plan]):
                path = rng.choice(["/chat", "/chat", "/summarize", "/stream"])
                params = {"words": rng.randint(5, 300), "reply": rng.randint(10, 400)}
                http.get(path, params=params, headers=headers).raise_for_status()
                made += 1
    return made


def run_demo(
    database_url: str | None = None, host: str = "127.0.0.1", port: int = 8000, once: bool = False
) -> None:
    """Serve the demo app, play the scripted users, print what to open."""
    if database_url is None:
        directory = tempfile.mkdtemp(prefix="llm-tally-demo-")
        database_url = f"sqlite:///{os.path.join(directory, 'demo.db')}"
    with Tally(database_url) as tally:
        app = create_app(tally)
        with BackgroundServer(app, host=host, port=port) as server:
            app.state.llm_base_url = f"{server.url}/fake-openai/v1"
            made = play_users(server.url)
            tally.flush()
            # Ctrl-C may come as soon as the URLs are printed: a clean stop from there on.
            try:
                _print_summary(tally, server.url, database_url, made)
                if once:
                    return
                print("Serving; press Ctrl-C to stop.")
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print()


def _print_summary(tally: Tally, url: str, database_url: str, made: int) -> None:
    header = f"{'user':<20} {'requests':>8} {'input':>8} {'output':>8} {'cost (USD)':>14}"
    print(f"Demo app on {url} (fake OpenAI at {url}/fake-openai/v1); usage in {database_url}\n")
    print(header)
    print("-" * len(header))
    for totals in tally.users(order_by="cost"):
        print(
            f"{totals.user_id or '-':<20} {totals.requests:>8} {totals.input_tokens:>8} "
            f"{totals.output_tokens:>8} {totals.cost_usd:>14}"
        )
    print(f"\n{made} requests served; each LLM call recorded for its user with exact cost.")
    print(f"Open {url}/llm-usage/ (JSON: {url}/llm-usage/api/users)")
    print(f"Try:  curl -s {url}/chat -H 'Authorization: Bearer token-bob'")

"""The app that real server processes serve in the multi-process and shutdown tests.

Built by uvicorn (``--factory tests.served_app:make_fastapi_app``), gunicorn, ``flask run``
(``tests.served_app:make_flask_app()``) and werkzeug (``python -m tests.served_app PORT``),
in processes of their own, never by pytest itself. Every request makes one instrumented
OpenAI call to the fake provider at ``$TEST_LLM_URL``, charged to the ``user`` query
parameter with the properties ``plan``, ``feature``, ``n`` (the request's marker) and
``worker`` (the serving process id); the response echoes ``n`` and ``worker``, so a test
knows which calls were answered, by whom, and what each must cost. ``$TEST_DB_URL`` is the
store; ``$TEST_FLUSH_INTERVAL`` the writer's interval; ``$TEST_JOURNAL=off`` turns the crash
journal off.

Query parameters: ``n``, ``user``, ``plan``, ``feature``, ``model``, ``kind`` (``chat`` or
``chat_stream``), ``words`` (prompt length), ``max_tokens``, ``cache_hit``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import openai
from fastapi import FastAPI, Request
from flask import Flask
from flask import request as flask_request

import llm_tally
from llm_tally import Tally
from llm_tally.demo.fake_llm import WORDS

LLM_URL = os.environ["TEST_LLM_URL"]
client = openai.OpenAI(base_url=LLM_URL, api_key="k", max_retries=0)
aclient = openai.AsyncOpenAI(base_url=LLM_URL, api_key="k", max_retries=0)


def _arguments(params: Mapping[str, str]) -> dict[str, Any]:
    """Charge the call to the request's user; the SDK call's arguments."""
    llm_tally.bind_user(params["user"])
    llm_tally.tag(
        plan=params.get("plan", "free"),
        feature=params.get("feature", "chat"),
        n=params["n"],
        worker=str(os.getpid()),
    )
    words = int(params.get("words", "3"))
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    max_tokens = int(params.get("max_tokens", "8"))
    metadata = {"prompt_cache_hit": params.get("cache_hit", "0")}
    arguments: dict[str, Any] = {
        "model": params.get("model", "gpt-4o-mini"),
        "messages": [{"role": "user", "content": prompt}],
        "max_completion_tokens": max_tokens,
        "metadata": metadata,
    }
    if params.get("kind") == "chat_stream":
        arguments |= {"stream": True, "stream_options": {"include_usage": True}}
    return arguments


def ask(params: Mapping[str, str]) -> dict[str, str]:
    arguments = _arguments(params)
    reply = client.chat.completions.create(**arguments)
    if arguments.get("stream"):
        for _ in reply:
            pass
    return {"n": params["n"], "worker": str(os.getpid())}


async def ask_async(params: Mapping[str, str]) -> dict[str, str]:
    arguments = _arguments(params)
    reply = await aclient.chat.completions.create(**arguments)
    if arguments.get("stream"):
        async for _ in reply:
            pass
    return {"n": params["n"], "worker": str(os.getpid())}


def open_tally() -> Tally:
    interval = float(os.environ.get("TEST_FLUSH_INTERVAL", "0.05"))
    journal = os.environ.get("TEST_JOURNAL", "on") != "off"
    return Tally(os.environ["TEST_DB_URL"], flush_interval=interval, journal=journal)


def make_fastapi_app() -> FastAPI:
    app = FastAPI()
    open_tally().init_app(app)

    @app.get("/ask")
    async def ask_async_endpoint(request: Request) -> dict[str, str]:
        return await ask_async(request.query_params)

    @app.get("/ask-sync")
    def ask_sync_endpoint(request: Request) -> dict[str, str]:
        # A sync endpoint: FastAPI runs it in its thread pool, with the sync SDK.
        return ask(request.query_params)

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"worker": str(os.getpid())}

    return app


def make_flask_app() -> Flask:
    app = Flask(__name__)
    open_tally().init_app(app)

    @app.get("/ask")
    def ask_endpoint() -> dict[str, str]:
        return ask(flask_request.args)

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"worker": str(os.getpid())}

    return app


if __name__ == "__main__":
    # `python -m tests.served_app PORT`: Flask's own development server (werkzeug), threaded.
    import sys

    make_flask_app().run(port=int(sys.argv[1]), threaded=True)

"""Never break the host: whatever fails inside llm-tally, or comes malformed from the
provider, the app's LLM call returns exactly what it returns without llm-tally (or raises
the same SDK exception).

Every test runs the same call through the real OpenAI SDK against the same deterministic
fake provider (real HTTP on loopback), once uninstrumented and then instrumented with the
fault, and compares what the app sees: parsed objects (``model_dump``), every streamed
chunk, raw bytes, or the exception's type, status and message.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import genai_prices.data_snapshot
import httpx2
import openai
import pytest
import tiktoken
from flask import Flask
from flask import Response as FlaskResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_tally import Tally
from llm_tally import _tokens as tokens_module
from llm_tally import _validation as validation
from llm_tally._internal import internal_error_counts, set_raise_internal_errors
from llm_tally.demo.serve import BackgroundServer
from llm_tally.integrations import openai as integration
from llm_tally.integrations.openai import _Call
from llm_tally.middleware import asgi as asgi_middleware
from llm_tally.web import flask as flask_web

from .conftest import serve_wsgi, stored_rows

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "name three letters of the NATO alphabet"}]
INPUT = "name three letters of the NATO alphabet"
WORDS = ("Alpha", " bravo", " charlie")
CHAT_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 3,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 11,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 3,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 14,
}
REQUEST_ID = "req_scripted"


# -- a deterministic provider: the same request always gets the same bytes ---------------------


class ConnectionCut(Exception):
    """Raised by the fake provider's app: uvicorn then drops the connection mid-body."""


def _sse(data: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()


def _chat(body: dict[str, Any], fault: str) -> tuple[str, list[bytes]]:
    usage = None if fault == "no-usage" else CHAT_USAGE
    base = {"id": "chatcmpl-scripted", "created": 0, "model": f"{MODEL}-2024-07-18"}
    if not body.get("stream"):
        reply = {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS)},
                    "finish_reason": "stop",
                }
            ],
        }
        if usage is not None:
            reply["usage"] = usage
        return "application/json", [json.dumps(reply).encode()]
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    include_usage = include_usage and usage is not None

    def chunk(choices: list[Any], last: bool = False) -> bytes:
        data: dict[str, Any] = {**base, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            data["usage"] = usage if last else None
        return _sse(data)

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    events += [chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in WORDS]
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if include_usage:
        events.append(chunk([], last=True))
    events.append(b"data: [DONE]\n\n")
    return "text/event-stream", events


def _responses(body: dict[str, Any], fault: str) -> tuple[str, list[bytes]]:
    text = "".join(WORDS)
    item = {
        "type": "message",
        "id": "msg_scripted",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    response: dict[str, Any] = {
        "id": "resp_scripted",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": MODEL,
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": None if fault == "no-usage" else RESPONSES_USAGE,
    }
    if not body.get("stream"):
        return "application/json", [json.dumps(response).encode()]
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": "msg_scripted", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": started}]
    events += [
        {"type": "response.output_text.delta", **where, "delta": w, "logprobs": []} for w in WORDS
    ]
    events.append({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
    events.append({"type": "response.completed", "response": response})
    return "text/event-stream", [
        _sse({**event, "sequence_number": n}, event["type"]) for n, event in enumerate(events)
    ]


def _embeddings(body: dict[str, Any], fault: str) -> tuple[str, list[bytes]]:
    values = [0.125, -0.5, 0.25, 1.0]
    vector: Any = values
    if body.get("encoding_format") == "base64":
        vector = base64.b64encode(struct.pack("<4f", *values)).decode()
    reply: dict[str, Any] = {
        "object": "list",
        "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
    }
    if fault != "no-usage":
        reply["usage"] = {"prompt_tokens": 7, "total_tokens": 7}
    return "application/json", [json.dumps(reply).encode()]


_ROUTES = {
    "/v1/chat/completions": _chat,
    "/v1/responses": _responses,
    "/v1/embeddings": _embeddings,
}
_ERRORS = {"status-500": 500, "status-429": 429, "status-429-then-ok": 429}


async def scripted_llm(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The fake provider (raw ASGI, to control every byte). The ``x-fault`` request header
    picks a misbehaviour: ``no-usage``, ``invalid-json`` (a 200 whose JSON body is cut),
    ``sse-not-json`` (a stream with a ``data:`` line that is not JSON), ``cut`` (the
    connection drops mid-body), ``status-500`` / ``status-429`` (every attempt fails),
    ``status-429-then-ok`` (the first attempt fails)."""
    if scope["type"] != "http":
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    fault = headers.get("x-fault", "")
    first_attempt = headers.get("x-stainless-retry-count", "0") == "0"
    body = json.loads(raw)
    status = _ERRORS.get(fault, 200)
    if status != 200 and (fault != "status-429-then-ok" or first_attempt):
        error = {"message": f"scripted {fault}", "type": "server_error", "code": fault}
        content_type, parts = "application/json", [json.dumps({"error": error}).encode()]
    else:
        status = 200
        content_type, parts = _ROUTES[scope["path"]](body, fault)
    if fault == "invalid-json" and content_type == "application/json":
        parts = [parts[0][: len(parts[0]) // 2]]
    elif fault == "sse-not-json" and len(parts) > 2:
        parts.insert(2, b"data: {this is not json\n\n")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"x-request-id", REQUEST_ID.encode()),
                (b"retry-after-ms", b"1"),  # retries without the SDK's backoff delay
            ],
        }
    )
    if fault == "cut":
        # Half the events (or half the JSON body), then the connection drops.
        kept = parts[: len(parts) // 2] if len(parts) > 1 else [parts[0][: len(parts[0]) // 2]]
        for part in kept:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        raise ConnectionCut("the provider dropped the connection")
    await send({"type": "http.response.body", "body": b"".join(parts)})


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    # uvicorn logs each cut connection at ERROR: expected here, not worth the noise.
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    uvicorn_log.setLevel(logging.CRITICAL)
    try:
        with BackgroundServer(scripted_llm) as server:
            yield f"{server.url}/v1"
    finally:
        uvicorn_log.setLevel(level)


class Clients:
    """The app's OpenAI clients; the async one is made only for the modes that use it."""

    def __init__(self, sync: openai.OpenAI, base_url: str) -> None:
        self.sync = sync
        self._base_url = base_url
        self._aio: openai.AsyncOpenAI | None = None

    @property
    def aio(self) -> openai.AsyncOpenAI:
        if self._aio is None:
            self._aio = openai.AsyncOpenAI(base_url=self._base_url, api_key="k", max_retries=1)
        return self._aio

    def without_retries(self) -> Clients:
        """The same clients, sharing their connections, not retrying (the SDK backs off
        about a second before retrying a broken connection)."""
        copy = Clients(self.sync.with_options(max_retries=0), self._base_url)
        copy._aio = self.aio.with_options(max_retries=0)
        return copy


@pytest.fixture(scope="module")
def sync_client(llm_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=llm_url, api_key="k", max_retries=1) as client:
        yield client


@pytest.fixture
async def clients(sync_client: openai.OpenAI, llm_url: str) -> AsyncIterator[Clients]:
    c = Clients(sync_client, llm_url)
    yield c
    if c._aio is not None:
        await c._aio.close()


# -- what the app does: one call in each SDK mode ------------------------------------------------

Mode = Callable[[Clients, dict[str, str], list[Any]], Awaitable[Any]]


async def chat(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    return c.sync.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_headers=h
    ).model_dump()


async def chat_async(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    reply = await c.aio.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=h)
    return reply.model_dump()


async def chat_stream(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    # The caller did not ask for usage: llm-tally asks for it and must hide the extra chunk.
    stream = c.sync.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=h
    )
    seen.extend(chunk.model_dump() for chunk in stream)
    return seen


async def chat_stream_usage(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    # The caller asked for usage: the usage chunk must reach it.
    stream = c.sync.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=h,
    )
    seen.extend(chunk.model_dump() for chunk in stream)
    return seen


async def chat_stream_async(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    stream = await c.aio.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=h
    )
    async for chunk in stream:
        seen.append(chunk.model_dump())
    return seen


async def responses(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    return c.sync.responses.create(model=MODEL, input=INPUT, extra_headers=h).model_dump()


async def responses_stream(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    stream = c.sync.responses.create(model=MODEL, input=INPUT, stream=True, extra_headers=h)
    seen.extend(event.model_dump() for event in stream)
    return seen


async def responses_stream_async(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    stream = await c.aio.responses.create(model=MODEL, input=INPUT, stream=True, extra_headers=h)
    async for event in stream:
        seen.append(event.model_dump())
    return seen


async def embeddings(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    return c.sync.embeddings.create(
        model="text-embedding-3-small", input=INPUT, extra_headers=h
    ).model_dump()


async def raw(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    response = c.sync.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers=h
    )
    seen.append(response.content)
    return [response.status_code, response.content, response.parse().model_dump()]


async def raw_responses(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    response = c.sync.responses.with_raw_response.create(model=MODEL, input=INPUT, extra_headers=h)
    seen.append(response.content)
    return [response.status_code, response.content, response.parse().model_dump()]


async def raw_stream(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    response = c.sync.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=h
    )
    seen.append(response.status_code)
    seen.extend(chunk.model_dump() for chunk in response.parse())
    return seen


async def streaming_response(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    with c.sync.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, extra_headers=h
    ) as response:
        seen.append(response.status_code)
        seen.extend(response.iter_bytes())
    return seen


async def streaming_response_stream(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    with c.sync.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=h
    ) as response:
        seen.append(response.status_code)
        seen.extend(response.iter_bytes())
    return seen


async def streaming_response_async(c: Clients, h: dict[str, str], seen: list[Any]) -> Any:
    async with c.aio.responses.with_streaming_response.create(
        model=MODEL, input=INPUT, stream=True, extra_headers=h
    ) as response:
        seen.append(response.status_code)
        async for part in response.iter_bytes():
            seen.append(part)
    return seen


MODES: dict[str, Mode] = {
    mode.__name__: mode
    for mode in (
        chat,
        chat_async,
        chat_stream,
        chat_stream_usage,
        chat_stream_async,
        responses,
        responses_stream,
        responses_stream_async,
        embeddings,
        raw,
        raw_responses,
        raw_stream,
        streaming_response,
        streaming_response_stream,
        streaming_response_async,
    )
}
STREAMED = {
    "chat_stream",
    "chat_stream_usage",
    "chat_stream_async",
    "responses_stream",
    "responses_stream_async",
    "raw_stream",
    "streaming_response_stream",
    "streaming_response_async",
}
# Streams the SDK parses into chunks/events (what the stream observer sees).
OBSERVED_STREAMS = STREAMED - {"streaming_response_stream", "streaming_response_async"}
# The SDK reads the whole body before the call returns.
READ_IN_REQUEST = set(MODES) - STREAMED - {"streaming_response"}
# Raw bodies read after the call returned pass through a tap that keeps their tail.
TAPPED = {
    "raw_stream",
    "streaming_response",
    "streaming_response_stream",
    "streaming_response_async",
}
# The app reads the raw body itself.
RAW_BODY_MODES = {"raw", "raw_responses", "streaming_response"}


def _normal(items: Any) -> Any:
    """Byte pieces joined: how the network splits a body is not part of the result."""
    if not isinstance(items, list):
        return items
    out: list[Any] = []
    for item in items:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += item
        else:
            out.append(item)
    return out


async def outcome(mode: str, c: Clients, fault: str) -> tuple[Any, ...]:
    """What the app sees: the result, or what it saw before the exception and the exception."""
    headers = {"x-fault": fault} if fault else {}
    if fault == "cut":
        c = c.without_retries()
    seen: list[Any] = []
    try:
        value = await MODES[mode](c, headers, seen)
    except Exception as exc:
        status = getattr(exc, "status_code", None)
        return ("raised", _normal(seen), type(exc), status, str(exc))
    return ("returned", _normal(value))


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A stored record without what differs from call to call (id, time, latency)."""
    volatile = {"id", "ts", "latency_us", "ttft_us"}
    return {k: v for k, v in row.items() if k not in volatile} | {
        "has_ttft": row["ttft_us"] is not None
    }


@pytest.fixture
def quiet_internal_errors() -> Iterator[None]:
    """Production mode: internal errors are logged and counted, not raised."""
    set_raise_internal_errors(False)
    yield
    set_raise_internal_errors(True)


def llm_tally_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llm_tally" and r.levelno == level]


def assert_each_kind_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Every kind counted was logged exactly once, the first time, with its traceback."""
    logged = llm_tally_logs(caplog, logging.ERROR)
    kinds = [r.args[0] for r in logged if isinstance(r.args, tuple)]
    assert sorted(kinds) == sorted(internal_error_counts), (kinds, internal_error_counts)
    assert all(r.exc_info is not None for r in logged)


# == faults inside llm-tally ====================================================================


def simulated_bug(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("simulated llm-tally bug")


REFUSE_INSERTS = {
    "sqlite": [
        "CREATE TRIGGER refuse_usage BEFORE INSERT ON llm_tally_usage "
        "BEGIN SELECT RAISE(ABORT, 'simulated store failure'); END"
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION refuse_usage() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'simulated store failure'; END $$",
        "CREATE TRIGGER refuse_usage BEFORE INSERT ON llm_tally_usage "
        "FOR EACH ROW EXECUTE FUNCTION refuse_usage()",
    ],
}
ACCEPT_INSERTS = {
    "sqlite": "DROP TRIGGER refuse_usage",
    "postgresql": "DROP TRIGGER refuse_usage ON llm_tally_usage",
}


def break_store(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    # The store refuses every insert, as a full disk or a lost permission would.
    with tally.engine.begin() as conn:
        for statement in REFUSE_INSERTS[tally.engine.dialect.name]:
            conn.exec_driver_sql(statement)


def break_pricing(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    # genai-prices' price data cannot be read (a dependency failing, not our code).
    monkeypatch.setattr(genai_prices.data_snapshot, "get_snapshot", simulated_bug)


def break_tiktoken(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(name: str) -> Any:
        raise OSError(f"simulated: tiktoken cannot load {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    monkeypatch.setattr(tokens_module, "_encodings", {})  # nothing loaded yet in this process


def break_estimate(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integration, "count_prompt", simulated_bug)


def break_tap(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integration._Tail, "add", simulated_bug)


def break_begin(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Call, "begin", simulated_bug)


def break_finish(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every way a call ends goes through finish(): each of those paths must be guarded.
    monkeypatch.setattr(_Call, "finish", simulated_bug)


def break_observer(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Call, "_observe_chunk", simulated_bug)
    monkeypatch.setattr(_Call, "_observe_event", simulated_bug)


def break_to_record(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Call, "to_record", simulated_bug)


Check = Callable[[Tally, str, dict[str, Any], pytest.LogCaptureFixture], None]


def without(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


def check_store(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    deadline = time.monotonic() + 10
    while tally.stats()["write_errors"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    health = tally.health()
    assert health["status"] == "degraded"
    assert health["write_errors"] >= 1 and "simulated store failure" in health["last_write_error"]
    assert tally.count_records() == 0
    # The store recovers: the records kept in memory are stored, none lost, none twice.
    with tally.engine.begin() as conn:
        conn.exec_driver_sql(ACCEPT_INSERTS[tally.engine.dialect.name])
    assert [comparable(row) for row in stored_rows(tally)] == [clean, clean]
    assert tally.health()["status"] == "ok"
    assert not internal_error_counts  # a failing store is not a bug of ours: stats() shows it
    warned = [r for r in llm_tally_logs(caplog, logging.WARNING) if "storing" in r.getMessage()]
    assert len(warned) == 1


def check_pricing(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    assert clean["cost_nano_usd"] is not None and clean["cost_source"] != "unknown"
    unpriced = clean | {"cost_nano_usd": None, "cost_source": "unknown"}
    assert [comparable(row) for row in stored_rows(tally)] == [unpriced, unpriced]
    assert internal_error_counts == {"pricing": 2}
    assert_each_kind_logged_once(caplog)


def check_tiktoken(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    assert clean["usage_source"] == "estimated"
    rows = [comparable(row) for row in stored_rows(tally)]
    estimate = ("input_tokens", "output_tokens", "cost_nano_usd")
    assert [without(row, *estimate) for row in rows] == [without(clean, *estimate)] * 2
    # Still an estimate (a rougher one), still priced.
    assert all(row["input_tokens"] > 0 and row["cost_nano_usd"] is not None for row in rows)
    assert set(internal_error_counts) == {"tiktoken"}
    assert_each_kind_logged_once(caplog)


def check_estimate(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    assert clean["usage_source"] == "estimated" and clean["input_tokens"] > 0
    # Kept, with tokens unknown (0) and marked estimated, rather than lost.
    unknown = clean | {"input_tokens": 0, "output_tokens": 0}
    rows = [without(comparable(row), "cost_nano_usd", "cost_source") for row in stored_rows(tally)]
    assert rows == [without(unknown, "cost_nano_usd", "cost_source")] * 2
    # Not priced at 0 tokens: its cost is unknown (counted as unpriced in reports).
    costs = [(row["cost_nano_usd"], row["cost_source"]) for row in stored_rows(tally)]
    assert costs == [(None, "unknown")] * 2
    assert internal_error_counts == {"read usage": 2}
    assert_each_kind_logged_once(caplog)


def check_begin(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    assert stored_rows(tally) == []  # the call went on unobserved
    assert internal_error_counts == {"begin call": 2}
    assert_each_kind_logged_once(caplog)


def check_finish(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    assert stored_rows(tally) == []
    assert internal_error_counts and sum(internal_error_counts.values()) >= 2
    assert_each_kind_logged_once(caplog)


def check_observer(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    rows = [comparable(row) for row in stored_rows(tally)]
    if mode not in OBSERVED_STREAMS:
        assert rows == [clean, clean]
        assert not internal_error_counts
        return
    # Recorded, as an estimate: the observer saw neither the usage nor the text.
    unobserved = ("input_tokens", "output_tokens", "cost_nano_usd", "usage_source")
    unobserved += ("response_model", "has_ttft")
    assert [without(row, *unobserved) for row in rows] == [without(clean, *unobserved)] * 2
    assert set(internal_error_counts) == {"observe chunk"}
    assert internal_error_counts["observe chunk"] >= 2
    assert_each_kind_logged_once(caplog)


def check_tap(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    rows = [comparable(row) for row in stored_rows(tally)]
    if mode not in TAPPED:
        assert rows == [clean, clean]
        assert not internal_error_counts
        return
    assert set(internal_error_counts) == {"tap raw body"}
    assert_each_kind_logged_once(caplog)
    if mode in OBSERVED_STREAMS:
        assert rows == [clean, clean]  # the stream observer records it all the same
    else:
        # Kept, as an estimate: the body's usage was never seen.
        unseen = ("input_tokens", "output_tokens", "cost_nano_usd", "usage_source", "status")
        unseen += ("response_model",)
        assert [without(row, *unseen) for row in rows] == [without(clean, *unseen)] * 2


def check_to_record(tally: Tally, mode: str, clean: dict[str, Any], caplog: Any) -> None:
    assert stored_rows(tally) == []
    assert internal_error_counts == {"build record": 2}
    assert tally.stats()["dropped"] == 2 and tally.health()["status"] == "degraded"
    assert_each_kind_logged_once(caplog)


@dataclass(frozen=True)
class Fault:
    inject: Callable[[Tally, pytest.MonkeyPatch], None]
    check: Check  # the record, counters and logs after two faulty calls
    server: str = ""  # what the provider must do for the fault to matter


FAULTS = {
    "store": Fault(break_store, check_store),
    "pricing": Fault(break_pricing, check_pricing),
    # Only an estimate needs tiktoken: the provider reports no usage.
    "tiktoken": Fault(break_tiktoken, check_tiktoken, server="no-usage"),
    "estimate": Fault(break_estimate, check_estimate, server="no-usage"),
    "begin": Fault(break_begin, check_begin),
    "finish": Fault(break_finish, check_finish),
    "observer": Fault(break_observer, check_observer),
    "tap": Fault(break_tap, check_tap),
    "to_record": Fault(break_to_record, check_to_record),
}


class References:
    """What the app gets without llm-tally, and the record of the same call instrumented
    without a fault, per mode and provider behaviour (computed once: they are the same
    every time)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[tuple[Any, ...], dict[str, Any]]] = {}

    async def get(
        self, mode: str, clients: Clients, server: str, url: str
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        key = (mode, server)
        if key not in self._known:
            bare = await outcome(mode, clients, server)
            with Tally(url, inject_stream_usage=True) as clean:
                assert await outcome(mode, clients, server) == bare
                [row] = [comparable(row) for row in stored_rows(clean)]
            assert not internal_error_counts
            self._known[key] = (bare, row)
        return self._known[key]


@pytest.fixture(scope="module")
def references() -> References:
    return References()


async def run_with_fault(
    references: References,
    fault: str,
    mode: str,
    clients: Clients,
    clean_url: str,
    faulty_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The call bare, instrumented (its record is the reference), then twice with the fault."""
    server = FAULTS[fault].server
    bare, clean_row = await references.get(mode, clients, server, clean_url)
    set_raise_internal_errors(False)
    tally = Tally(faulty_url, inject_stream_usage=True)
    try:
        FAULTS[fault].inject(tally, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="llm_tally"):
            for _ in range(2):
                assert await outcome(mode, clients, server) == bare
            FAULTS[fault].check(tally, mode, clean_row, caplog)
    finally:
        monkeypatch.undo()
        tally.close(timeout=5)
        set_raise_internal_errors(True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_fault_inside_llm_tally_leaves_the_call_unchanged(
    references: References,
    fault: str,
    mode: str,
    clients: Clients,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clean_url, faulty_url = (f"sqlite:///{tmp_path / name}" for name in ("clean.db", "faulty.db"))
    await run_with_fault(
        references, fault, mode, clients, clean_url, faulty_url, monkeypatch, caplog
    )


async def test_the_usage_chunk_reaches_only_callers_who_asked_for_it(
    references: References, clients: Clients, db_url: str
) -> None:
    """What the comparisons rest on: llm-tally asks for stream usage and hides the chunk."""
    asked, asked_row = await references.get("chat_stream_usage", clients, "", db_url)
    not_asked, not_asked_row = await references.get("chat_stream", clients, "", db_url)
    assert asked[1][-1]["choices"] == [] and asked[1][-1]["usage"]["prompt_tokens"] == 11
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in not_asked[1])
    # Both were recorded from the provider's usage: for the second, llm-tally asked for it.
    assert asked_row["usage_source"] == not_asked_row["usage_source"] == "provider"


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["chat", "chat_stream_async", "streaming_response_stream"])
async def test_a_failing_postgresql_store_leaves_the_call_unchanged_and_catches_up(
    references: References,
    mode: str,
    clients: Clients,
    db_url: str,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await run_with_fault(references, "store", mode, clients, db_url, pg_url, monkeypatch, caplog)


# == malformed provider responses ==============================================================

SERVER_FAULTS = (
    "no-usage",
    "invalid-json",
    "sse-not-json",
    "cut",
    "status-500",
    "status-429",
    "status-429-then-ok",
)


def _applies(server: str, mode: str) -> bool:
    if server == "invalid-json":
        return mode not in STREAMED
    if server == "sse-not-json":
        return mode in STREAMED
    return True


@pytest.mark.parametrize(
    ("server", "mode"),
    [(server, mode) for server in SERVER_FAULTS for mode in MODES if _applies(server, mode)],
)
async def test_a_malformed_response_reaches_the_app_as_without_llm_tally(
    server: str, mode: str, clients: Clients, db_url: str
) -> None:
    bare = await outcome(mode, clients, server)
    with Tally(db_url, inject_stream_usage=True) as tally:
        seen = await outcome(mode, clients, server)
        rows = stored_rows(tally)
    assert seen == bare
    assert not internal_error_counts  # nothing of ours failed (raised in tests)
    [row] = rows
    if server == "invalid-json" and mode in RAW_BODY_MODES:
        # The app itself reads (or parses) the body, cut short: the call did not complete.
        assert (row["status"], row["error_type"]) == ("aborted", None)
    elif bare[0] == "raised":
        assert (row["status"], row["error_type"]) == ("error", bare[2].__name__)
    else:
        assert (row["status"], row["error_type"]) == ("ok", None)
    if server in ("status-500", "status-429") or (server == "cut" and mode in READ_IN_REQUEST):
        # No answer from the provider (after one retry, if retried): nothing billed.
        assert (row["http_status"], row["retries"]) == (bare[3], int(server != "cut"))
        assert (row["cost_nano_usd"], row["cost_source"]) == (0, "not-billed")
        return
    # The provider answered: billed, from its usage or an estimate.
    assert (row["http_status"], row["retries"]) == (200, int(server == "status-429-then-ok"))
    assert row["cost_source"] == "genai-prices" and row["input_tokens"] > 0
    if server == "no-usage":
        assert row["usage_source"] == "estimated"
        assert row["output_tokens"] > 0 or mode == "embeddings"


# == in the test suite, our bugs surface ========================================================


@pytest.mark.parametrize(
    ("fault", "mode"),
    [
        ("observer", "chat_stream"),
        ("observer", "responses_stream_async"),
        ("tap", "streaming_response"),
    ],
)
async def test_with_re_raising_on_as_in_this_suite_an_internal_error_surfaces(
    fault: str, mode: str, clients: Clients, tally: Tally, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conftest turns re-raising on: a bug of ours fails the test instead of hiding in a log."""
    FAULTS[fault].inject(tally, monkeypatch)
    seen = await outcome(mode, clients, "")
    assert seen[0] == "raised" and seen[2:] == (RuntimeError, None, "simulated llm-tally bug")
    assert sum(internal_error_counts.values()) == 1


# == the web middleware: the app's callables and our user resolver ==============================


def explode(*args: Any) -> Any:
    raise RuntimeError("the app's session store is down")


def starlette_app(client: openai.OpenAI) -> Starlette:
    def ask(request: Request) -> Response:
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        return JSONResponse(reply.model_dump())

    def stream(request: Request) -> Response:
        chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        return StreamingResponse(json.dumps(c.model_dump()) + "\n" for c in chunks)

    return Starlette(routes=[Route("/ask", ask), Route("/stream", stream)])


def flask_app(client: openai.OpenAI) -> Flask:
    app = Flask(__name__)

    @app.get("/ask")
    def ask() -> Any:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES).model_dump()

    @app.get("/stream")
    def stream() -> Any:
        chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        return FlaskResponse(json.dumps(c.model_dump()) + "\n" for c in chunks)

    return app


APPS = {"starlette": starlette_app, "flask": flask_app}


def answers(framework: str, app: Any) -> list[tuple[int, str]]:
    """What a client of the web app gets for a plain and a streamed LLM answer, twice."""
    served = BackgroundServer(app) if framework == "starlette" else serve_wsgi(app)
    with served as server, httpx2.Client(timeout=10) as http:
        url = server if isinstance(server, str) else server.url
        return [
            (r.status_code, r.text)
            for r in (http.get(f"{url}{path}") for path in ("/ask", "/stream") * 2)
        ]


@pytest.mark.parametrize("framework", APPS)
def test_identify_and_properties_raising_leave_the_request_unchanged(
    request: pytest.FixtureRequest,
    framework: str,
    sync_client: openai.OpenAI,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(validation, "_warned", set())  # "logged once" counts from here
    bare = answers(framework, APPS[framework](sync_client))
    tally = Tally(db_url)
    request.addfinalizer(tally.close)
    app = APPS[framework](sync_client)
    tally.init_app(app, identify=explode, properties=explode)
    with caplog.at_level(logging.WARNING, logger="llm_tally"):
        assert answers(framework, app) == bare
    assert all(status == 200 for status, _ in bare)
    rows = stored_rows(tally)
    assert [(row["user_id"], row["properties"], row["status"]) for row in rows] == [
        (None, {}, "ok")
    ] * 4
    # The app's own failure: logged once per callable with its traceback, never raised.
    warned = [r for r in llm_tally_logs(caplog, logging.WARNING) if r.exc_info]
    sources = [r.args[0] for r in warned if isinstance(r.args, tuple)]
    assert (sources.count("identify"), sources.count("properties")) == (1, 1)
    assert not internal_error_counts


# Where each framework asks who the user is, when a call starts (a bug there is ours).
USER_RESOLVERS = {
    "starlette": (asgi_middleware, "user_from_starlette"),
    "flask": (flask_web, "user_from_flask_login"),
}


@pytest.mark.parametrize("framework", APPS)
def test_a_bug_in_the_user_resolver_leaves_the_request_unchanged(
    request: pytest.FixtureRequest,
    framework: str,
    sync_client: openai.OpenAI,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    quiet_internal_errors: None,
) -> None:
    bare = answers(framework, APPS[framework](sync_client))
    tally = Tally(db_url)
    request.addfinalizer(tally.close)
    app = APPS[framework](sync_client)
    tally.init_app(app)
    monkeypatch.setattr(*USER_RESOLVERS[framework], simulated_bug)
    with caplog.at_level(logging.WARNING, logger="llm_tally"):
        assert answers(framework, app) == bare
    # Every call is still recorded, charged to no one.
    rows = stored_rows(tally)
    assert [(row["user_id"], row["status"]) for row in rows] == [(None, "ok")] * 4
    assert set(internal_error_counts) == {"resolve user"}
    assert_each_kind_logged_once(caplog)

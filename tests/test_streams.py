"""Streams: observed as the caller reads them, usage injected and hidden, estimates, aborts."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

import llm_tally
from llm_tally import Tally
from llm_tally._tokens import count_prompt, count_text

from .conftest import FakeServer, only_row, stored_rows

MESSAGES = [{"role": "user", "content": "count to eight for me"}]


def sse_chat_body(words: list[str], usage: dict[str, int] | None, model: str) -> bytes:
    """An OpenAI chat stream as OpenAI sends it; usage chunk only if ``usage`` is given."""

    def chunk(choices: list[Any], with_usage: bool = False) -> str:
        data: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            data["usage"] = usage if with_usage else None
        return f"data: {json.dumps(data)}\n\n"

    parts = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    parts += [chunk([{"index": 0, "delta": {"content": w}}]) for w in words]
    parts.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if usage is not None:
        parts.append(chunk([], with_usage=True))
    parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


class RecordingTransport:
    """An in-memory OpenAI: answers chat streams, with usage only when the request asks for it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append({"body": body, "headers": dict(request.headers)})
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        content = sse_chat_body(
            ["Hi", " there", "!"], usage if wants_usage else None, "gpt-4o-2024-08-06"
        )
        return httpx2.Response(
            200,
            content=content,
            headers={"content-type": "text/event-stream", "x-request-id": "req_1"},
        )


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def openai_api_client(transport: RecordingTransport) -> Iterator[openai.OpenAI]:
    """A client of OpenAI's own API (api.openai.com), answered in memory."""
    c = openai.OpenAI(
        api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(transport))
    )
    yield c
    c.close()


def test_usage_is_injected_for_openai_and_the_extra_chunk_is_hidden(
    tally: Tally, openai_api_client: openai.OpenAI, transport: RecordingTransport
) -> None:
    with llm_tally.user("u1"):
        chunks = list(
            openai_api_client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
        )
    # The request asked for usage, but the caller's `chunk.choices[0]` code still works.
    assert transport.requests[0]["body"]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi there!"
    row = only_row(tally)
    assert (row["input_tokens"], row["output_tokens"]) == (11, 3)
    assert row["usage_source"] == "provider" and row["provider"] == "openai"


def test_injection_keeps_the_callers_other_stream_options(
    tally: Tally, openai_api_client: openai.OpenAI, transport: RecordingTransport
) -> None:
    options = {"include_obfuscation": False}
    with llm_tally.user("u1"):
        list(
            openai_api_client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                stream_options=options,  # type: ignore[arg-type]
            )
        )
    assert transport.requests[0]["body"]["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    assert options == {"include_obfuscation": False}  # the caller's dict is untouched


def test_injection_can_be_turned_off(
    db_url: str, openai_api_client: openai.OpenAI, transport: RecordingTransport
) -> None:
    with Tally(db_url, inject_stream_usage=False) as tally, llm_tally.user("u1"):
        chunks = list(
            openai_api_client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
        )
        assert "stream_options" not in transport.requests[0]["body"]
        row = only_row(tally)
    assert len(chunks) == 5
    assert row["usage_source"] == "estimated"


def test_stream_without_usage_is_estimated_with_tiktoken(
    db_url: str, openai_api_client: openai.OpenAI
) -> None:
    with Tally(db_url, inject_stream_usage=False) as tally, llm_tally.user("u1"):
        list(
            openai_api_client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True
            )
        )
        row = only_row(tally)
    assert row["usage_source"] == "estimated" and row["status"] == "ok"
    assert row["output_tokens"] == count_text("Hi there!", "gpt-4o") > 0
    assert (
        row["input_tokens"]
        == count_prompt(MESSAGES, "gpt-4o")
        > count_text(MESSAGES[0]["content"], "gpt-4o")
    )
    assert row["cost_nano_usd"] > 0


def test_no_injection_for_other_servers_by_default(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    with llm_tally.user("u1"):
        chunks = list(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        )
    assert all(c.usage is None for c in chunks)
    row = only_row(tally)
    assert row["usage_source"] == "estimated"
    assert row["output_tokens"] == count_text(
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), "gpt-4o-mini"
    )


def test_injection_forced_on_for_a_compatible_server(
    db_url: str, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    with Tally(db_url, inject_stream_usage=True) as tally, llm_tally.user("u1"):
        chunks = list(
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        )
        row = only_row(tally)
    assert all(c.choices for c in chunks)
    entry = fake_llm.ledger[-1]
    assert (row["input_tokens"], row["output_tokens"]) == (entry["input"], entry["output"])
    assert row["usage_source"] == "provider"


def test_stream_closed_early_by_the_caller_is_aborted(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user("u1"):
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, max_completion_tokens=50
        )
        seen = []
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
            if len(seen) == 4:
                break
        stream.close()
    row = only_row(tally)
    assert row["status"] == "aborted"
    assert row["usage_source"] == "estimated"
    assert row["output_tokens"] == count_text("".join(seen), "gpt-4o-mini")


def test_stream_abandoned_without_close_is_recorded_when_collected(
    tally: Tally, client: openai.OpenAI
) -> None:
    def read_a_little() -> None:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, max_completion_tokens=50
        )
        next(iter(stream))

    with llm_tally.user("u1"):
        read_a_little()
    gc.collect()
    row = only_row(tally)
    assert row["status"] == "aborted" and row["user_id"] == "u1"


def test_stream_never_read_is_recorded_when_collected(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user("u1"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    gc.collect()
    row = only_row(tally)
    assert row["status"] == "aborted" and row["output_tokens"] == 0


def test_open_streams_are_recorded_when_the_tally_closes(
    db_url: str, client: openai.OpenAI
) -> None:
    tally = Tally(db_url)
    with llm_tally.user("u1"):
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        next(iter(stream))
    tally.close()
    reopened = Tally(db_url)
    rows = stored_rows(reopened)
    reopened.close()
    assert [r["status"] for r in rows] == ["aborted"]
    stream.close()


async def test_cancelled_async_stream_is_aborted(tally: Tally, aclient: openai.AsyncOpenAI) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async with llm_tally.user("u1"):
            stream = await aclient.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-stall-after": "2"},
            )
            async for _ in stream:
                started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = only_row(tally)
    assert row["status"] == "aborted"
    assert row["error_type"] is None


def test_stream_fully_read_but_not_closed_is_ok(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user("u1"):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        for _ in stream:
            pass
    assert only_row(tally)["status"] == "ok"


def test_stream_broken_midway_is_an_error_with_tokens_seen(tally: Tally) -> None:
    whole = sse_chat_body(["one", " two", " three"], None, "gpt-4o-mini")
    cut = whole[: whole.index(b"three")]

    class Truncated(httpx2.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield cut
            raise httpx2.ReadError("connection reset")

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, stream=Truncated(), headers={"content-type": "text/event-stream"}
        )

    c = openai.OpenAI(
        api_key="k",
        base_url="http://fake/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with llm_tally.user("u1"), pytest.raises(openai.APIConnectionError):
        for _ in c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
            pass
    row = only_row(tally)
    assert row["status"] == "error" and row["error_type"] == "APIConnectionError"
    assert row["output_tokens"] == count_text("one two", "gpt-4o-mini")
    assert row["usage_source"] == "estimated"


def test_non_streamed_answer_without_usage_is_estimated_from_its_text(tally: Tally) -> None:
    answer = "Paris is the capital of France."

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200,
            json={
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
            },
        )

    c = openai.OpenAI(
        api_key="k",
        base_url="http://compatible/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with llm_tally.user("u1"):
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    row = only_row(tally)
    assert row["usage_source"] == "estimated" and row["status"] == "ok"
    assert row["output_tokens"] == count_text(answer, "gpt-4o-mini")
    assert row["input_tokens"] == count_prompt(MESSAGES, "gpt-4o-mini")

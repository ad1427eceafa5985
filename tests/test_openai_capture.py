"""Every way the OpenAI SDK can make a call is recorded once, with the provider's usage.

All tests drive the real SDK over loopback HTTP against the fake OpenAI-compatible server.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from pydantic import BaseModel

import llm_tally
from llm_tally import Tally

from .conftest import FakeServer, only_row, stored_rows

MESSAGES = [{"role": "user", "content": "say something nice to me"}]  # 5 words


def last_ledger(fake_llm: FakeServer) -> dict[str, Any]:
    return fake_llm.ledger[-1]


def assert_matches_ledger(row: dict[str, Any], entry: dict[str, Any]) -> None:
    assert row["input_tokens"] == entry["input"]
    assert row["output_tokens"] == entry["output"]
    assert row["cached_input_tokens"] == entry["cached"]
    assert row["reasoning_tokens"] == entry["reasoning"]
    assert row["usage_source"] == "provider"
    assert row["request_id"] == entry["request_id"]
    assert row["status"] == "ok"
    assert row["http_status"] == 200


def test_chat_create_is_recorded_for_the_bound_user(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    with llm_tally.user("user-123", plan="premium", feature="chat"):
        result = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=6
        )
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["input_tokens"] == 5 and row["output_tokens"] == 6
    assert row["user_id"] == "user-123"
    assert row["properties"] == {"plan": "premium", "feature": "chat"}
    assert row["operation"] == "chat"
    assert row["request_model"] == "gpt-4o-mini"
    assert row["response_model"] == result.model == "gpt-4o-mini-2024-07-18"
    assert row["provider"] == "openai-compatible"
    assert row["latency_us"] > 0 and row["ttft_us"] is None
    assert row["retries"] == 0


async def test_async_chat_create(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    async with llm_tally.user("async-user"):
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["user_id"] == "async-user"


def test_chat_stream_with_usage_requested_by_caller(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    with llm_tally.user("u1"):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    # The caller asked for the usage chunk, so it is not hidden.
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["ttft_us"] is not None and 0 < row["ttft_us"] <= row["latency_us"]


async def test_async_chat_stream(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    async with llm_tally.user("u1"):
        stream = await aclient.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(t or "" for t in texts).split()  # the caller got the text
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


class Answer(BaseModel):
    text: str


def test_chat_parse(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with llm_tally.user("u1"):
        completion = client.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.usage is not None
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_chat_stream_helper(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with (
        llm_tally.user("u1"),
        client.chat.completions.stream(
            model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
        ) as stream,
    ):
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.usage is not None
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["usage_source"] == "provider"


async def test_async_chat_stream_helper(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    async with (
        llm_tally.user("u1"),
        aclient.chat.completions.stream(
            model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
        ) as stream,
    ):
        async for _ in stream:
            pass
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_responses_create(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with llm_tally.user("u1"):
        response = client.responses.create(
            model="o4-mini", input="tell me a story please", max_output_tokens=10
        )
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["operation"] == "responses"
    assert row["reasoning_tokens"] == 5 == response.usage.output_tokens_details.reasoning_tokens  # type: ignore[union-attr]


def test_responses_stream(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with llm_tally.user("u1"):
        events = list(client.responses.create(model="gpt-4o-mini", input="a b c", stream=True))
    assert events[-1].type == "response.completed"
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["ttft_us"] is not None


async def test_async_responses_stream_helper(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    async with (
        llm_tally.user("u1"),
        aclient.responses.stream(model="gpt-4o-mini", input="a b c d") as stream,
    ):
        async for _ in stream:
            pass
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_embeddings(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with llm_tally.user("u1"):
        result = client.embeddings.create(
            model="text-embedding-3-small", input=["one two", "three four five"]
        )
    assert len(result.data) == 2
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["operation"] == "embeddings" and row["input_tokens"] == 5
    assert row["cost_nano_usd"] is not None and row["cost_nano_usd"] > 0


async def test_async_embeddings(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    async with llm_tally.user("u1"):
        await aclient.embeddings.create(model="text-embedding-3-small", input="one two")
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_legacy_completions(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with llm_tally.user("u1"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="one two three")
    row = only_row(tally)
    assert row["operation"] == "completions"
    assert row["input_tokens"] == 3 == last_ledger(fake_llm)["input"]


def test_with_raw_response(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with llm_tally.user("u1"):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        completion = raw.parse()
    assert completion.usage is not None
    row = only_row(tally)
    assert_matches_ledger(row, last_ledger(fake_llm))
    assert row["response_model"] == completion.model


def test_with_raw_response_stream(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    with llm_tally.user("u1"):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
    assert chunks[-1].usage is not None
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_with_streaming_response(tally: Tally, client: openai.OpenAI, fake_llm: FakeServer) -> None:
    with (
        llm_tally.user("u1"),
        client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        ) as response,
    ):
        completion = response.parse()
    assert completion.usage is not None
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_with_streaming_response_read_as_lines(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    # The caller reads the SSE wire itself: usage is found in the bytes that passed.
    with (
        llm_tally.user("u1"),
        client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ) as response,
    ):
        lines = list(response.iter_lines())
    assert lines[-1] == "data: [DONE]" or "[DONE]" in "".join(lines)
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


async def test_async_with_streaming_response_stream(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    async with (
        llm_tally.user("u1"),
        aclient.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ) as response,
    ):
        stream = await response.parse()
        async for _ in stream:
            pass
    assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_raw_response_bound_before_the_tally_exists(
    db_url: str, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    create = client.chat.completions.with_raw_response.create  # bound before instrumenting
    with Tally(db_url) as tally, llm_tally.user("u1"):
        create(model="gpt-4o-mini", messages=MESSAGES).parse()
        assert_matches_ledger(only_row(tally), last_ledger(fake_llm))


def test_clients_created_before_the_tally_and_with_options_copies(
    db_url: str, fake_llm: FakeServer
) -> None:
    early = openai.OpenAI(base_url=fake_llm.base_url, api_key="k", max_retries=0)
    with Tally(db_url) as tally, llm_tally.user("u1"):
        early.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        early.with_options(timeout=5).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        assert len(stored_rows(tally)) == 2


def test_azure_client(tally: Tally, fake_llm: FakeServer) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=fake_llm.url,
        api_key="k",
        api_version="2024-10-21",
        max_retries=0,
    )
    with llm_tally.user("u1"):
        result = azure.chat.completions.create(model="my-deployment", messages=MESSAGES)
    row = only_row(tally)
    assert row["provider"] == "azure"
    assert row["request_model"] == "my-deployment"
    assert row["response_model"] == result.model
    assert_matches_ledger(row, last_ledger(fake_llm))


def test_openai_compatible_base_url_and_model_of_another_provider(
    tally: Tally, client: openai.OpenAI
) -> None:
    with llm_tally.user("u1"):
        client.chat.completions.create(model="llama-3.3-70b-versatile", messages=MESSAGES)
    row = only_row(tally)
    assert row["provider"] == "openai-compatible"
    assert row["request_model"] == "llama-3.3-70b-versatile"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
def test_api_error_is_one_record_with_status_and_type(
    tally: Tally, client: openai.OpenAI, status: int, error: type[Exception]
) -> None:
    with llm_tally.user("u1"), pytest.raises(error):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-status": str(status)}
        )
    row = only_row(tally)
    assert row["status"] == "error"
    assert row["http_status"] == status
    assert row["error_type"] == error.__name__
    assert row["input_tokens"] == row["output_tokens"] == 0
    assert row["cost_nano_usd"] == 0 and row["cost_source"] == "not-billed"
    assert row["request_id"] is not None


def test_retries_are_counted_in_one_record(tally: Tally, fake_llm: FakeServer) -> None:
    retrying = openai.OpenAI(base_url=fake_llm.base_url, api_key="k", max_retries=2)
    with llm_tally.user("u1"), pytest.raises(openai.InternalServerError):
        retrying.with_options(timeout=5).chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers={"x-fake-status": "503", "retry-after-ms": "1"},
        )
    row = only_row(tally)
    assert row["retries"] == 2 and row["status"] == "error" and row["http_status"] == 503


def test_retry_then_success_counts_retries(tally: Tally) -> None:
    attempts: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx2.Response(500, json={"error": {"message": "try again"}})
        return httpx2.Response(
            200,
            json={
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            },
            headers={"x-request-id": "req_after_retry", "retry-after-ms": "1"},
        )

    c = openai.OpenAI(
        api_key="k",
        max_retries=3,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with llm_tally.user("u1"):
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    row = only_row(tally)
    assert row["retries"] == 1 and row["status"] == "ok"
    assert (row["input_tokens"], row["output_tokens"]) == (7, 2)
    assert row["request_id"] == "req_after_retry"
    assert row["provider"] == "openai"


def test_timeout_is_recorded(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user("u1"), pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-delay": "1.0"}
        )
    row = only_row(tally)
    assert row["status"] == "error" and row["error_type"] == "APITimeoutError"
    assert row["http_status"] is None


def test_connection_error_is_recorded(tally: Tally) -> None:
    dead = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0)
    with llm_tally.user("u1"), pytest.raises(openai.APIConnectionError):
        dead.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    row = only_row(tally)
    assert row["status"] == "error" and row["error_type"] == "APIConnectionError"


def test_calls_that_are_not_generations_are_not_recorded(
    tally: Tally, client: openai.OpenAI
) -> None:
    with llm_tally.user("u1"), pytest.raises(openai.NotFoundError):
        client.models.list()
    assert stored_rows(tally) == []


def test_prompts_and_completions_are_never_stored(tally: Tally, client: openai.OpenAI) -> None:
    secret = "my-very-secret-prompt-words"
    with llm_tally.user("u1"):
        result = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": secret}]
        )
        list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": secret}], stream=True
            )
        )
    tally.flush()
    path = tally.engine.url.database
    assert path is not None
    tally.close()
    data = b""
    for suffix in ("", "-wal", "-shm"):
        try:
            with open(path + suffix, "rb") as f:
                data += f.read()
        except FileNotFoundError:
            pass
    assert secret.encode() not in data
    answer = result.choices[0].message.content
    assert answer and answer.encode() not in data


@pytest.mark.parametrize(
    "wire",
    [
        {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
        },
        {
            "prompt_tokens": 50,
            "completion_tokens": 5,
            "total_tokens": 55,
            "prompt_tokens_details": {"cached_tokens": None},
            "completion_tokens_details": None,
        },
        # An OpenAI-compatible provider's extra fields take the general reader.
        {
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "total_tokens": 110,
            "prompt_tokens_details": {"cached_tokens": 20, "cache_write_tokens": 30},
        },
        {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "cost": 0.001},
    ],
)
def test_the_sdk_usage_object_reads_like_its_wire_form(wire: dict[str, Any]) -> None:
    """usage_counts has a fast path for the SDK's CompletionUsage (it runs on the caller's
    path); it must read exactly what the general reader reads from the same JSON."""
    from openai.types import CompletionUsage

    from llm_tally.integrations.openai_usage import usage_counts

    counts = usage_counts(CompletionUsage.model_validate(wire))
    assert counts is not None and counts == usage_counts(wire)

"""Usage read from real recorded OpenAI exchanges (VCR cassettes), checked against the bodies.

Every cassette in ``shared/fixtures/openai-cassettes`` is replayed through the real OpenAI
SDK over an ``httpx2.MockTransport`` that returns the recorded status, headers and body.
Each interaction is one SDK call made from the recorded request body; the stored row is
compared with what the recorded response body says, parsed here independently of
llm-tally's own usage parser, and priced with genai-prices directly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import genai_prices
import httpx2
import openai
import pytest
import yaml

import llm_tally
from llm_tally import Tally

from .conftest import stored_rows

CASSETTE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openai-cassettes"
CASSETTES = sorted(CASSETTE_DIR.glob("*.yaml"))
ASYNC_PREFIX = "test_async_"
BASE_URL = "https://api.openai.com/v1"
USER = "cassette-user"
NANO_PER_USD = 10**9
# Hop-by-hop / encoding headers describe the recorded transfer, not the replayed body.
DROPPED_HEADERS = {"content-length", "content-encoding", "transfer-encoding"}
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# How the caller reaches the SDK: a parsed result (and its stream), the raw response parsed
# by the caller, or the undecoded body (llm-tally then reads usage from the bytes itself).
STYLES = ("create", "with_raw_response", "with_streaming_response")


def _params(*, is_async: bool) -> list[Any]:
    return [
        pytest.param(path, style, id=f"{path.stem}-{style}")
        for path in CASSETTES
        if path.name.startswith(ASYNC_PREFIX) == is_async
        for style in STYLES
    ]


# -- the recorded exchanges ------------------------------------------------------------------


@dataclass(frozen=True)
class Interaction:
    method: str
    uri: str
    request_body: dict[str, Any]
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def operation(self) -> str:
        return OPERATIONS[httpx2.URL(self.uri).path]

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name]
        return values[0] if values else None

    @property
    def is_stream(self) -> bool:
        return self.request_body.get("stream") is True

    @property
    def is_sse(self) -> bool:
        return (self.header("content-type") or "").startswith("text/event-stream")

    @functools.cached_property
    def payloads(self) -> list[dict[str, Any]]:
        """The JSON ``data:`` payloads of an SSE body (``[DONE]`` left out)."""
        found = []
        for line in self.body.decode("utf-8").splitlines():
            if line.startswith("data:"):
                data = line[len("data:") :].strip()
                if data != "[DONE]":
                    found.append(json.loads(data))
        return found


@functools.cache
def load_cassette(path: Path) -> tuple[Interaction, ...]:
    with path.open(encoding="utf-8") as f:
        cassette = yaml.load(f, Loader=_Loader)
    interactions = []
    for entry in cassette["interactions"]:
        request, response = entry["request"], entry["response"]
        headers: list[tuple[str, str]] = []
        for key, value in response["headers"].items():
            if key.lower() in DROPPED_HEADERS:
                continue
            for item in value if isinstance(value, list) else [value]:
                headers.append((key, str(item)))
        interactions.append(
            Interaction(
                method=request["method"],
                uri=request["uri"],
                request_body=json.loads(request["body"]),
                status=response["status"]["code"],
                headers=headers,
                body=response["body"]["string"].encode("utf-8"),
            )
        )
    return tuple(interactions)


# -- replaying them through the real SDK ----------------------------------------------------


class WireBody(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A recorded body delivered in small pieces, as a socket would (events split mid-line).

    ``httpx2.Response(content=...)`` would hand the SDK a body already read and closed,
    which no real stream is; this one is read while the caller consumes it.
    """

    CHUNK = 97  # odd-sized, so chunk edges fall anywhere in SSE events and JSON values

    def __init__(self, body: bytes) -> None:
        self._body = body

    def _chunks(self) -> Iterator[bytes]:
        for start in range(0, len(self._body), self.CHUNK):
            yield self._body[start : start + self.CHUNK]

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks():
            yield chunk


class Replay:
    """A MockTransport handler: answers the n-th request with the n-th recorded response."""

    def __init__(self, interactions: tuple[Interaction, ...]) -> None:
        self._pending = list(interactions)
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if not self._pending:
            # Seen by the test below as a request count mismatch.
            return httpx2.Response(599, json={"error": {"message": "no recorded interaction"}})
        recorded = self._pending.pop(0)
        return httpx2.Response(
            recorded.status, headers=recorded.headers, stream=WireBody(recorded.body)
        )

    async def handle_async(self, request: httpx2.Request) -> httpx2.Response:
        return self(request)


@dataclass
class Outcome:
    """What the caller got from one SDK call: a parsed result, its chunks, or an error."""

    result: Any = None
    chunks: list[Any] | None = None
    raw_body: bytes | None = None
    error: openai.APIStatusError | None = None

    def dump(self) -> Any:
        if self.error is not None:
            return (type(self.error), self.error.status_code, self.error.body)
        if self.raw_body is not None:
            return self.raw_body
        if self.chunks is not None:
            return [chunk.model_dump(warnings=False) for chunk in self.chunks]
        return self.result.model_dump(warnings=False)


def _create(client: Any, interaction: Interaction, style: str) -> Any:
    resource = {
        "chat": client.chat.completions,
        "embeddings": client.embeddings,
        "responses": client.responses,
    }[interaction.operation]
    if style != "create":
        resource = getattr(resource, style)
    return resource.create(**interaction.request_body)


def _uses_context_manager(path: Path) -> bool:
    # The recording was made by a test that closed its stream with ``with``: do the same.
    return "context_manager" in path.name


def replay_sync(
    path: Path, interactions: tuple[Interaction, ...], style: str
) -> tuple[list[Outcome], Replay]:
    replay = Replay(interactions)
    outcomes = []
    with (
        httpx2.Client(transport=httpx2.MockTransport(replay)) as http,
        openai.OpenAI(base_url=BASE_URL, api_key="test", max_retries=0, http_client=http) as client,
    ):
        for interaction in interactions:
            try:
                if style == "with_streaming_response":
                    # Consumed as bytes, never buffered whole by httpx2: llm-tally has only
                    # what its tap on the byte stream kept.
                    with _create(client, interaction, style) as response:
                        body = b"".join(response.iter_bytes())
                    outcomes.append(Outcome(raw_body=body))
                    continue
                result = _create(client, interaction, style)
            except openai.APIStatusError as exc:
                outcomes.append(Outcome(error=exc))
                continue
            if style == "with_raw_response":
                result = result.parse()
            if not interaction.is_stream:
                outcomes.append(Outcome(result=result))
            elif _uses_context_manager(path):
                with result as stream:
                    outcomes.append(Outcome(chunks=list(stream)))
            else:
                outcomes.append(Outcome(chunks=list(result)))
    return outcomes, replay


async def replay_async(
    path: Path, interactions: tuple[Interaction, ...], style: str
) -> tuple[list[Outcome], Replay]:
    replay = Replay(interactions)
    outcomes = []
    async with (
        httpx2.AsyncClient(transport=httpx2.MockTransport(replay.handle_async)) as http,
        openai.AsyncOpenAI(
            base_url=BASE_URL, api_key="test", max_retries=0, http_client=http
        ) as client,
    ):
        for interaction in interactions:
            try:
                if style == "with_streaming_response":
                    async with _create(client, interaction, style) as response:
                        body = b"".join([chunk async for chunk in response.iter_bytes()])
                    outcomes.append(Outcome(raw_body=body))
                    continue
                result = await _create(client, interaction, style)
            except openai.APIStatusError as exc:
                outcomes.append(Outcome(error=exc))
                continue
            if style == "with_raw_response":
                result = result.parse()
            if not interaction.is_stream:
                outcomes.append(Outcome(result=result))
            elif _uses_context_manager(path):
                async with result as stream:
                    outcomes.append(Outcome(chunks=[chunk async for chunk in stream]))
            else:
                outcomes.append(Outcome(chunks=[chunk async for chunk in result]))
    return outcomes, replay


# -- what the recorded body says (our own reading, not llm-tally's) -------------------------


@dataclass(frozen=True)
class Expected:
    usage: dict[str, Any] | None
    model: str | None
    finished: bool  # the response/stream ended normally
    streamed_text: str  # output text (and tool-call arguments) carried by a stream


def expected_from_body(interaction: Interaction) -> Expected:
    if not interaction.is_sse:
        payload = json.loads(interaction.body)
        return Expected(payload.get("usage"), payload.get("model"), True, "")
    events = interaction.payloads
    if interaction.operation == "responses":
        text = "".join(
            event["delta"]
            for event in events
            if event.get("type")
            in ("response.output_text.delta", "response.function_call_arguments.delta")
        )
        done = [e["response"] for e in events if e.get("type") == "response.completed"]
        models = [e["response"]["model"] for e in events if isinstance(e.get("response"), dict)]
        if done:
            return Expected(done[-1]["usage"], done[-1]["model"], True, text)
        return Expected(None, models[-1] if models else None, False, text)
    parts: list[str] = []
    finished = False
    usage = None
    for chunk in events:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                parts.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                arguments = (call.get("function") or {}).get("arguments")
                if arguments:
                    parts.append(arguments)
            finished = finished or bool(choice.get("finish_reason"))
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
    models = [chunk["model"] for chunk in events if chunk.get("model")]
    return Expected(usage, models[-1] if models else None, finished, "".join(parts))


def tokens_from_usage(operation: str, usage: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage object in llm-tally's columns (input includes cached tokens)."""
    if operation == "responses":
        input_details = usage.get("input_tokens_details") or {}
        output_details = usage.get("output_tokens_details") or {}
        return {
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "cached_input_tokens": input_details.get("cached_tokens") or 0,
            "reasoning_tokens": output_details.get("reasoning_tokens") or 0,
        }
    input_details = usage.get("prompt_tokens_details") or {}
    output_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": usage["prompt_tokens"],
        # Embeddings report no completion tokens at all.
        "output_tokens": usage.get("completion_tokens") or 0,
        "cached_input_tokens": input_details.get("cached_tokens") or 0,
        "reasoning_tokens": output_details.get("reasoning_tokens") or 0,
    }


def genai_cost(model: str, input_tokens: int, output_tokens: int, cached: int) -> int | None:
    """Exact nano-USD from genai-prices, or None when it does not know the model."""
    usage = genai_prices.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached
    )
    try:
        price = genai_prices.calc_price(usage, model_ref=model, provider_id="openai")
    except LookupError:
        return None
    nano = Decimal(price.total_price) * NANO_PER_USD
    return int(nano.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def assert_cost(row: dict[str, Any], model: str) -> None:
    expected = genai_cost(
        model, row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]
    )
    if expected is None:
        assert row["cost_nano_usd"] is None
        assert row["cost_source"] == "unknown"
    else:
        assert row["cost_nano_usd"] == expected
        assert row["cost_source"] == "genai-prices"


# -- the checks ------------------------------------------------------------------------------


def check_requests(interactions: tuple[Interaction, ...], replay: Replay) -> None:
    """One HTTP request per interaction, sent unmodified (stream usage injection is off)."""
    assert len(replay.requests) == len(interactions)
    for request, interaction in zip(replay.requests, interactions, strict=True):
        assert request.method == interaction.method
        assert str(request.url) == interaction.uri
        sent = json.loads(request.content)
        expected = dict(interaction.request_body)
        if interaction.operation == "embeddings" and "encoding_format" not in expected:
            # The SDK itself asks for base64 when the caller names no format.
            expected["encoding_format"] = "base64"
        assert sent == expected


def check_outcome(interaction: Interaction, outcome: Outcome) -> None:
    """The SDK behaved as the recording says: parsed result, full stream, or status error."""
    if interaction.status >= 400:
        assert outcome.error is not None, "a recorded error must raise APIStatusError"
        assert outcome.error.status_code == interaction.status
        assert type(outcome.error) is not openai.APIStatusError  # the status' own subclass
        return
    assert outcome.error is None
    assert interaction.status == 200
    if outcome.raw_body is not None:
        assert outcome.raw_body == interaction.body
    elif interaction.is_stream:
        assert interaction.is_sse
        assert outcome.chunks is not None
        assert len(outcome.chunks) == len(interaction.payloads)
    else:
        assert outcome.result is not None
        if interaction.operation == "embeddings":
            # Float lists come back as sent, even when the SDK itself asked for base64.
            recorded = [item["embedding"] for item in json.loads(interaction.body)["data"]]
            assert [item.embedding for item in outcome.result.data] == recorded


def check_row(interaction: Interaction, outcome: Outcome, row: dict[str, Any]) -> None:
    body = interaction.request_body
    assert row["provider"] == "openai"
    assert row["user_id"] == USER
    assert row["operation"] == interaction.operation
    assert row["request_model"] == body["model"]
    assert row["request_id"] == interaction.header("x-request-id")
    assert row["retries"] == 0
    assert row["cache_write_tokens"] == 0

    if interaction.status >= 400:
        assert outcome.error is not None
        assert row["status"] == "error"
        assert row["http_status"] == interaction.status
        assert row["error_type"] == type(outcome.error).__name__
        assert row["input_tokens"] == 0
        assert row["output_tokens"] == 0
        assert row["cost_nano_usd"] == 0
        assert row["cost_source"] == "not-billed"
        return

    expected = expected_from_body(interaction)
    assert expected.model is not None
    assert row["http_status"] == 200
    assert row["error_type"] is None

    if expected.usage is not None:
        tokens = tokens_from_usage(interaction.operation, expected.usage)
        assert {key: row[key] for key in tokens} == tokens
        assert row["usage_source"] == "provider"
        assert row["status"] == "ok"
        assert_cost(row, expected.model)
        assert row["response_model"] == expected.model
        return

    # A stream without any usage: llm-tally counts the tokens itself.
    assert interaction.is_stream
    assert row["usage_source"] == "estimated"
    assert expected.finished, "a recorded stream that never finished: decide its status first"
    assert row["status"] == "ok"
    assert row["input_tokens"] > 0
    assert row["cached_input_tokens"] == 0
    assert row["reasoning_tokens"] == 0
    if expected.streamed_text:
        assert row["output_tokens"] > 0
        # Every token is at least one byte of the text it encodes.
        assert row["output_tokens"] <= len(expected.streamed_text.encode("utf-8"))
    else:
        assert row["output_tokens"] == 0
    assert_cost(row, expected.model)
    assert row["response_model"] == expected.model


def check_replay(
    interactions: tuple[Interaction, ...], outcomes: list[Outcome], replay: Replay, tally: Tally
) -> None:
    check_requests(interactions, replay)
    assert len(outcomes) == len(interactions)
    for interaction, outcome in zip(interactions, outcomes, strict=True):
        check_outcome(interaction, outcome)
    rows = stored_rows(tally)
    assert len(rows) == len(interactions), rows
    for interaction, outcome, row in zip(interactions, outcomes, rows, strict=True):
        check_row(interaction, outcome, row)


@pytest.fixture
def cassette_tally(db_url: str) -> Iterator[Tally]:
    tally = Tally(db_url, inject_stream_usage=False)
    yield tally
    tally.close()


# -- the tests -------------------------------------------------------------------------------


def test_the_cassettes_cover_every_wire_shape() -> None:
    """Guard: the fixtures are where CI expects them and hold each shape the tests rely on."""
    assert CASSETTES, f"no cassettes found in {CASSETTE_DIR}"
    interactions = [i for path in CASSETTES for i in load_cassette(path)]
    ok = [i for i in interactions if i.status < 400]
    assert {i.operation for i in ok} == set(OPERATIONS.values())
    assert {i.operation for i in ok if i.is_sse} == {"chat", "responses"}
    assert any(i.status >= 400 for i in interactions)
    assert any(i.is_sse and expected_from_body(i).usage is None for i in ok)
    assert any(path.name.startswith(ASYNC_PREFIX) for path in CASSETTES)
    reported = [expected_from_body(i).usage or {} for i in ok]
    assert any((u.get("output_tokens_details") or {}).get("reasoning_tokens") for u in reported), (
        "no cassette reports reasoning tokens"
    )


@pytest.mark.parametrize(("path", "style"), _params(is_async=False))
def test_sync_cassette_usage_matches_the_recorded_body(
    path: Path, style: str, cassette_tally: Tally
) -> None:
    interactions = load_cassette(path)
    with llm_tally.user(USER):
        outcomes, replay = replay_sync(path, interactions, style)
    check_replay(interactions, outcomes, replay, cassette_tally)


@pytest.mark.parametrize(("path", "style"), _params(is_async=True))
async def test_async_cassette_usage_matches_the_recorded_body(
    path: Path, style: str, cassette_tally: Tally
) -> None:
    interactions = load_cassette(path)
    with llm_tally.user(USER):
        outcomes, replay = await replay_async(path, interactions, style)
    check_replay(interactions, outcomes, replay, cassette_tally)


def _dumps(outcomes: list[Outcome]) -> list[Any]:
    return [outcome.dump() for outcome in outcomes]


@pytest.mark.parametrize(("path", "style"), _params(is_async=False))
def test_sync_results_are_unchanged_by_instrumentation(path: Path, style: str, db_url: str) -> None:
    interactions = load_cassette(path)
    # A Tally with default settings (inject_stream_usage="auto", as users run it).
    with Tally(db_url) as tally, llm_tally.user(USER):
        observed, _ = replay_sync(path, interactions, style)
        assert len(stored_rows(tally)) == len(interactions)
    # No Tally open: the SDK is not instrumented, so this is what the caller gets without us.
    assert not llm_tally.is_openai_instrumented()
    baseline, _ = replay_sync(path, interactions, style)
    assert _dumps(observed) == _dumps(baseline)


@pytest.mark.parametrize(("path", "style"), _params(is_async=True))
async def test_async_results_are_unchanged_by_instrumentation(
    path: Path, style: str, db_url: str
) -> None:
    interactions = load_cassette(path)
    with Tally(db_url) as tally, llm_tally.user(USER):
        observed, _ = await replay_async(path, interactions, style)
        assert len(stored_rows(tally)) == len(interactions)
    assert not llm_tally.is_openai_instrumented()
    baseline, _ = await replay_async(path, interactions, style)
    assert _dumps(observed) == _dumps(baseline)


# -- estimates against the provider's own count -------------------------------------------


def _usageless_streams() -> list[Any]:
    return [
        pytest.param(path, id=path.stem)
        for path in CASSETTES
        if any(
            i.status < 400 and i.is_sse and expected_from_body(i).usage is None
            for i in load_cassette(path)
        )
    ]


def provider_prompt_tokens(interaction: Interaction) -> int | None:
    """``prompt_tokens`` OpenAI reported for a recorded chat request with the same prompt."""
    body = interaction.request_body
    for path in CASSETTES:
        for twin in load_cassette(path):
            twin_body = twin.request_body
            if (
                twin.operation == "chat"
                and twin.status == 200
                and twin_body.get("model") == body["model"]
                and twin_body.get("messages") == body["messages"]
                and not twin_body.get("tools")
                and not body.get("tools")
            ):
                usage = expected_from_body(twin).usage
                if usage is not None:
                    return int(usage["prompt_tokens"])
    return None


@pytest.mark.parametrize("path", _usageless_streams())
async def test_estimated_prompt_tokens_match_the_providers_count(
    path: Path, cassette_tally: Tally
) -> None:
    interactions = load_cassette(path)
    twins = [provider_prompt_tokens(interaction) for interaction in interactions]
    assert all(twin is not None for twin in twins), "no recorded twin with provider usage"
    with llm_tally.user(USER):
        if path.name.startswith(ASYNC_PREFIX):
            await replay_async(path, interactions, "create")
        else:
            replay_sync(path, interactions, "create")
    rows = stored_rows(cassette_tally)
    assert len(rows) == len(interactions)
    for row, twin in zip(rows, twins, strict=True):
        # The same messages and model were recorded once more, with OpenAI's own count: for a
        # plain prompt the cookbook formula (3 per message + role + content, 3 for the reply)
        # is exact, so the estimate must be too.
        assert row["usage_source"] == "estimated"
        assert row["input_tokens"] == twin

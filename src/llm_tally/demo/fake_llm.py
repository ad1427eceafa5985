"""A fake OpenAI-compatible API (chat, Responses, embeddings, legacy completions).

It serves the demo and the test suite: real HTTP, real SSE, deterministic usage,
and no network. Usage it reports for a request:

- input tokens: the number of whitespace-separated words in the prompt text;
- output tokens: ``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens`` if
  given, else 8 (the reply is that many words);
- cached input tokens: ``min(prompt_cache_hit, input tokens)`` where ``prompt_cache_hit``
  is read from the request's ``metadata`` (a test hook), else 0;
- reasoning tokens: half the output tokens for o-series models (``o1``, ``o3``, ``o4-mini``...).

Test hooks (request headers): ``x-fake-status: 429`` answers with that error status,
``x-fake-delay: 0.5`` waits before answering, ``x-fake-no-usage: 1`` leaves usage out of
streams even when asked for it, ``x-fake-stall-after: 3`` stops a stream after that many
chunks and never finishes it. Every usage reported is appended to ``ledger`` with the
``x-test-label`` header of the request, so tests can compare totals with what the provider said.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
DEFAULT_OUTPUT_TOKENS = 8


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        out: list[str] = []
        for key in ("content", "text", "input", "instructions"):
            if key in value:
                out.extend(_texts(value[key]))
        return out
    if isinstance(value, list):
        return [text for item in value for text in _texts(item)]
    return []


def count_words(value: Any) -> int:
    return sum(len(text.split()) for text in _texts(value))


class FakeLLM:
    """The fake provider and its ledger of reported usage (thread-safe)."""

    def __init__(self) -> None:
        self.ledger: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                # Azure's URL shape: /openai/deployments/{deployment}/chat/completions
                Route(
                    "/openai/deployments/{deployment}/chat/completions",
                    self.chat,
                    methods=["POST"],
                ),
            ]
        )

    # -- helpers -----------------------------------------------------------------------------

    def _usage(self, body: dict[str, Any], prompt: Any) -> dict[str, int]:
        model = str(body.get("model", ""))
        output = DEFAULT_OUTPUT_TOKENS
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            if isinstance(body.get(key), int):
                output = body[key]
                break
        prompt_tokens = count_words(prompt)
        metadata = body.get("metadata") or {}
        cached = min(int(metadata.get("prompt_cache_hit", 0)), prompt_tokens)
        reasoning = output // 2 if model[:2] in ("o1", "o3", "o4") else 0
        return {"input": prompt_tokens, "output": output, "cached": cached, "reasoning": reasoning}

    def _log(self, request: Request, request_id: str, model: str, usage: dict[str, int]) -> None:
        with self._lock:
            self.ledger.append(
                {
                    "request_id": request_id,
                    "label": request.headers.get("x-test-label"),
                    "model": model,
                    **usage,
                }
            )

    def _request_id(self) -> str:
        return f"req_fake_{next(self._ids):08d}"

    async def _preamble(self, request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        delay = float(request.headers.get("x-fake-delay", "0") or 0)
        if delay:
            await asyncio.sleep(delay)
        status = int(request.headers.get("x-fake-status", "0") or 0)
        if status:
            kind = {
                400: "invalid_request_error",
                401: "authentication_error",
                429: "rate_limit_exceeded",
            }.get(status, "server_error")
            return None, JSONResponse(
                {"error": {"message": f"fake error {status}", "type": kind, "code": kind}},
                status_code=status,
                headers={"x-request-id": self._request_id()},
            )
        try:
            body = await request.json()
        except ValueError:
            return None, JSONResponse({"error": {"message": "invalid JSON"}}, status_code=400)
        return body, None

    @staticmethod
    def _reply_words(n: int) -> list[str]:
        return [WORDS[i % len(WORDS)] for i in range(n)]

    # -- chat --------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body, error = await self._preamble(request)
        if error is not None or body is None:
            return error or Response(status_code=500)
        request_id = self._request_id()
        model = str(body.get("model", "gpt-4o-mini"))
        response_model = f"{model}-2024-07-18" if model == "gpt-4o-mini" else model
        u = self._usage(body, body.get("messages"))
        usage = {
            "prompt_tokens": u["input"],
            "completion_tokens": u["output"],
            "total_tokens": u["input"] + u["output"],
            "prompt_tokens_details": {"cached_tokens": u["cached"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u["reasoning"], "audio_tokens": 0},
        }
        words = self._reply_words(u["output"])
        created = int(time.time())
        headers = {"x-request-id": request_id}
        if not body.get("stream"):
            self._log(request, request_id, response_model, u)
            return JSONResponse(
                {
                    "id": f"chatcmpl-{request_id}",
                    "object": "chat.completion",
                    "created": created,
                    "model": response_model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
                headers=headers,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        include_usage = include_usage and not request.headers.get("x-fake-no-usage")
        stall_after = int(request.headers.get("x-fake-stall-after", "0") or 0)
        self._log(request, request_id, response_model, u)

        def chunk(choices: list[Any], with_usage: bool = False) -> str:
            data: dict[str, Any] = {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": response_model,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage if with_usage else None
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            for i, word in enumerate(words):
                if stall_after and i >= stall_after:
                    await asyncio.sleep(3600)
                text = word if i == 0 else f" {word}"
                yield chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            if include_usage:
                yield chunk([], with_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # -- legacy completions --------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body, error = await self._preamble(request)
        if error is not None or body is None:
            return error or Response(status_code=500)
        request_id = self._request_id()
        model = str(body.get("model", "gpt-3.5-turbo-instruct"))
        u = self._usage(body, body.get("prompt"))
        self._log(request, request_id, model, u)
        return JSONResponse(
            {
                "id": f"cmpl-{request_id}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": " ".join(self._reply_words(u["output"])),
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": u["input"],
                    "completion_tokens": u["output"],
                    "total_tokens": u["input"] + u["output"],
                },
            },
            headers={"x-request-id": request_id},
        )

    # -- responses -----------------------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        body, error = await self._preamble(request)
        if error is not None or body is None:
            return error or Response(status_code=500)
        request_id = self._request_id()
        model = str(body.get("model", "gpt-4o-mini"))
        u = self._usage(body, [body.get("instructions"), body.get("input")])
        words = self._reply_words(u["output"])
        text = " ".join(words)
        self._log(request, request_id, model, u)
        created = int(time.time())
        response: dict[str, Any] = {
            "id": f"resp_{request_id}",
            "object": "response",
            "created_at": created,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{request_id}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": u["input"],
                "input_tokens_details": {"cached_tokens": u["cached"]},
                "output_tokens": u["output"],
                "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                "total_tokens": u["input"] + u["output"],
            },
        }
        headers = {"x-request-id": request_id}
        if not body.get("stream"):
            return JSONResponse(response, headers=headers)

        numbers = itertools.count()

        def event(data: dict[str, Any]) -> str:
            data = {**data, "sequence_number": next(numbers)}
            return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            item_id = f"msg_{request_id}"
            started = {**response, "status": "in_progress", "output": [], "usage": None}
            empty_item = {**response["output"][0], "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
            where = {"item_id": item_id, "output_index": 0, "content_index": 0}
            yield event({"type": "response.created", "response": started})
            yield event(
                {"type": "response.output_item.added", "output_index": 0, "item": empty_item}
            )
            yield event({"type": "response.content_part.added", **where, "part": part})
            for i, word in enumerate(words):
                delta = word if i == 0 else f" {word}"
                yield event(
                    {"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []}
                )
            yield event(
                {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
            )
            yield event(
                {"type": "response.content_part.done", **where, "part": {**part, "text": text}}
            )
            yield event(
                {
                    "type": "response.output_item.done",
                    "output_index": 0,
                    "item": response["output"][0],
                }
            )
            yield event({"type": "response.completed", "response": response})

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # -- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        body, error = await self._preamble(request)
        if error is not None or body is None:
            return error or Response(status_code=500)
        request_id = self._request_id()
        model = str(body.get("model", "text-embedding-3-small"))
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        u = self._usage({**body, "max_completion_tokens": 0}, inputs)

        def vector(i: int) -> Any:
            values = [0.125 * (i + 1)] * 8
            if body.get("encoding_format") == "base64":
                return base64.b64encode(struct.pack("<8f", *values)).decode()
            return values

        self._log(request, request_id, model, u)
        return JSONResponse(
            {
                "object": "list",
                "model": model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": vector(i)}
                    for i in range(len(items))
                ],
                "usage": {"prompt_tokens": u["input"], "total_tokens": u["input"]},
            },
            headers={"x-request-id": request_id},
        )

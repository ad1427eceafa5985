"""Reading OpenAI usage from SDK objects, JSON bodies and SSE streams (all wire shapes)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from openai.types import CompletionUsage

from .._record import token_counts

_USAGE_KEY = b'"usage"'
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]{1,256})"')


def _get(obj: Any, name: str) -> Any:
    """``obj[name]`` or ``obj.name``, or None. Fast on SDK (pydantic) models: asking one for a
    field it lacks goes through pydantic's ``__getattr__`` and costs ~1.5 µs; dicts do not."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    fields = getattr(obj, "__dict__", None)
    if fields is None:
        return getattr(obj, name, None)
    value = fields.get(name)
    if value is None:
        extra = getattr(obj, "__pydantic_extra__", None)
        if extra:
            value = extra.get(name)
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(slots=True)
class Usage:
    """Token counts as llm-tally stores them (OpenAI's convention: input includes cached)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


def read_usage(usage: Any) -> Usage | None:
    """Chat/Completions (``prompt_tokens``), Responses (``input_tokens``) or embeddings usage."""
    if usage is None:
        return None
    prompt = _get(usage, "prompt_tokens")
    if prompt is None:
        prompt = _get(usage, "input_tokens")
    output = _get(usage, "completion_tokens")
    if output is None:
        output = _get(usage, "output_tokens")
    if prompt is None and output is None:
        return None
    input_details = _get(usage, "prompt_tokens_details") or _get(usage, "input_tokens_details")
    output_details = _get(usage, "completion_tokens_details") or _get(
        usage, "output_tokens_details"
    )
    # Not sent by OpenAI itself; some OpenAI-compatible providers report cache writes so.
    cache_write = _get(input_details, "cache_write_tokens") or _get(
        input_details, "cache_creation_tokens"
    )
    return Usage(
        input_tokens=_int(prompt),
        output_tokens=_int(output),
        cached_input_tokens=_int(_get(input_details, "cached_tokens")),
        cache_write_tokens=_int(cache_write),
        reasoning_tokens=_int(_get(output_details, "reasoning_tokens")),
    )


Counts = tuple[int, int, int, int, int]


def usage_counts(usage: Any) -> Counts | None:
    """``(input, output, cached input, cache write, reasoning)`` tokens of an SDK usage
    object, or None. It runs on the caller's path (the crash journal): the SDK's chat usage
    as OpenAI sends it is read directly, anything else by :func:`read_usage`."""
    if type(usage) is CompletionUsage and not usage.__pydantic_extra__:
        prompt = usage.prompt_tokens_details
        if prompt is None or not prompt.__pydantic_extra__:
            cached: int = 0
            cache_write: int | None = 0
            if prompt is not None:
                fields = prompt.__dict__
                cached = fields.get("cached_tokens") or 0
                # Not sent by OpenAI; some SDK versions declare it for compatible providers.
                cache_write = fields.get("cache_write_tokens") or fields.get(
                    "cache_creation_tokens"
                )
            completion = usage.completion_tokens_details
            reasoning = (completion.reasoning_tokens or 0) if completion is not None else 0
            counts = (
                usage.prompt_tokens,
                usage.completion_tokens,
                cached,
                cache_write or 0,
                reasoning,
            )
            if min(counts) >= 0:
                return counts
    found = usage if isinstance(usage, Usage) else read_usage(usage)
    if found is None:
        return None
    found_counts: Counts = token_counts(found)
    return found_counts


@dataclass(slots=True)
class BodyUsage:
    """What a raw response body says: usage (if any), model, and streamed output text."""

    usage: Usage | None = None
    model: str | None = None
    output_parts: list[str] = field(default_factory=list)
    complete: bool = False


# The events that end a Responses API stream.
RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _observe_payload(found: BodyUsage, data: Any) -> None:
    if not isinstance(data, dict):
        return
    kind = data.get("type")
    response = data.get("response")
    if isinstance(response, dict) and isinstance(kind, str) and kind.startswith("response."):
        # Responses API events: usage and model live on the embedded response.
        found.model = response.get("model") or found.model
        usage = read_usage(response.get("usage"))
        if usage is not None:
            found.usage = usage
        found.complete = found.complete or usage is not None or kind in RESPONSES_TERMINAL
        return
    if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
        found.output_parts.append(data["delta"])
        return
    if isinstance(data.get("model"), str):
        found.model = data["model"]
    usage = read_usage(data.get("usage"))
    if usage is not None:
        found.usage = usage
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        message = choice.get("message")
        if isinstance(delta, dict):
            text = delta.get("content")
        elif isinstance(message, dict):
            text = message.get("content")  # a whole chat completion
        else:
            text = choice.get("text")  # legacy completions
        if isinstance(text, str):
            found.output_parts.append(text)
        if choice.get("finish_reason"):
            found.complete = True
    if data.get("object") == "response":  # a whole Responses API response
        for item in data.get("output") or ():
            for part in (item.get("content") or ()) if isinstance(item, dict) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    found.output_parts.append(part["text"])


def read_body(body: bytes) -> BodyUsage:
    """Usage from a whole JSON body, an SSE stream, or (last resort) the tail of either."""
    found = BodyUsage()
    stripped = body.lstrip()
    if stripped.startswith(b"{"):
        try:
            _observe_payload(found, json.loads(stripped))
            found.complete = True  # a JSON body that parses was received whole
            return found
        except ValueError:
            pass
    if b"data:" in body:
        for line in body.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                found.complete = True
                continue
            try:
                _observe_payload(found, json.loads(payload))
            except ValueError:
                continue
        if found.usage is not None:
            return found
    return _scan_for_usage(found, body, body)


def read_truncated_body(head: bytes, tail: bytes) -> BodyUsage:
    """A body too large to keep whole: the model from its start, the last usage from its end."""
    return _scan_for_usage(BodyUsage(), head, tail)


def _scan_for_usage(found: BodyUsage, head: bytes, tail: bytes) -> BodyUsage:
    if found.model is None:
        match = _MODEL.search(head) or _MODEL.search(tail)
        found.model = match.group(1).decode("utf-8", "replace") if match else None
    position = tail.rfind(_USAGE_KEY)
    if position >= 0:
        start = tail.find(b"{", position)
        if start >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(tail[start:].decode("utf-8", "replace"))
            except ValueError:
                value = None
            usage = read_usage(value)
            if usage is not None:
                found.usage = usage
                found.complete = True
    return found

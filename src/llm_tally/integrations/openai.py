"""OpenAI SDK integration: every call of every OpenAI client becomes a usage record.

All REST calls of the SDK (``OpenAI``, ``AsyncOpenAI``, ``AzureOpenAI``, ``with_options()``
copies, ``with_raw_response`` / ``with_streaming_response``, the ``.parse()`` and
``.stream()`` helpers) pass through ``SyncAPIClient.request`` / ``AsyncAPIClient.request``.
Wrapping those two methods at class level sees every call exactly once (retries
included), also on clients created before instrumentation. They are private names: the
supported SDK range is pinned in pyproject.toml and
``tests/test_instrumentation.py::test_the_sdk_funnel_llm_tally_relies_on_still_exists`` fails
loudly if the funnel moves.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import httpx2
from openai import APIStatusError, AsyncStream, Omit, Stream
from openai._base_client import AsyncAPIClient, SyncAPIClient
from openai._constants import RAW_RESPONSE_HEADER
from openai._legacy_response import LegacyAPIResponse
from openai._response import BaseAPIResponse
from openai.lib.azure import AsyncAzureOpenAI, AzureOpenAI

from .._context import current_scope
from .._internal import guard, report_internal_error
from .._pricing import COST_UNKNOWN, UNKNOWN_PROVIDER
from .._record import (
    ENTRY_VERSION,
    STATUS_ABORTED,
    STATUS_ERROR,
    STATUS_OK,
    USAGE_ESTIMATED,
    USAGE_PROVIDER,
    USAGE_UNKNOWN,
    CallRecord,
    journal_fields,
    new_record_sequence,
    record_from_entry,
)
from .._tally import default_tally
from .._tokens import count_prompt, count_text, estimate_by_length
from .._validation import properties_from, user_id_from
from .openai_usage import (
    RESPONSES_TERMINAL,
    BodyUsage,
    Usage,
    read_body,
    read_truncated_body,
    usage_counts,
)

if TYPE_CHECKING:
    from .._scope import Scope
    from .._tally import Tally

OPERATIONS = {
    "/chat/completions": "chat",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/completions": "completions",
}
_STREAM_USAGE_OPERATIONS = ("chat", "completions")
_HELICONE_USER = "helicone-user-id"
_HELICONE_PROPERTY = "helicone-property-"
_TAIL_BYTES = 64 * 1024
_HEAD_BYTES = 4 * 1024
COST_NOT_BILLED = "not-billed"

# The call in flight in this task/thread, so the _process_response hook can attach to it.
_active_call: ContextVar[_Call | None] = ContextVar("llm_tally_openai_call", default=None)
_originals: dict[tuple[type[Any], str], Any] = {}


# -- install / uninstall ---------------------------------------------------------------------


def instrument_openai() -> bool:
    """Instrument the OpenAI SDK for this process. Idempotent; True if it was not yet installed."""
    if _originals:
        return False
    _patch(SyncAPIClient, "request", _wrap_sync_request)
    _patch(AsyncAPIClient, "request", _wrap_async_request)
    _patch(SyncAPIClient, "_process_response", _wrap_process_response)
    _patch(AsyncAPIClient, "_process_response", _wrap_async_process_response)
    return True


def uninstrument_openai() -> bool:
    """Undo :func:`instrument_openai`. Idempotent; True if it was installed."""
    if not _originals:
        return False
    for (cls, name), original in list(_originals.items()):
        setattr(cls, name, original)
    _originals.clear()
    return True


def is_openai_instrumented() -> bool:
    return bool(_originals)


def _patch(cls: type[Any], name: str, make_wrapper: Any) -> None:
    original = cls.__dict__[name]
    _originals[(cls, name)] = original
    wrapper = make_wrapper(original)
    functools.update_wrapper(wrapper, original)
    wrapper.__llm_tally_original__ = original
    setattr(cls, name, wrapper)


# -- the wrappers ----------------------------------------------------------------------------


# The two request wrappers are every call's hot path: the guard around our own code is
# written out in them (same helper, no extra frame).


def _wrap_sync_request(original: Any) -> Any:
    def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            call = _Call.begin(self, options, kwargs.get("stream", False))
        except Exception as exc:
            report_internal_error("begin call", exc)
            call = None
        if call is None:
            return original(self, cast_to, options, *args, **kwargs)
        token = _active_call.set(call)
        try:
            result = original(self, cast_to, call.options, *args, **kwargs)
        except BaseException as exc:
            guard("record failed call", call.fail, exc)
            raise
        finally:
            _active_call.reset(token)
        try:
            call.observe_result(result)
        except Exception as exc:
            report_internal_error("observe result", exc)
        return result

    return request


def _wrap_async_request(original: Any) -> Any:
    async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            call = _Call.begin(self, options, kwargs.get("stream", False))
        except Exception as exc:
            report_internal_error("begin call", exc)
            call = None
        if call is None:
            return await original(self, cast_to, options, *args, **kwargs)
        token = _active_call.set(call)
        try:
            result = await original(self, cast_to, call.options, *args, **kwargs)
        except BaseException as exc:
            guard("record failed call", call.fail, exc)
            raise
        finally:
            _active_call.reset(token)
        try:
            call.observe_result(result)
        except Exception as exc:
            report_internal_error("observe result", exc)
        return result

    return request


# The final HTTP status and the retry count, noted without anything that could raise.


def _wrap_process_response(original: Any) -> Any:
    def _process_response(self: Any, **kwargs: Any) -> Any:
        call = _active_call.get()
        if call is not None:
            call.http_status = getattr(kwargs.get("response"), "status_code", None)
            call.retries = kwargs.get("retries_taken", 0)
        return original(self, **kwargs)

    return _process_response


def _wrap_async_process_response(original: Any) -> Any:
    async def _process_response(self: Any, **kwargs: Any) -> Any:
        call = _active_call.get()
        if call is not None:
            call.http_status = getattr(kwargs.get("response"), "status_code", None)
            call.retries = kwargs.get("retries_taken", 0)
        return await original(self, **kwargs)

    return _process_response


# -- one call --------------------------------------------------------------------------------


_providers: dict[tuple[int, int], tuple[Any, str, str]] = {}


def _provider(client: Any) -> tuple[str, str]:
    """(provider, base URL) of a client, cached per client and base URL object."""
    # The SDK's `base_url` property is slow (~1 µs); `_base_url` is what it returns.
    url = getattr(client, "_base_url", None) or client.base_url
    key = (id(client), id(url))
    cached = _providers.get(key)
    if cached is not None and cached[0] is url:
        return cached[1], cached[2]
    if isinstance(client, AzureOpenAI | AsyncAzureOpenAI):
        provider = "azure"
    elif url.host == "api.openai.com":
        provider = "openai"
    else:
        provider = UNKNOWN_PROVIDER
    if len(_providers) > 1024:  # clients come and go: keep the cache small
        _providers.clear()
    _providers[key] = (url, provider, str(url))
    return provider, str(url)


def _retries_from(request: Any) -> int:
    try:
        return int(request.headers.get("x-stainless-retry-count", 0))
    except (AttributeError, ValueError):
        return 0


_NO_PARTS: list[str] = []  # shared by calls with no streamed text; never appended to


class _Call:
    """One logical SDK call, from ``request()`` to its last streamed byte.

    Most attributes start as class-level defaults: a plain call sets only what it needs.
    """

    http_status: int | None = None
    request_id: str | None = None
    retries = 0
    # Read by the writer thread after the call finished, not on the caller's path:
    usage: Any = None  # Usage, or the provider's usage object from a stream
    response: httpx2.Response | None = None  # of a stream or raw response
    body_source: bytes | _Tail | None = None  # a raw body to read usage from
    billed = True
    latency_us = 0
    response_model: str | None = None
    output_parts: list[str] = _NO_PARTS  # a new list per stream
    ttft_us: int | None = None
    saw_end = False
    finished = False
    pulling = False
    stream_attached = False
    hide_usage_chunk = False
    status = STATUS_OK
    error_type: str | None = None
    raw_finish: Callable[[], None] | None = None
    # The record id's parts (new_record_sequence), drawn when the call is journaled (or stored).
    record_sequence: tuple[str, int] | None = None

    def __init__(
        self,
        tally: Tally,
        scope: Scope | None,
        operation: str,
        client: Any,
        options: Any,
        body: dict[str, Any],
    ) -> None:
        self.start = time.perf_counter()
        self.ts_us = time.time_ns() // 1000
        self.tally = tally
        self.scope = scope
        self.operation = operation
        self.options = options
        self.body: dict[str, Any] | None = body
        model = body.get("model")
        self.request_model: str | None = model if isinstance(model, str) else None
        self.provider, self.base_url = _provider(client)
        self.is_async = isinstance(client, AsyncAPIClient)
        self.user_id: str | None = None
        self.properties: dict[str, str] = {}
        if scope is not None:
            self.user_id, self.properties = scope.who()

    @classmethod
    def begin(cls, client: Any, options: Any, stream: bool) -> _Call | None:
        """Start observing, or None when the call is not one we record."""
        operation = OPERATIONS.get(options.url)
        if operation is None or options.method.lower() != "post":
            return None
        scope = current_scope.get()
        tally: Tally | None = scope.tally if scope is not None else None
        if tally is None:
            tally = default_tally()
        if tally is None or tally._closed:
            return None
        body = options.json_data if isinstance(options.json_data, dict) else {}
        call = cls(tally, scope, operation, client, options, body)
        headers = options.headers if isinstance(options.headers, dict) else {}
        client_headers = getattr(client, "_custom_headers", None) or {}
        if (headers and _has_helicone(headers)) or (
            client_headers and _has_helicone(client_headers)
        ):
            options = call._take_helicone_headers(options, client_headers, headers)
            headers = options.headers
        if call.user_id is None:
            for key in ("safety_identifier", "user"):
                value = body.get(key)
                if isinstance(value, str) and value:
                    call.user_id = user_id_from(value, key)
                    if call.user_id is not None:
                        break
        if stream and operation in _STREAM_USAGE_OPERATIONS:
            options = call._maybe_inject_stream_usage(options, body, headers)
        call.options = options
        return call

    def _take_helicone_headers(
        self, options: Any, client_headers: Mapping[str, Any], headers: Mapping[str, Any]
    ) -> Any:
        """Helicone-User-Id / Helicone-Property-* headers (per call, or the client's defaults)
        set this call's user and properties, and never leave the process."""
        kept = {k: v for k, v in headers.items() if not _is_helicone(k)}
        values: dict[str, Any] = {}
        for key, value in client_headers.items():
            if _is_helicone(key):
                # The SDK merges the client's default headers into each request; Omit()
                # removes one of them from this request only.
                kept[key] = Omit()
                values[key.lower()] = value
        for key, value in headers.items():
            if _is_helicone(key):
                values[key.lower()] = value
        properties: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, Omit) or value is None:
                continue
            if key == _HELICONE_USER:
                self.user_id = user_id_from(value, "Helicone-User-Id")
            elif key.startswith(_HELICONE_PROPERTY) and len(key) > len(_HELICONE_PROPERTY):
                properties[key[len(_HELICONE_PROPERTY) :]] = value
        checked = properties_from(properties, "Helicone-Property-*")
        if checked:
            self.properties = {**self.properties, **checked}
        options = options.model_copy()
        options.headers = kept
        return options

    def _maybe_inject_stream_usage(
        self, options: Any, body: Mapping[str, Any], headers: Mapping[str, Any]
    ) -> Any:
        setting = self.tally.inject_stream_usage
        if setting is False or (setting == "auto" and self.provider != "openai"):
            return options
        if RAW_RESPONSE_HEADER in headers:
            return options  # the caller reads the wire itself: we must not change it
        stream_options = body.get("stream_options")
        if isinstance(stream_options, Mapping) and stream_options.get("include_usage"):
            return options
        if stream_options is not None and not isinstance(stream_options, Mapping):
            return options
        options = options.model_copy()
        options.json_data = {
            **body,
            "stream_options": {**(stream_options or {}), "include_usage": True},
        }
        self.hide_usage_chunk = True
        return options

    # -- outcomes ----------------------------------------------------------------------------

    def observe_result(self, result: Any) -> None:
        kind = _result_kinds.get(type(result))
        if kind is None:
            kind = _result_kinds[type(result)] = _result_kind(result)
        if kind == _PARSED:
            # Keep the usage object, not the result: holding whole results until the writer
            # runs measurably slows the app (memory, caches). The writer reads the usage.
            self.usage = getattr(result, "usage", None)
            if self.usage is None:  # a server that reports no usage: keep the text to count
                self.output_parts = _output_texts(result)
            model = getattr(result, "model", None)
            self.response_model = model if isinstance(model, str) else None
            self.request_id = getattr(result, "_request_id", None)
            self.saw_end = True
            self.finish(STATUS_OK)
        elif kind == _STREAM:
            self._attach_stream(result)
        elif kind == _RAW:
            self._observe_raw(result, result.http_response)
        else:
            self._observe_raw(None, result)

    def fail(self, exc: BaseException) -> None:
        """The request raised: an API error after retries, a timeout, or a connection error."""
        self.status = STATUS_ERROR
        self.error_type = type(exc).__name__
        if isinstance(exc, APIStatusError):
            self.http_status = exc.status_code
            self.request_id = exc.request_id
            self.retries = _retries_from(exc.response.request)
        else:
            self.retries = _retries_from(getattr(exc, "request", None))
        # A provider that answered 200 did the work (the SDK then failed on the body): it is
        # billed, so the call is estimated rather than recorded as free.
        billed = self.http_status is not None and self.http_status < 400
        self.finish(STATUS_ERROR, billed=billed)

    def abort(self) -> None:
        """The stream was abandoned, cancelled, or outlived its request."""
        if self.finished:
            return
        if self.raw_finish is not None and not self.stream_attached:
            self.raw_finish()
        else:
            self.finish(STATUS_OK if self.saw_end else STATUS_ABORTED)

    def finish(self, status: str, billed: bool = True) -> None:
        """The call is over: queue it. The writer thread turns it into a record."""
        if self.finished:
            return
        self.finished = True
        self.latency_us = int((time.perf_counter() - self.start) * 1_000_000)
        self.status = status
        self.billed = billed
        # Keep only what the writer needs: holding responses, prompts and streamed text
        # until it runs measurably slows the app.
        self.options = None
        response = self.response
        if response is not None:
            self.http_status = self.http_status or response.status_code
            self.request_id = self.request_id or response.headers.get("x-request-id")
            self.response = None
        if self.usage is not None or not billed:
            self.body = None  # the prompt and output text are only kept for an estimate
            self.output_parts = _NO_PARTS
        if self.stream_attached or self.raw_finish is not None:
            self.tally.untrack_open_call(self)
            if self.scope is not None:
                self.scope.open_calls.discard(self)
        self.tally.submit(self)

    def journal_entry(self, quick_estimate: bool = True) -> tuple[Any, ...]:
        """The call as a journal entry, made on the caller's path: complete when the usage
        object is in hand, else estimated by length; a raw body is left to the writer
        (``usage_source="unknown"`` if the process dies first). See _record.ENTRY_VERSION
        for the layout. The writer thread passes ``quick_estimate=False``, and completes
        what is left unknown itself."""
        sequence = self.record_sequence
        if sequence is None:
            sequence = self.record_sequence = new_record_sequence()
        usage = self.usage
        tokens = None if usage is None else usage_counts(usage)
        cost_nano: int | None = None
        cost_source: str | None = None
        usage_source = USAGE_PROVIDER
        if tokens is None:
            usage_source = USAGE_UNKNOWN
            if self.body_source is None and not self.billed:
                usage_source = USAGE_PROVIDER
                cost_nano, cost_source = 0, COST_NOT_BILLED
            elif self.body_source is None and quick_estimate:
                usage_source = USAGE_ESTIMATED
                prompt = _prompt_of(self.operation, self.body)
                tokens = (*estimate_by_length(prompt, self.output_parts), 0, 0, 0)
        return (
            ENTRY_VERSION,
            *sequence,
            journal_fields(self),
            tokens,
            cost_nano,
            cost_source,
            usage_source,
        )

    def to_record(self) -> CallRecord:
        """Writer thread: the journal entry, completed from a raw body or by an estimate."""
        record = record_from_entry(self.journal_entry(quick_estimate=False))
        if record.usage_source != USAGE_UNKNOWN:
            return record
        try:
            self._complete_usage(record)
        except Exception as exc:
            # Keep the call (tokens unknown: 0, marked estimated, cost unknown) rather than
            # lose it.
            _apply_usage(record, Usage())
            record.usage_source = USAGE_ESTIMATED
            record.cost_nano_usd, record.cost_source = None, COST_UNKNOWN
            report_internal_error("read usage", exc)
        return record

    def _complete_usage(self, record: CallRecord) -> None:
        """Usage from the raw body kept, else a tiktoken estimate."""
        usage: Usage | None = None
        parts = self.output_parts
        if self.body_source is not None:
            found = (
                read_body(self.body_source)
                if isinstance(self.body_source, bytes)
                else self.body_source.read()
            )
            record.response_model = found.model or record.response_model
            usage, parts = found.usage, found.output_parts
            if not (found.complete or found.usage) and record.status == STATUS_OK:
                record.status = STATUS_ABORTED
        record.usage_source = USAGE_PROVIDER
        if usage is not None:
            _apply_usage(record, usage)
        elif not self.billed:
            record.cost_nano_usd, record.cost_source = 0, COST_NOT_BILLED
        else:
            record.usage_source = USAGE_ESTIMATED
            model_name = record.response_model or record.request_model
            record.input_tokens = count_prompt(_prompt_of(self.operation, self.body), model_name)
            record.output_tokens = count_text("".join(parts), model_name)

    # -- streams -----------------------------------------------------------------------------

    def _attach_stream(self, stream: Stream[Any] | AsyncStream[Any]) -> None:
        self.stream_attached = True
        self.output_parts = []
        response = stream.response
        self.response = response
        if isinstance(stream, Stream):
            stream._iterator = _observe_sync(stream._iterator, self)
            _hook_sync_close(response, self)
        else:
            stream._iterator = _observe_async(stream._iterator, self)
            _hook_async_close(response, self)
        self.tally.track_open_call(self)
        if self.scope is not None:
            self.scope.open_calls.add(self)
        # A stream dropped without being read or closed is recorded when it is collected.
        weakref.finalize(stream, _abort_if_open, weakref.ref(self)).atexit = False

    def _observe_chunk(self, chunk: Any) -> bool:
        """A chat (or legacy completions) chunk: output text, the end, the usage chunk.

        Returns False for a chunk to hide from the caller (the usage chunk we asked for).
        """
        choices = chunk.choices
        if choices:
            if self.ttft_us is None:
                self.ttft_us = int((time.perf_counter() - self.start) * 1_000_000)
            for choice in choices:
                delta = choice.__dict__.get("delta")
                if delta is None:
                    text = choice.__dict__.get("text")  # legacy completions
                else:
                    text = delta.content
                    if delta.tool_calls:
                        for tool_call in delta.tool_calls:
                            arguments = tool_call.function and tool_call.function.arguments
                            if arguments:
                                self.output_parts.append(arguments)
                if text:
                    self.output_parts.append(text)
                if choice.finish_reason:
                    self.saw_end = True
        usage = chunk.usage
        if usage is not None:
            self.response_model = chunk.model or self.response_model
            self.usage = usage
            self.saw_end = True
            if self.hide_usage_chunk and not choices:
                return False
        elif self.response_model is None:
            self.response_model = chunk.model
        return True

    def _observe_event(self, event: Any) -> bool:
        kind = getattr(event, "type", None)
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            if self.ttft_us is None:
                self.ttft_us = int((time.perf_counter() - self.start) * 1_000_000)
            self.output_parts.append(event.delta)
        elif kind in RESPONSES_TERMINAL or kind == "response.created":
            response = event.response
            self.response_model = response.model or self.response_model
            if kind in RESPONSES_TERMINAL:
                self.usage = response.usage
                self.saw_end = True
                if kind == "response.failed":
                    self.status = STATUS_ERROR
                    error = getattr(response, "error", None)
                    self.error_type = getattr(error, "code", None) or "response.failed"
        elif kind == "error":
            self.status = STATUS_ERROR
            self.error_type = getattr(event, "code", None) or "error"
        return True

    def stream_ended(self) -> None:
        self.finish(self.status)

    def stream_failed(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.abort()  # the caller's task was cancelled: not a provider error
            return
        self.status = STATUS_ERROR
        self.error_type = type(exc).__name__
        if isinstance(exc, APIStatusError):
            self.http_status = exc.status_code
        self.finish(STATUS_ERROR)

    def stream_closed(self) -> None:
        """The response was closed from outside our iterator (caller's close, ``with`` exit)."""
        if not self.pulling:
            self.abort()

    # -- raw responses -----------------------------------------------------------------------

    def _observe_raw(self, api_response: Any, http: httpx2.Response) -> None:
        self.response = http
        if hasattr(http, "_content") and not _is_event_stream(http):
            self._finish_from_body(http.content)
            return
        # The body is read later (with_streaming_response) or parsed into a Stream later:
        # keep a bounded tail of the bytes, and finish when the response is closed.
        tap: _Tail | None = None
        if not hasattr(http, "_content"):
            tap = _Tail()
            if self.is_async and isinstance(http.stream, httpx2.AsyncByteStream):
                http.stream = _AsyncTap(http.stream, tap)
            elif not self.is_async and isinstance(http.stream, httpx2.SyncByteStream):
                http.stream = _SyncTap(http.stream, tap)
        if api_response is not None:
            _hook_parse(api_response, self)

        def on_close() -> None:
            if self.stream_attached or self.finished:
                return
            self._finish_from_body(http.content if hasattr(http, "_content") else (tap or b""))

        # Until then it is an open call: a request that ends first records it as it stands.
        self.raw_finish = on_close
        self.tally.track_open_call(self)
        if self.scope is not None:
            self.scope.open_calls.add(self)
        if self.is_async:
            original_aclose = http.aclose

            async def aclose() -> None:
                try:
                    await original_aclose()
                finally:
                    guard("raw response closed", on_close)

            http.aclose = aclose  # type: ignore[method-assign]
        else:
            original_close = http.close

            def close() -> None:
                try:
                    original_close()
                finally:
                    guard("raw response closed", on_close)

            http.close = close  # type: ignore[method-assign]

    def _finish_from_body(self, body: bytes | _Tail) -> None:
        self.body_source = body  # read by the writer thread (see to_record)
        if isinstance(body, _Tail) and body.error is not None:
            self.status, self.error_type = STATUS_ERROR, body.error  # the connection broke
        self.finish(self.status)


def _is_helicone(key: Any) -> bool:
    return isinstance(key, str) and key.lower().startswith("helicone-")


def _has_helicone(headers: Mapping[str, Any]) -> bool:
    return any(_is_helicone(k) for k in headers)


def _is_event_stream(http: httpx2.Response) -> bool:
    return http.headers.get("content-type", "").startswith("text/event-stream")


def _abort_if_open(ref: weakref.ref[_Call]) -> None:
    call = ref()
    if call is not None:
        guard("abandoned stream", call.abort)


_PARSED, _STREAM, _RAW, _HTTP = range(4)
_result_kinds: dict[type[Any], int] = {}


def _result_kind(result: Any) -> int:
    if isinstance(result, Stream | AsyncStream):
        return _STREAM
    if isinstance(result, BaseAPIResponse | LegacyAPIResponse):
        return _RAW
    return _HTTP if isinstance(result, httpx2.Response) else _PARSED


def _output_texts(result: Any) -> list[str]:
    """The generated text of a non-streamed result (chat, legacy completions, Responses)."""
    texts: list[str] = []
    for choice in getattr(result, "choices", None) or ():
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None) if message is not None else choice.text
        if isinstance(text, str):
            texts.append(text)
        for tool_call in getattr(message, "tool_calls", None) or ():
            arguments = getattr(getattr(tool_call, "function", None), "arguments", None)
            if isinstance(arguments, str):
                texts.append(arguments)
    output_text = getattr(result, "output_text", None) if not texts else None
    if isinstance(output_text, str):
        texts.append(output_text)
    return texts


def _apply_usage(record: CallRecord, usage: Usage) -> None:
    record.input_tokens = usage.input_tokens
    record.output_tokens = usage.output_tokens
    record.cached_input_tokens = usage.cached_input_tokens
    record.cache_write_tokens = usage.cache_write_tokens
    record.reasoning_tokens = usage.reasoning_tokens


def _prompt_of(operation: str, body: Mapping[str, Any] | None) -> Any:
    if not body:
        return None
    if operation == "chat":
        return body.get("messages")
    if operation == "responses":
        return [body.get("instructions"), body.get("input")]
    return body.get("prompt") if operation == "completions" else body.get("input")


# -- stream observers ------------------------------------------------------------------------


def _observe_sync(inner: Iterator[Any], call: _Call) -> Iterator[Any]:
    observe = call._observe_event if call.operation == "responses" else call._observe_chunk
    try:
        while True:
            call.pulling = True
            try:
                item = next(inner)
            except StopIteration:
                call.pulling = False
                guard("stream ended", call.stream_ended)
                return
            call.pulling = False
            # One chunk's cost matters (tens per call): the guard is inlined here.
            try:
                show = observe(item)
            except Exception as exc:
                report_internal_error("observe chunk", exc)
                show = _shown_anyway(call, item)
            if show:
                yield item
    except GeneratorExit:
        guard("stream abandoned", call.abort)
        raise
    except BaseException as exc:
        guard("stream failed", call.stream_failed, exc)
        raise


async def _observe_async(inner: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    observe = call._observe_event if call.operation == "responses" else call._observe_chunk
    try:
        while True:
            call.pulling = True
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                call.pulling = False
                guard("stream ended", call.stream_ended)
                return
            call.pulling = False
            try:
                show = observe(item)
            except Exception as exc:
                report_internal_error("observe chunk", exc)
                show = _shown_anyway(call, item)
            if show:
                yield item
    except GeneratorExit:
        guard("stream abandoned", call.abort)
        raise
    except BaseException as exc:
        guard("stream failed", call.stream_failed, exc)
        raise


def _shown_anyway(call: _Call, item: Any) -> bool:
    """Whether to pass on a chunk our observer failed on: yes, unless it is the usage chunk
    we asked for and the caller did not (its ``choices`` is empty: ``choices[0]`` breaks)."""
    if not call.hide_usage_chunk:
        return True
    return getattr(item, "usage", None) is None or bool(getattr(item, "choices", None))


def _hook_sync_close(response: httpx2.Response, call: _Call) -> None:
    original = response.close

    def close() -> None:
        try:
            original()
        finally:
            guard("stream closed", call.stream_closed)

    response.close = close  # type: ignore[method-assign]


def _hook_async_close(response: httpx2.Response, call: _Call) -> None:
    original = response.aclose

    async def aclose() -> None:
        try:
            await original()
        finally:
            guard("stream closed", call.stream_closed)

    response.aclose = aclose  # type: ignore[method-assign]


def _hook_parse(api_response: Any, call: _Call) -> None:
    """A raw response parsed into a Stream later is observed like any stream."""
    original = api_response.parse

    def attach(parsed: Any) -> Any:
        if isinstance(parsed, Stream | AsyncStream) and not call.stream_attached:
            guard("observe parsed stream", call._attach_stream, parsed)
        return parsed

    if not inspect.iscoroutinefunction(original):

        def parse(*args: Any, **kwargs: Any) -> Any:
            return attach(original(*args, **kwargs))

        api_response.parse = parse
    else:

        async def aparse(*args: Any, **kwargs: Any) -> Any:
            return attach(await original(*args, **kwargs))

        api_response.parse = aparse


# -- byte taps for raw bodies ----------------------------------------------------------------


class _Tail:
    """The first and last bytes of a body: enough to find its model and final usage object."""

    __slots__ = ("chunks", "error", "head", "size", "truncated")

    def __init__(self) -> None:
        self.head = b""
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.error: str | None = None  # what cut the body short, as the caller saw it

    def add(self, chunk: bytes) -> None:
        if len(self.head) < _HEAD_BYTES:
            self.head += chunk[: _HEAD_BYTES - len(self.head)]
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.chunks[0]) >= _TAIL_BYTES:
            self.size -= len(self.chunks.pop(0))
            self.truncated = True

    def read(self) -> BodyUsage:
        tail = b"".join(self.chunks)
        return read_truncated_body(self.head, tail) if self.truncated else read_body(tail)


class _SyncTap(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, tail: _Tail) -> None:
        self._inner = inner
        self._tail = tail

    def __iter__(self) -> Iterator[bytes]:
        tail = self._tail
        try:
            for chunk in self._inner:
                guard("tap raw body", tail.add, chunk)
                yield chunk
        except Exception as exc:
            tail.error = type(exc).__name__
            raise

    def close(self) -> None:
        self._inner.close()


class _AsyncTap(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, tail: _Tail) -> None:
        self._inner = inner
        self._tail = tail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tail = self._tail
        try:
            async for chunk in self._inner:
                guard("tap raw body", tail.add, chunk)
                yield chunk
        except Exception as exc:
            tail.error = type(exc).__name__
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


__all__ = ["instrument_openai", "is_openai_instrumented", "uninstrument_openai"]

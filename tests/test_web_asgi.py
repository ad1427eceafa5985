"""FastAPI / Starlette integration over real HTTP: uvicorn serves the app under test, whose
endpoints call the fake LLM (another uvicorn server) with the real OpenAI SDK.

Every LLM request is labelled (``x-test-label``), so the fake provider's ledger says which
request each stored record must match and what each user must be charged.
"""

import asyncio
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

import httpx2
import openai
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Header, Request, WebSocket
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import llm_tally
from llm_tally import LLMUsageMiddleware, Tally
from llm_tally._context import current_scope
from llm_tally.demo.fake_llm import WORDS
from llm_tally.demo.serve import BackgroundServer

from .conftest import TOKEN_FIELDS, FakeServer, stored_rows

MODEL = "gpt-4o-mini"


# -- the LLM side of the apps under test ------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One LLM call an endpoint makes: its ledger label and its size."""

    label: str
    words: int = 5
    max_tokens: int = 4


def call_from(request: Request) -> Call:
    h = request.headers
    return Call(h["x-label"], int(h.get("x-words", "5")), int(h.get("x-max", "4")))


def reply_text(max_tokens: int) -> str:
    """What the fake answers for ``max_tokens`` output tokens."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(max_tokens))


class Llm:
    """The app's OpenAI clients (real SDK, loopback HTTP to the fake provider)."""

    def __init__(self, base_url: str) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
        self.aclient = openai.AsyncOpenAI(base_url=base_url, api_key="test-key", max_retries=0)

    @staticmethod
    def kwargs(
        call: Call,
        *,
        stream: bool = False,
        safety: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        prompt = " ".join(WORDS[(i * 3) % len(WORDS)] for i in range(call.words))
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_completion_tokens": call.max_tokens,
            "extra_headers": {"x-test-label": call.label, **(headers or {})},
        }
        if stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
        if safety is not None:
            kwargs["safety_identifier"] = safety
        return kwargs

    def chat(self, call: Call, **options: Any) -> str:
        completion = self.client.chat.completions.create(**self.kwargs(call, **options))
        return completion.choices[0].message.content or ""

    async def achat(self, call: Call, **options: Any) -> str:
        completion = await self.aclient.chat.completions.create(**self.kwargs(call, **options))
        return completion.choices[0].message.content or ""

    def stream(self, call: Call, **options: Any) -> Any:
        return self.client.chat.completions.create(**self.kwargs(call, stream=True, **options))

    async def astream(self, call: Call, **options: Any) -> Any:
        return await self.aclient.chat.completions.create(
            **self.kwargs(call, stream=True, **options)
        )


def text_of(chunk: Any) -> str:
    if chunk.choices and chunk.choices[0].delta.content:
        return str(chunk.choices[0].delta.content)
    return ""


# -- serving ------------------------------------------------------------------------------------


class _LoopCapture:
    """Outermost pass-through that remembers the server's event loop (to close async clients)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@dataclass
class Served:
    url: str
    llm: Llm
    capture: _LoopCapture

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's event loop (where the app's async objects live)."""
        assert self.capture.loop is not None, "the server has not served a request yet"
        return asyncio.run_coroutine_threadsafe(coro, self.capture.loop).result(10)


Serve = Callable[[Callable[[Llm], Any]], Served]


@pytest.fixture
def serve(fake_llm: FakeServer) -> Iterator[Serve]:
    """``serve(build)``: build an app around fresh LLM clients and serve it with uvicorn."""
    started: list[tuple[BackgroundServer, Served]] = []

    def start(build: Callable[[Llm], Any]) -> Served:
        llm = Llm(fake_llm.base_url)
        capture = _LoopCapture(build(llm))
        server = BackgroundServer(capture).start()
        served = Served(server.url, llm, capture)
        started.append((server, served))
        return served

    yield start
    for server, served in reversed(started):
        try:
            if served.capture.loop is not None:
                served.run(served.llm.aclient.close())
            served.llm.client.close()
        finally:
            server.stop()


def new_prefix() -> str:
    return uuid.uuid4().hex[:10]


def ledger_for(fake_llm: FakeServer, label: str) -> list[dict[str, Any]]:
    return [entry for entry in list(fake_llm.ledger) if entry["label"] == label]


def one_entry(fake_llm: FakeServer, label: str) -> dict[str, Any]:
    entries = ledger_for(fake_llm, label)
    assert len(entries) == 1, entries
    return entries[0]


def assert_matches(row: dict[str, Any], entry: dict[str, Any]) -> None:
    """The stored record is this provider response, with the tokens the provider reported."""
    assert row["request_id"] == entry["request_id"], (row, entry)
    for column, key in TOKEN_FIELDS:
        assert row[column] == entry[key], (column, row, entry)
    assert (row["status"], row["usage_source"]) == ("ok", "provider"), row


def row_for(rows: list[dict[str, Any]], entry: dict[str, Any]) -> dict[str, Any]:
    found = [row for row in rows if row["request_id"] == entry["request_id"]]
    assert len(found) == 1, (entry, rows)
    return found[0]


def wait_rows(
    tally: Tally, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Stored rows once ``done(rows)`` holds (bounded wait: the request may still be ending)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = stored_rows(tally)
        if done(rows):
            return rows
        assert time.monotonic() < deadline, f"gave up waiting; rows: {rows}"
        time.sleep(0.02)


def headers_for(call: Call, **extra: str) -> dict[str, str]:
    return {
        "x-label": call.label,
        "x-words": str(call.words),
        "x-max": str(call.max_tokens),
        **{name.replace("_", "-"): value for name, value in extra.items()},
    }


# -- auth the way FastAPI apps do it: a dependency ------------------------------------------------


def bind_in_sync_dependency(x_user: Annotated[str | None, Header()] = None) -> str | None:
    if x_user:
        llm_tally.bind_user(x_user)
    return x_user


async def bind_in_async_dependency(x_user: Annotated[str | None, Header()] = None) -> str | None:
    if x_user:
        llm_tally.bind_user(x_user)
    return x_user


SyncBound = Annotated[str | None, Depends(bind_in_sync_dependency)]
AsyncBound = Annotated[str | None, Depends(bind_in_async_dependency)]


class HeaderAuth(AuthenticationBackend):
    """Starlette authentication: the ``x-auth`` header names the signed-in user."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("x-auth")
        if not name:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(name)


def plan_properties(request: Request) -> dict[str, str]:
    return {"plan": request.headers.get("x-plan", "free"), "feature": "default"}


# == 1. bind_user in a dependency, sync and async endpoints ======================================


def binding_app(tally: Tally) -> Callable[[Llm], FastAPI]:
    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/async/sync-dep")
        async def async_sync_dep(request: Request, user: SyncBound) -> dict[str, Any]:
            llm_tally.tag(feature="summarize")
            text = await llm.achat(call_from(request))
            return {"dep": user, "seen": llm_tally.current_user_id(), "text": text}

        @app.get("/async/async-dep")
        async def async_async_dep(request: Request, user: AsyncBound) -> dict[str, Any]:
            llm_tally.tag(feature="summarize")
            text = await llm.achat(call_from(request))
            return {"dep": user, "seen": llm_tally.current_user_id(), "text": text}

        @app.get("/sync/sync-dep")
        def sync_sync_dep(request: Request, user: SyncBound) -> dict[str, Any]:
            llm_tally.tag(feature="summarize")
            text = llm.chat(call_from(request))
            return {"dep": user, "seen": llm_tally.current_user_id(), "text": text}

        @app.get("/sync/async-dep")
        def sync_async_dep(request: Request, user: AsyncBound) -> dict[str, Any]:
            llm_tally.tag(feature="summarize")
            text = llm.chat(call_from(request))
            return {"dep": user, "seen": llm_tally.current_user_id(), "text": text}

        tally.init_app(app, properties=plan_properties)
        return app

    return build


async def test_user_bound_in_a_dependency_charges_sync_and_async_endpoints(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    served = serve(binding_app(tally))
    prefix = new_prefix()
    routes = ["/async/sync-dep", "/async/async-dep", "/sync/sync-dep", "/sync/async-dep"]
    expected: dict[str, tuple[str, str, Call]] = {}
    async with httpx2.AsyncClient(base_url=served.url, timeout=10) as client:
        for i, route in enumerate(routes):
            uid, plan = f"{prefix} user{i}@example.com", ("free", "pro", "team", "pro")[i]
            call = Call(f"{prefix}-{i}", words=3 + i, max_tokens=2 + i)
            response = await client.get(route, headers=headers_for(call, x_user=uid, x_plan=plan))
            assert response.status_code == 200, response.text
            body = response.json()
            assert body == {"dep": uid, "seen": uid, "text": reply_text(call.max_tokens)}
            expected[route] = (uid, plan, call)

    rows = stored_rows(tally)
    assert len(rows) == len(routes)
    for route, (uid, plan, call) in expected.items():
        row = row_for(rows, one_entry(fake_llm, call.label))
        assert_matches(row, one_entry(fake_llm, call.label))
        assert row["user_id"] == uid, route
        # tag() inside the endpoint wins over the properties= callable for the same key.
        assert row["properties"] == {"plan": plan, "feature": "summarize"}, route
        assert row["response_model"] == one_entry(fake_llm, call.label)["model"]
        totals = tally.user_totals(uid)
        assert totals.requests == 1 and totals.errors == 0
        assert totals.input_tokens == call.words and totals.output_tokens == call.max_tokens
    assert tally.user_totals(None).requests == 0


# == 2. identify, AuthenticationMiddleware, user_header, safety_identifier: precedence ===========


def precedence_app(
    tally: Tally,
    *,
    identify_kind: str,
    auth: str,
    user_header: str | None = "X-Gateway-User",
) -> Callable[[Llm], FastAPI]:
    def identify_sync(request: Request) -> str | None:
        return request.headers.get("x-ident")

    async def identify_async(request: Request) -> str | None:
        await asyncio.sleep(0)
        return request.headers.get("x-ident")

    identify = {"sync": identify_sync, "async": identify_async, "none": None}[identify_kind]

    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/chat")
        async def chat(request: Request, user: AsyncBound) -> dict[str, Any]:
            seen = llm_tally.current_user_id()
            await llm.achat(call_from(request), safety=request.headers.get("x-safety"))
            return {"seen": seen}

        @app.get("/sync-chat")
        def sync_chat(request: Request, user: SyncBound) -> dict[str, Any]:
            seen = llm_tally.current_user_id()
            llm.chat(call_from(request), safety=request.headers.get("x-safety"))
            return {"seen": seen}

        if auth == "before":  # inside the usage middleware
            app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
        tally.init_app(app, identify=identify, user_header=user_header)
        if auth == "after":  # outside the usage middleware
            app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
        return app

    return build


# Each source of the user, by its header, in the documented order of precedence.
SOURCES = (
    ("x-user", "bind"),
    ("x-ident", "ident"),
    ("x-auth", "auth"),
    ("x-gateway-user", "gateway"),
    ("x-safety", "safety"),
)


@pytest.mark.parametrize("auth", ["before", "after"])
@pytest.mark.parametrize("identify_kind", ["sync", "async"])
def test_user_sources_follow_the_documented_precedence(
    tally: Tally, serve: Serve, fake_llm: FakeServer, identify_kind: str, auth: str
) -> None:
    served = serve(precedence_app(tally, identify_kind=identify_kind, auth=auth))
    prefix = new_prefix()
    cases: list[tuple[Call, str | None]] = []
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        for route in ("/chat", "/sync-chat"):
            # Drop the strongest source one at a time: the next one in line must win.
            for start in range(len(SOURCES) + 1):
                present = SOURCES[start:]
                call = Call(f"{prefix}-{route}-{start}", words=2 + start)
                values = {header: f"{prefix}-{name}" for header, name in present}
                response = client.get(route, headers={**headers_for(call), **values})
                assert response.status_code == 200, response.text
                winner = values[present[0][0]] if present else None
                # safety_identifier belongs to one LLM call, not to the request.
                in_request = winner if present and present[0][1] != "safety" else None
                assert response.json() == {"seen": in_request}, (route, present)
                cases.append((call, winner))

    rows = stored_rows(tally)
    assert len(rows) == len(cases)
    for call, winner in cases:
        entry = one_entry(fake_llm, call.label)
        row = row_for(rows, entry)
        assert_matches(row, entry)
        assert row["user_id"] == winner, (call.label, row["user_id"])


def test_user_header_is_ignored_unless_opted_in(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    served = serve(precedence_app(tally, identify_kind="none", auth="none", user_header=None))
    prefix = new_prefix()
    spoofed, with_safety = Call(f"{prefix}-spoof"), Call(f"{prefix}-safety")
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        for call, extra in (
            (spoofed, {"x-gateway-user": f"{prefix}-spoofed", "x-user-id": f"{prefix}-x"}),
            (with_safety, {"x-gateway-user": f"{prefix}-spoofed", "x-safety": f"{prefix}-s"}),
        ):
            response = client.get("/chat", headers={**headers_for(call), **extra})
            assert response.status_code == 200 and response.json() == {"seen": None}
    rows = stored_rows(tally)
    assert row_for(rows, one_entry(fake_llm, spoofed.label))["user_id"] is None
    assert row_for(rows, one_entry(fake_llm, with_safety.label))["user_id"] == f"{prefix}-s"
    assert tally.user_totals(f"{prefix}-spoofed").requests == 0


# == 3. streaming responses, background tasks, gather ============================================


def streaming_app(tally: Tally, gate: threading.Event) -> Callable[[Llm], FastAPI]:
    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/stream/async")
        async def stream_async(request: Request, user: AsyncBound) -> StreamingResponse:
            call = call_from(request)

            async def body() -> AsyncIterator[str]:
                stream = await llm.astream(call)
                async with stream:
                    async for chunk in stream:
                        if text := text_of(chunk):
                            yield text
                yield f"|{llm_tally.current_user_id()}"

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/stream/sync")
        def stream_sync(request: Request, user: SyncBound) -> StreamingResponse:
            call = call_from(request)

            def body() -> Iterator[str]:
                with llm.stream(call) as stream:
                    for chunk in stream:
                        if text := text_of(chunk):
                            yield text
                yield f"|{llm_tally.current_user_id()}"

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/background")
        async def background(
            request: Request, tasks: BackgroundTasks, user: AsyncBound
        ) -> dict[str, str]:
            call = call_from(request)

            async def async_task() -> None:
                await asyncio.to_thread(gate.wait, 10)
                await llm.achat(Call(f"{call.label}-async-task", 3, 2))

            def sync_task() -> None:
                gate.wait(10)
                llm.chat(Call(f"{call.label}-sync-task", 4, 3))

            tasks.add_task(async_task)
            tasks.add_task(sync_task)
            return {"queued": call.label}

        @app.get("/gather")
        async def gather(request: Request, user: AsyncBound) -> dict[str, Any]:
            call = call_from(request)
            texts = await asyncio.gather(
                *(llm.achat(Call(f"{call.label}-{i}", 1 + i, 1 + i)) for i in range(5))
            )
            return {"texts": texts}

        tally.init_app(app)
        return app

    return build


async def test_streaming_responses_are_charged_to_the_requests_user(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    served = serve(streaming_app(tally, threading.Event()))
    prefix = new_prefix()
    calls = {
        "/stream/async": (Call(f"{prefix}-a", 6, 7), f"{prefix}-ann"),
        "/stream/sync": (Call(f"{prefix}-s", 4, 5), f"{prefix}-bob"),
    }
    async with httpx2.AsyncClient(base_url=served.url, timeout=10) as client:
        for route, (call, uid) in calls.items():
            async with client.stream("GET", route, headers=headers_for(call, x_user=uid)) as r:
                assert r.status_code == 200
                pieces = [piece async for piece in r.aiter_text()]
            assert "".join(pieces) == f"{reply_text(call.max_tokens)}|{uid}"

    rows = stored_rows(tally)
    assert len(rows) == 2
    for call, uid in calls.values():
        entry = one_entry(fake_llm, call.label)
        row = row_for(rows, entry)
        assert_matches(row, entry)
        assert row["user_id"] == uid
        assert row["ttft_us"] is not None
        assert tally.user_totals(uid).output_tokens == call.max_tokens


def test_background_tasks_after_the_response_are_charged_to_the_requests_user(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    gate = threading.Event()
    served = serve(streaming_app(tally, gate))
    prefix = new_prefix()
    uid, label = f"{prefix}-carol", f"{prefix}-bg"
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        response = client.get("/background", headers=headers_for(Call(label), x_user=uid))
    assert response.status_code == 200 and response.json() == {"queued": label}
    labels = [f"{label}-async-task", f"{label}-sync-task"]
    # The response is out; the tasks have not called the LLM yet. Now let them.
    assert not any(ledger_for(fake_llm, lbl) for lbl in labels)
    gate.set()
    rows = wait_rows(tally, lambda rows: len(rows) == 2)
    for lbl in labels:
        entry = one_entry(fake_llm, lbl)
        row = row_for(rows, entry)
        assert_matches(row, entry)
        assert row["user_id"] == uid
    assert tally.user_totals(uid).requests == 2


async def test_gathered_llm_calls_in_one_endpoint_are_all_charged_to_its_user(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    served = serve(streaming_app(tally, threading.Event()))
    prefix = new_prefix()
    uid, label = f"{prefix}-dave", f"{prefix}-g"
    async with httpx2.AsyncClient(base_url=served.url, timeout=10) as client:
        response = await client.get("/gather", headers=headers_for(Call(label), x_user=uid))
    assert response.status_code == 200
    assert response.json() == {"texts": [reply_text(1 + i) for i in range(5)]}
    rows = stored_rows(tally)
    assert len(rows) == 5
    entries = [one_entry(fake_llm, f"{label}-{i}") for i in range(5)]
    for entry in entries:
        row = row_for(rows, entry)
        assert_matches(row, entry)
        assert row["user_id"] == uid
    totals = tally.user_totals(uid)
    assert totals.requests == 5
    assert totals.input_tokens == sum(e["input"] for e in entries)
    assert totals.output_tokens == sum(e["output"] for e in entries)


# == 4. websocket (and lifespan) scopes pass through untouched ===================================
# Driven by hand, as a server would, to see the exact scope objects; a session through a real
# uvicorn server is at the end of this file.


async def drive_websocket(app: Any, scope: dict[str, Any], messages: list[str]) -> list[Any]:
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    incoming += [{"type": "websocket.receive", "text": text} for text in messages]
    incoming.append({"type": "websocket.disconnect", "code": 1000})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def websocket_scope(path: str) -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"x-user", b"ws-user")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }


async def test_websocket_and_lifespan_scopes_pass_through_the_middleware_untouched(
    tally: Tally,
) -> None:
    seen: list[tuple[Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, current_scope.get()))
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})

    middleware = LLMUsageMiddleware(
        inner, tally=tally, identify=lambda request: "never", user_header="x-user"
    )
    scope = websocket_scope("/ws")
    snapshot = dict(scope)
    sent = await drive_websocket(middleware, scope, [])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan_snapshot = dict(lifespan)

    async def lifespan_receive() -> dict[str, Any]:
        raise AssertionError("the inner app did not receive")

    async def no_send(message: Any) -> None:
        raise AssertionError("the inner app did not send")

    await middleware(lifespan, lifespan_receive, no_send)
    assert len(seen) == 2
    assert seen[0][0] is scope and seen[1][0] is lifespan, "the very same scope objects"
    assert seen[0][1] is None and seen[1][1] is None, "no usage scope for websocket/lifespan"
    assert scope == snapshot and lifespan == lifespan_snapshot, "nothing added to the scope"


async def test_websocket_endpoint_of_an_init_app_app_runs_outside_any_usage_scope(
    tally: Tally, aclient: openai.AsyncOpenAI, fake_llm: FakeServer
) -> None:
    label = f"{new_prefix()}-ws"
    observed: list[Any] = []
    app = FastAPI()

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        observed.append((current_scope.get(), llm_tally.current_user_id()))
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await aclient.chat.completions.create(**Llm.kwargs(Call(label)))
            await websocket.send_text(f"echo:{message['text']}")

    tally.init_app(app, identify=lambda request: "identified", user_header="x-user")
    sent = await drive_websocket(app, websocket_scope("/ws"), ["hi", "there"])
    texts = [m.get("text") for m in sent if m["type"] == "websocket.send"]
    assert texts == ["echo:hi", "echo:there"]
    assert observed == [(None, None)]
    rows = stored_rows(tally)
    entries = ledger_for(fake_llm, label)
    assert len(rows) == len(entries) == 2
    for entry in entries:
        row = row_for(rows, entry)
        assert_matches(row, entry)
        # Neither identify() nor the trusted header apply outside HTTP requests.
        assert row["user_id"] is None


# == 5. many users, many concurrent requests ======================================================


def load_app(tally: Tally) -> Callable[[Llm], FastAPI]:
    def label(request: Request) -> str:
        # The app labels its LLM calls with the user it was sent, whatever llm-tally decided.
        return request.headers["x-user"]

    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/async")
        async def async_endpoint(request: Request, user: AsyncBound) -> dict[str, Any]:
            call = call_from(request)
            await llm.achat(Call(label(request), call.words, call.max_tokens))
            return {"seen": llm_tally.current_user_id()}

        @app.get("/sync")
        def sync_endpoint(request: Request, user: SyncBound) -> dict[str, Any]:
            call = call_from(request)
            llm.chat(Call(label(request), call.words, call.max_tokens))
            return {"seen": llm_tally.current_user_id()}

        @app.get("/stream")
        async def stream_endpoint(request: Request, user: SyncBound) -> StreamingResponse:
            call = Call(label(request), call_from(request).words, call_from(request).max_tokens)

            async def body() -> AsyncIterator[str]:
                async with await llm.astream(call) as stream:
                    async for chunk in stream:
                        yield text_of(chunk)
                        await asyncio.sleep(0)
                yield f"|{llm_tally.current_user_id()}"

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/stream-sync")
        def stream_sync_endpoint(request: Request, user: AsyncBound) -> StreamingResponse:
            call = Call(label(request), call_from(request).words, call_from(request).max_tokens)

            def body() -> Iterator[str]:
                with llm.stream(call) as stream:
                    for chunk in stream:
                        yield text_of(chunk)
                yield f"|{llm_tally.current_user_id()}"

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/gather")
        async def gather_endpoint(request: Request, user: AsyncBound) -> dict[str, Any]:
            call = call_from(request)
            await asyncio.gather(
                llm.achat(Call(label(request), call.words, call.max_tokens)),
                llm.achat(Call(label(request), call.max_tokens, call.words)),
            )
            return {"seen": llm_tally.current_user_id()}

        tally.init_app(app)
        return app

    return build


LOAD_ROUTES = {"/async": 1, "/sync": 1, "/stream": 1, "/stream-sync": 1, "/gather": 2}


async def test_twenty_users_with_ten_concurrent_requests_each_get_exact_totals(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    served = serve(load_app(tally))
    prefix = new_prefix()
    rng = random.Random(7)
    users = [f"{prefix}-user-{i}" for i in range(20)]
    routes = list(LOAD_ROUTES)
    plan = [
        (uid, routes[(i + j) % len(routes)], rng.randint(1, 30), rng.randint(1, 12))
        for i, uid in enumerate(users)
        for j in range(10)
    ]
    rng.shuffle(plan)
    expected_calls = Counter[str]()
    for uid, route, _, _ in plan:
        expected_calls[uid] += LOAD_ROUTES[route]
    started = datetime.now(UTC)

    async def one(client: httpx2.AsyncClient, uid: str, route: str, words: int, mx: int) -> str:
        headers = {
            "x-user": uid,
            "x-label": "unused",  # the load app labels its LLM calls with x-user
            "x-words": str(words),
            "x-max": str(mx),
        }
        response = await client.get(route, headers=headers)
        assert response.status_code == 200, response.text
        if route.startswith("/stream"):
            return response.text.rsplit("|", 1)[1]
        return str(response.json()["seen"])

    limits = httpx2.Limits(max_connections=len(plan), max_keepalive_connections=len(plan))
    async with httpx2.AsyncClient(base_url=served.url, timeout=30, limits=limits) as client:
        seen = await asyncio.gather(*(one(client, *request) for request in plan))
    assert seen == [uid for uid, *_ in plan], "an endpoint saw another request's user"
    assert llm_tally.current_user_id() is None

    rows = stored_rows(tally)
    ledger = {uid: ledger_for(fake_llm, uid) for uid in users}
    by_request_id = {e["request_id"]: e for entries in ledger.values() for e in entries}
    assert len(rows) == sum(expected_calls.values()) == len(by_request_id)
    assert {row["user_id"] for row in rows} == set(users), "a record went to a wrong user"
    for row in rows:
        entry = by_request_id[row["request_id"]]
        assert row["user_id"] == entry["label"], (row, entry)
        assert_matches(row, entry)
    for uid in users:
        totals = tally.user_totals(uid)
        assert totals.requests == expected_calls[uid] == len(ledger[uid])
        assert totals.errors == 0 and totals.unpriced_requests == 0
        for column, key in TOKEN_FIELDS:
            assert getattr(totals, column) == sum(e[key] for e in ledger[uid]), (uid, column)
        user_rows = [row for row in rows if row["user_id"] == uid]
        assert totals.cost_usd == Decimal(sum(r["cost_nano_usd"] for r in user_rows)) / 10**9
        assert totals.cost_usd > 0
        assert totals.first_seen is not None and started <= totals.first_seen
    assert tally.user_totals(None).requests == 0
    assert tally.stats()["open_streams"] == 0 and tally.stats()["dropped"] == 0


# == 6. LLM streams still open when the request ends =============================================


def open_streams_app(tally: Tally, leftovers: list[Any]) -> Callable[[Llm], FastAPI]:
    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/relay-stalled")
        async def relay_stalled(request: Request, user: AsyncBound) -> StreamingResponse:
            call = call_from(request)

            async def body() -> AsyncIterator[str]:
                stream = await llm.astream(call, headers={"x-fake-stall-after": "2"})
                leftovers.append(stream)
                async for chunk in stream:
                    if text := text_of(chunk):
                        yield text

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/relay-stalled-sync")
        def relay_stalled_sync(request: Request, user: SyncBound) -> StreamingResponse:
            call = call_from(request)

            def body() -> Iterator[str]:
                stream = llm.stream(call, headers={"x-fake-stall-after": "2"})
                leftovers.append(stream)
                for chunk in stream:
                    if text := text_of(chunk):
                        yield text

            return StreamingResponse(body(), media_type="text/plain")

        @app.get("/leave-open/async")
        async def leave_open_async(request: Request, user: AsyncBound) -> dict[str, Any]:
            stream = await llm.astream(call_from(request))
            leftovers.append(stream)  # kept referenced: not collected during the test
            first = await stream.__anext__()
            return {"role": first.choices[0].delta.role}

        @app.get("/leave-open/sync")
        def leave_open_sync(request: Request, user: SyncBound) -> dict[str, Any]:
            stream = llm.stream(call_from(request))
            leftovers.append(stream)
            first = next(stream)
            return {"role": first.choices[0].delta.role}

        tally.init_app(app)
        return app

    return build


async def aclose(stream: Any) -> None:
    await stream.close()


def read_until_stalled(response: httpx2.Response) -> Iterator[str]:
    """Read the relayed words up to the LLM's stall; the app is then waiting for the LLM.

    Returns the body iterator: it must stay referenced, as dropping a half-read iterator
    closes the connection (which is the client disconnect, done later on purpose).
    """
    chunks = response.iter_text()
    text = ""
    while text != f"{WORDS[0]} {WORDS[1]}":
        text += next(chunks)
    time.sleep(0.2)
    return chunks


def test_client_disconnect_mid_stream_records_the_llm_stream_as_aborted(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    leftovers: list[Any] = []
    served = serve(open_streams_app(tally, leftovers))
    prefix = new_prefix()
    uid, call = f"{prefix}-erin", Call(f"{prefix}-stall", 5, 6)
    with (
        httpx2.Client(base_url=served.url, timeout=10) as client,
        client.stream("GET", "/relay-stalled", headers=headers_for(call, x_user=uid)) as r,
    ):
        assert r.status_code == 200
        chunks = read_until_stalled(r)
        # The LLM stream is stalled and still open: nothing is recorded yet.
        assert stored_rows(tally) == []
    # Leaving the block closed the connection in the middle of the body.
    del chunks
    rows = wait_rows(tally, lambda rows: len(rows) == 1)
    row = rows[0]
    assert row["request_id"] == one_entry(fake_llm, call.label)["request_id"]
    assert (row["user_id"], row["status"]) == (uid, "aborted")
    # What the app had relayed so far is estimated (the provider never sent usage).
    assert row["usage_source"] == "estimated" and row["output_tokens"] > 0, row
    assert tally.stats()["open_streams"] == 0
    assert len(leftovers) == 1
    served.run(aclose(leftovers[0]))
    assert len(stored_rows(tally)) == 1, "closing afterwards must not record it again"


def test_client_disconnect_while_a_sync_generator_waits_for_the_llm_is_recorded(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    leftovers: list[Any] = []
    served = serve(open_streams_app(tally, leftovers))
    prefix = new_prefix()
    uid, call = f"{prefix}-fay", Call(f"{prefix}-stall-sync", 5, 6)
    headers = headers_for(call, x_user=uid)
    try:
        with (
            httpx2.Client(base_url=served.url, timeout=10) as client,
            client.stream("GET", "/relay-stalled-sync", headers=headers) as r,
        ):
            assert r.status_code == 200
            chunks = read_until_stalled(r)
            assert stored_rows(tally) == []
        del chunks
        # Shorter than the other tests' 10 s bound: when recorded, it is within milliseconds.
        rows = wait_rows(tally, lambda rows: len(rows) == 1, timeout=3)
        assert (rows[0]["user_id"], rows[0]["status"]) == (uid, "aborted")
    finally:
        # Unblock the worker thread still waiting for the stalled LLM: end its connection.
        for stream in leftovers:
            network = stream.response.extensions["network_stream"]
            network.get_extra_info("socket").shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_llm_stream_left_open_by_the_endpoint_is_aborted_when_the_request_ends(
    tally: Tally, serve: Serve, fake_llm: FakeServer, kind: str
) -> None:
    leftovers: list[Any] = []
    served = serve(open_streams_app(tally, leftovers))
    prefix = new_prefix()
    uid, call = f"{prefix}-frank", Call(f"{prefix}-left-{kind}", 7, 8)
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        response = client.get(f"/leave-open/{kind}", headers=headers_for(call, x_user=uid))
    assert response.status_code == 200 and response.json() == {"role": "assistant"}
    # The stream object is still referenced (leftovers): this is the request's end, not GC.
    rows = wait_rows(tally, lambda rows: len(rows) == 1)
    assert len(leftovers) == 1
    row = rows[0]
    assert row["request_id"] == one_entry(fake_llm, call.label)["request_id"]
    assert (row["user_id"], row["status"]) == (uid, "aborted")
    assert tally.stats()["open_streams"] == 0
    if kind == "async":
        served.run(aclose(leftovers[0]))
    else:
        leftovers[0].close()
    assert len(stored_rows(tally)) == 1, "closing afterwards must not record it again"


# == 7. the /llm-usage JSON API ===================================================================

API_USERS = ("ann@example.com", "bob smith", "team/carol")
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
EXACT_DECIMAL = re.compile(r"^\d+(\.\d+)?$")


def api_app(tally: Tally, **init: Any) -> Callable[[Llm], FastAPI]:
    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/chat")
        async def chat(request: Request, user: AsyncBound) -> dict[str, str]:
            return {"text": await llm.achat(call_from(request))}

        if init.pop("auth", False):
            app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
        tally.init_app(app, **init)
        return app

    return build


def populate(tally: Tally, client: httpx2.Client, prefix: str) -> dict[str, str]:
    """Live LLM calls through the app for API_USERS, plus manual records in January 2020."""
    users = {name: f"{prefix}-{name}" for name in API_USERS}
    sizes = {"ann@example.com": [(3, 2), (4, 2), (2, 1)], "bob smith": [(40, 30)]}
    sizes["team/carol"] = [(10, 6), (12, 5)]
    for name, calls in sizes.items():
        for i, (words, max_tokens) in enumerate(calls):
            call = Call(f"{prefix}-{name}-{i}", words, max_tokens)
            response = client.get("/chat", headers=headers_for(call, x_user=users[name]))
            assert response.status_code == 200, response.text
    ann, dave = users["ann@example.com"], f"{prefix}-dave"
    tally.record(
        user_id=ann,
        model=MODEL,
        input_tokens=1000,
        output_tokens=10,
        ts=datetime(2020, 1, 1, 10, tzinfo=UTC),
    )
    tally.record(
        user_id=ann,
        model=MODEL,
        input_tokens=500,
        output_tokens=500,
        ts=datetime(2020, 1, 2, 5, tzinfo=UTC),
    )
    tally.record(user_id=dave, model="gpt-4o", input_tokens=70, ts=datetime(2020, 1, 2, 23))
    users["dave"] = dave
    assert tally.flush(10)
    return users


def assert_totals_json(item: dict[str, Any], totals: Any) -> None:
    """One user's JSON totals equal the Python API's, field by field, in wire formats."""
    assert item["user_id"] == totals.user_id
    for name in (
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
    ):
        assert item[name] == getattr(totals, name), name
        assert type(item[name]) is int
    assert isinstance(item["cost_usd"], str) and EXACT_DECIMAL.match(item["cost_usd"])
    assert Decimal(item["cost_usd"]) == totals.cost_usd
    for name in ("first_seen", "last_seen"):
        assert ISO_Z.match(item[name]), item[name]
        assert datetime.fromisoformat(item[name]) == getattr(totals, name)


def expected_order(rows: list[dict[str, Any]], order_by: str) -> list[str]:
    """Users sorted the documented way, computed from the stored rows themselves."""
    key: dict[str, Any] = defaultdict(int)
    for row in rows:
        if row["user_id"] is None:
            continue
        uid = row["user_id"]
        key[uid] = {
            "cost": key[uid] + (row["cost_nano_usd"] or 0),
            "requests": key[uid] + 1,
            "tokens": key[uid] + row["input_tokens"] + row["output_tokens"],
            "last_seen": max(key[uid], row["ts"]),
        }[order_by]
    return sorted(key, key=lambda uid: (-key[uid], uid))


def test_users_api_lists_exact_totals_sorted_paged_and_by_period(
    tally: Tally, serve: Serve
) -> None:
    served = serve(api_app(tally))
    prefix = new_prefix()
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        users = populate(tally, client, prefix)
        rows = stored_rows(tally)

        page = client.get("/llm-usage/api/users")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("application/json")
        body = page.json()
        assert set(body) == {"users", "total"}
        assert body["total"] == len(users) == tally.count_users()
        listed = {item["user_id"]: item for item in body["users"]}
        assert set(listed) == set(users.values())
        for uid in users.values():
            assert_totals_json(listed[uid], tally.user_totals(uid))
            user_rows = [row for row in rows if row["user_id"] == uid]
            assert listed[uid]["requests"] == len(user_rows)
            assert listed[uid]["input_tokens"] == sum(r["input_tokens"] for r in user_rows)
            nano = sum(r["cost_nano_usd"] for r in user_rows)
            assert Decimal(listed[uid]["cost_usd"]) == Decimal(nano) / 10**9

        for order_by in ("cost", "requests", "tokens", "last_seen"):
            got = client.get("/llm-usage/api/users", params={"order_by": order_by}).json()
            order = [item["user_id"] for item in got["users"]]
            assert order == expected_order(rows, order_by), order_by
            assert order == [t.user_id for t in tally.users(order_by=order_by)]
        assert [i["user_id"] for i in body["users"]] == expected_order(rows, "cost")

        paged = client.get("/llm-usage/api/users", params={"limit": 2, "offset": 1}).json()
        assert [i["user_id"] for i in paged["users"]] == expected_order(rows, "cost")[1:3]
        assert paged["total"] == len(users)

        periods: list[tuple[dict[str, str], Any, Any]] = [
            ({"since": "2020-01-01", "until": "2020-01-02"}, date(2020, 1, 1), date(2020, 1, 2)),
            (
                {"since": "2020-01-01T12:00:00Z", "until": "2020-01-03"},
                datetime(2020, 1, 1, 12, tzinfo=UTC),
                date(2020, 1, 3),
            ),
            ({"since": date.today().isoformat()}, date.today(), None),
            ({"until": "2020-01-02T00:00:00+00:00"}, None, datetime(2020, 1, 2, tzinfo=UTC)),
        ]
        for params, since, until in periods:
            got = client.get("/llm-usage/api/users", params=params).json()
            expected = tally.users(since, until)
            assert got["total"] == tally.count_users(since, until) == len(expected), params
            assert [i["user_id"] for i in got["users"]] == [t.user_id for t in expected]
            for item, totals in zip(got["users"], expected, strict=True):
                assert_totals_json(item, totals)
        first = client.get("/llm-usage/api/users", params=periods[0][0]).json()
        assert [i["user_id"] for i in first["users"]] == [users["ann@example.com"]]
        assert first["users"][0]["input_tokens"] == 1000


def test_user_detail_api_gives_totals_by_model_and_by_day(tally: Tally, serve: Serve) -> None:
    served = serve(api_app(tally))
    prefix = new_prefix()
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        users = populate(tally, client, prefix)
        rows = stored_rows(tally)
        for uid in users.values():
            response = client.get(f"/llm-usage/api/users/{quote(uid, safe='')}")
            assert response.status_code == 200, (uid, response.text)
            detail = response.json()
            assert_totals_json(detail, tally.user_totals(uid))
            user_rows = [row for row in rows if row["user_id"] == uid]

            by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
            by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in user_rows:
                by_model[row["response_model"] or row["request_model"]].append(row)
                day = datetime.fromtimestamp(row["ts"] / 1_000_000, UTC).date().isoformat()
                by_day[day].append(row)
            assert {m["model"] for m in detail["by_model"]} == set(by_model)
            for item in detail["by_model"]:
                model_rows = by_model[item["model"]]
                assert item["requests"] == len(model_rows)
                assert item["input_tokens"] == sum(r["input_tokens"] for r in model_rows)
                assert item["output_tokens"] == sum(r["output_tokens"] for r in model_rows)
                nano = sum(r["cost_nano_usd"] for r in model_rows)
                assert Decimal(item["cost_usd"]) == Decimal(nano) / 10**9
                assert EXACT_DECIMAL.match(item["cost_usd"])
            assert [d["date"] for d in detail["daily"]] == sorted(by_day)
            for item in detail["daily"]:
                day_rows = by_day[item["date"]]
                assert item["requests"] == len(day_rows)
                assert item["tokens"] == sum(
                    r["input_tokens"] + r["output_tokens"] for r in day_rows
                )
                nano = sum(r["cost_nano_usd"] for r in day_rows)
                assert Decimal(item["cost_usd"]) == Decimal(nano) / 10**9

        ann = users["ann@example.com"]
        path = f"/llm-usage/api/users/{quote(ann, safe='')}"
        january = client.get(path, params={"since": "2020-01-01", "until": "2020-02-01"}).json()
        assert [d["date"] for d in january["daily"]] == ["2020-01-01", "2020-01-02"]
        assert january["requests"] == 2 and january["input_tokens"] == 1500
        assert_totals_json(january, tally.user_totals(ann, date(2020, 1, 1), date(2020, 2, 1)))
        stranger = client.get(f"/llm-usage/api/users/{prefix}-nobody").json()
        assert stranger["requests"] == 0 and stranger["by_model"] == [] and stranger["daily"] == []
        assert EXACT_DECIMAL.match(stranger["cost_usd"]) and Decimal(stranger["cost_usd"]) == 0
        assert stranger["first_seen"] is None and stranger["last_seen"] is None


@pytest.mark.parametrize("how", ["identify", "starlette-auth"])
def test_me_api_gives_the_callers_own_totals_and_ignores_authorize(
    tally: Tally, serve: Serve, how: str
) -> None:
    init: dict[str, Any] = {"authorize": lambda request: False}
    if how == "identify":
        init["identify"] = lambda request: request.headers.get("x-auth")
    else:
        init["auth"] = True
    served = serve(api_app(tally, **init))
    prefix = new_prefix()
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        users = populate(tally, client, prefix)
        anonymous = client.get("/llm-usage/api/me")
        assert anonymous.status_code == 401
        assert "user" in anonymous.json()["error"]
        for uid in users.values():
            # The other user's id anywhere in the request must not matter.
            other = users["dave"] if uid != users["dave"] else users["bob smith"]
            me = client.get(
                "/llm-usage/api/me",
                params={"user_id": other},
                headers={"x-auth": uid, "x-forwarded-for": "203.0.113.9"},
            )
            assert me.status_code == 200, me.text
            detail = me.json()
            assert_totals_json(detail, tally.user_totals(uid))
            assert sum(m["requests"] for m in detail["by_model"]) == detail["requests"]
        # authorize() says no to everything else, for the same signed-in user.
        for path in ("/llm-usage/", "/llm-usage/api/users", f"/llm-usage/api/users/{prefix}"):
            denied = client.get(path, headers={"x-auth": users["dave"]})
            assert denied.status_code == 403, path
            assert "authorize" in denied.json()["error"]


def test_usage_api_is_loopback_only_by_default(tally: Tally, serve: Serve) -> None:
    served = serve(api_app(tally))
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        for path in ("/llm-usage/", "/llm-usage/api/users", "/llm-usage/api/users/x"):
            assert client.get(path).status_code == 200, path
            for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                value = "for=198.51.100.7" if header == "Forwarded" else "198.51.100.7"
                denied = client.get(path, headers={header: value})
                assert denied.status_code == 403, (path, header)
                assert "authorize" in denied.json()["error"]
            # Even a proxy claiming a loopback client is a proxy.
            assert client.get(path, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 403


def authorize_sync(request: Request) -> bool:
    return request.headers.get("x-admin") == "yes"


async def authorize_async(request: Request) -> bool:
    await asyncio.sleep(0)
    return request.headers.get("x-admin") == "yes"


def authorize_raising(request: Request) -> bool:
    if request.headers.get("x-admin") == "yes":
        raise LookupError("the admin service is down")
    return False


async def authorize_raising_async(request: Request) -> bool:
    if request.headers.get("x-admin") == "yes":
        raise LookupError("the admin service is down")
    return False


@pytest.mark.parametrize(
    ("authorize", "admin_allowed"),
    [
        (authorize_sync, True),
        (authorize_async, True),
        (authorize_raising, False),
        (authorize_raising_async, False),
    ],
)
def test_custom_authorize_guards_every_route_but_me(
    tally: Tally, serve: Serve, authorize: Any, admin_allowed: bool
) -> None:
    served = serve(api_app(tally, authorize=authorize, identify=lambda r: r.headers.get("x-me")))
    prefix = new_prefix()
    uid = f"{prefix}-gina"
    tally.record(user_id=uid, model=MODEL, input_tokens=5, output_tokens=5)
    assert tally.flush(10)
    paths = ("/llm-usage/", "/llm-usage/api/users", f"/llm-usage/api/users/{uid}")
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        for path in paths:
            for headers in ({}, {"x-admin": "no"}, {"x-admin": "yes"}):
                response = client.get(path, headers=headers)
                allowed = admin_allowed and headers.get("x-admin") == "yes"
                assert response.status_code == (200 if allowed else 403), (path, headers)
                if not allowed:
                    assert "authorize" in response.json()["error"]
            # authorize() replaces the loopback rule: a proxied admin is let in.
            proxied = client.get(path, headers={"x-admin": "yes", "X-Forwarded-For": "1.2.3.4"})
            assert proxied.status_code == (200 if admin_allowed else 403)
        me = client.get("/llm-usage/api/me", headers={"x-me": uid})
        assert me.status_code == 200
        assert me.json()["requests"] == 1
        if admin_allowed:
            listed = client.get("/llm-usage/api/users", headers={"x-admin": "yes"}).json()
            assert [item["user_id"] for item in listed["users"]] == [uid]


def test_bad_api_parameters_are_rejected_with_400_naming_the_parameter(
    tally: Tally, serve: Serve
) -> None:
    served = serve(api_app(tally))
    bad = [
        ({"limit": "0"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "x"}, "offset"),
        ({"order_by": "money"}, "order_by"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-45"}, "until"),
        ({"since": "2020-02-01", "until": "2020-01-01"}, "since"),
    ]
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        for params, name in bad:
            for path in ("/llm-usage/api/users", "/llm-usage/api/users/someone"):
                if path.endswith("someone") and name in ("limit", "offset", "order_by"):
                    continue
                response = client.get(path, params=params)
                assert response.status_code == 400, (path, params, response.text)
                error = response.json()["error"]
                assert name in error, (params, error)
        reverse = client.get(
            "/llm-usage/api/users", params={"since": "2020-02-01", "until": "2020-01-01"}
        )
        assert "until" in reverse.json()["error"]
        assert client.get("/llm-usage/api/users", params={"limit": "1000"}).status_code == 200


# == 8. init_app checks, Starlette, manual wiring ==================================================


def test_init_app_twice_on_one_app_is_a_clear_runtime_error(tally: Tally) -> None:
    app = FastAPI()
    tally.init_app(app)
    with pytest.raises(RuntimeError, match=r"already set up.*once per app"):
        tally.init_app(app)
    with Tally("sqlite://") as other, pytest.raises(RuntimeError, match="already set up"):
        other.init_app(app)
    assert len(app.user_middleware) == 1


def test_init_app_rejects_unsupported_apps_and_bad_arguments(tally: Tally) -> None:
    async def bare_asgi(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    for unsupported in (object(), bare_asgi, "app"):
        with pytest.raises(TypeError, match="LLMUsageMiddleware"):
            tally.init_app(unsupported)
    for kwargs, name in (
        ({"identify": 5}, "identify"),
        ({"authorize": "yes"}, "authorize"),
        ({"mount_path": "x"}, "mount_path"),
        ({"mount_path": "/"}, "mount_path"),
        ({"mount_path": None}, "mount_path"),
        ({"user_header": "X User"}, "user_header"),
    ):
        with pytest.raises(ValueError, match=name):
            tally.init_app(FastAPI(), **kwargs)


def test_init_app_rejects_a_non_callable_properties() -> None:
    with Tally("sqlite://") as tally, pytest.raises(ValueError, match="properties"):
        tally.init_app(FastAPI(), properties=5)


def test_a_rejected_init_app_leaves_the_app_unchanged(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    label = f"{new_prefix()}-retry"

    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/chat")
        async def chat(request: Request) -> dict[str, str]:
            return {"text": await llm.achat(call_from(request))}

        with pytest.raises(ValueError, match="identify"):
            tally.init_app(app, identify=5)
        tally.init_app(app, identify=lambda request: "fixed")  # the user fixes the typo
        return app

    served = serve(build)
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        response = client.get("/chat", headers=headers_for(Call(label)))
    assert response.status_code == 200
    row = row_for(stored_rows(tally), one_entry(fake_llm, label))
    assert row["user_id"] == "fixed"


def test_a_plain_starlette_app_works_with_init_app(
    tally: Tally, serve: Serve, fake_llm: FakeServer
) -> None:
    prefix = new_prefix()
    uid, label = f"{prefix}-hal", f"{prefix}-starlette"

    def build(llm: Llm) -> Starlette:
        async def chat(request: Request) -> JSONResponse:
            text = await llm.achat(call_from(request))
            return JSONResponse({"text": text, "seen": llm_tally.current_user_id()})

        def sync_chat(request: Request) -> JSONResponse:
            text = llm.chat(call_from(request))
            return JSONResponse({"text": text, "seen": llm_tally.current_user_id()})

        app = Starlette(routes=[Route("/chat", chat), Route("/sync-chat", sync_chat)])
        tally.init_app(app, identify=lambda request: request.headers.get("x-ident"))
        return app

    served = serve(build)
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        for route in ("/chat", "/sync-chat"):
            call = Call(f"{label}{route}", 3, 3)
            response = client.get(route, headers=headers_for(call, x_ident=uid))
            assert response.json() == {"text": reply_text(3), "seen": uid}
        assert tally.flush(10)
        listed = client.get("/llm-usage/api/users").json()
        me = client.get("/llm-usage/api/me", headers={"x-ident": uid}).json()
    rows = stored_rows(tally)
    for route in ("/chat", "/sync-chat"):
        entry = one_entry(fake_llm, f"{label}{route}")
        assert_matches(row_for(rows, entry), entry)
        assert row_for(rows, entry)["user_id"] == uid
    assert [item["user_id"] for item in listed["users"]] == [uid]
    assert listed["users"][0]["requests"] == 2
    assert_totals_json(me, tally.user_totals(uid))


def test_middleware_and_usage_app_wired_by_hand(
    tally: Tally, serve: Serve, fake_llm: FakeServer, tmp_path: Any
) -> None:
    """``add_middleware(LLMUsageMiddleware, tally=t)`` records into t, not the default Tally."""
    prefix = new_prefix()
    uid, label = f"{prefix}-ivy", f"{prefix}-manual"
    with Tally(f"sqlite:///{tmp_path / 'other.db'}") as other:
        assert llm_tally.default_tally() is tally

        def build(llm: Llm) -> FastAPI:
            app = FastAPI()

            @app.get("/chat")
            async def chat(request: Request) -> dict[str, Any]:
                return {"text": await llm.achat(call_from(request))}

            identify = lambda request: request.headers.get("x-ident")  # noqa: E731
            app.add_middleware(LLMUsageMiddleware, tally=other, identify=identify)
            app.mount("/usage", other.asgi_app(identify=identify))
            return app

        served = serve(build)
        with httpx2.Client(base_url=served.url, timeout=10) as client:
            response = client.get("/chat", headers=headers_for(Call(label), x_ident=uid))
            assert response.status_code == 200
            assert other.flush(10)
            listed = client.get("/usage/api/users")
            me = client.get("/usage/api/me", headers={"x-ident": uid})
            assert client.get("/usage/api/me").status_code == 401
            assert client.get("/llm-usage/api/users").status_code == 404
        entry = one_entry(fake_llm, label)
        row = row_for(stored_rows(other), entry)
        assert_matches(row, entry)
        assert row["user_id"] == uid
        assert stored_rows(tally) == [], "recorded by the default Tally instead of tally="
        assert listed.status_code == 200
        assert [item["user_id"] for item in listed.json()["users"]] == [uid]
        assert me.status_code == 200
        assert_totals_json(me.json(), other.user_totals(uid))


# == 9. the app's callables failing ================================================================


def raising_identify(request: Request) -> str:
    raise KeyError("session store unavailable")


async def raising_identify_async(request: Request) -> str:
    raise KeyError("session store unavailable")


def raising_properties(request: Request) -> dict[str, str]:
    raise RuntimeError("plan lookup failed")


@pytest.mark.parametrize("identify", [raising_identify, raising_identify_async])
def test_a_failing_identify_does_not_break_the_request(
    tally: Tally, serve: Serve, fake_llm: FakeServer, identify: Any
) -> None:
    label = f"{new_prefix()}-failing"

    def build(llm: Llm) -> FastAPI:
        app = FastAPI()

        @app.get("/chat")
        async def chat(request: Request) -> dict[str, Any]:
            text = await llm.achat(call_from(request))
            return {"text": text, "seen": llm_tally.current_user_id()}

        tally.init_app(app, identify=identify, properties=raising_properties)
        return app

    served = serve(build)
    with httpx2.Client(base_url=served.url, timeout=10) as client:
        response = client.get("/chat", headers=headers_for(Call(label, 4, 5)))
        assert response.status_code == 200, response.text
        assert response.json() == {"text": reply_text(5), "seen": None}
        assert client.get("/llm-usage/api/me").status_code == 401
    entry = one_entry(fake_llm, label)
    row = row_for(stored_rows(tally), entry)
    assert_matches(row, entry)
    assert (row["user_id"], row["properties"]) == (None, {})
    assert tally.user_totals(None).requests == 1


def test_websocket_served_by_uvicorn_passes_through_and_can_charge_a_user(
    tally: Tally, fake_llm: FakeServer
) -> None:
    """A real websocket session through uvicorn: the middleware leaves it alone, and an app
    that wants its LLM calls charged opens a user context itself."""
    from websockets.sync.client import connect

    app = FastAPI()
    seen_scopes: list[object] = []

    @app.websocket("/ws")
    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        seen_scopes.append(current_scope.get())
        user = websocket.query_params["user"]
        async with openai.AsyncOpenAI(
            base_url=fake_llm.base_url, api_key="k", max_retries=0
        ) as llm:
            async for text in websocket.iter_text():
                async with llm_tally.user(user, channel="websocket"):
                    answer = await llm.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
                    )
                await websocket.send_text(answer.choices[0].message.content or "")

    tally.init_app(app)
    with BackgroundServer(app) as server:
        url = server.url.replace("http://", "ws://") + "/ws?user=ws-user"
        with connect(url) as ws:
            replies = []
            for text in ("one two", "three four five"):
                ws.send(text)
                replies.append(ws.recv(timeout=10))
    assert all(replies)
    assert seen_scopes == [None]  # no usage scope was opened for the websocket
    rows = stored_rows(tally)
    assert [(r["user_id"], r["input_tokens"]) for r in rows] == [("ws-user", 2), ("ws-user", 3)]
    assert all(r["properties"] == {"channel": "websocket"} for r in rows)

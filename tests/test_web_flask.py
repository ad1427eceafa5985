"""Flask and plain WSGI apps served by a real werkzeug server, calling the fake LLM for real.

Every test runs a ``werkzeug.serving`` server on a loopback port in a background thread and
drives it over HTTP with ``httpx2``; the views call the fake OpenAI-compatible server with the
real ``openai.OpenAI`` SDK. Each LLM request carries an ``x-test-label`` header, so the fake
provider's ledger says what was reported for it: the stored rows must agree with it, be
charged to the right user, and never twice.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import flask
import flask_login
import httpx2
import openai
import pytest
from genai_prices import Usage, calc_price

import llm_tally
from llm_tally import LLMUsageWSGIMiddleware, Tally
from llm_tally._tokens import count_text
from llm_tally.demo.fake_llm import WORDS
from llm_tally.demo.serve import BackgroundServer
from tests.conftest import FakeServer, serve_wsgi, stored_rows

MODEL = "gpt-4o-mini"
NANO = Decimal(10**9)
COST_STRING = re.compile(r"^\d+\.\d{9}$")
# -- servers and clients -----------------------------------------------------------------------


class _NoteClose:
    """A pass-through WSGI wrapper noting the path of each response the server closed."""

    def __init__(self, app: Any, log: list[str]) -> None:
        self.app = app
        self.log = log

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = self.app(environ, start_response)
        path = environ["PATH_INFO"]
        log = self.log

        class Noted:
            def __iter__(self) -> Iterator[bytes]:
                return iter(body)

            def close(self) -> None:
                try:
                    close = getattr(body, "close", None)
                    if close is not None:
                        close()
                finally:
                    log.append(path)

        return Noted()


@contextmanager
def serve(app: Any, *, threaded: bool = True, closed_log: list[str] | None = None) -> Iterator[str]:
    """A real werkzeug server for ``app`` on a loopback port; yields its base URL.

    ``closed_log`` collects the path of every response body the server closed (diagnostics).
    """
    if closed_log is not None:
        app = _NoteClose(app, closed_log)
    with serve_wsgi(app, threaded=threaded) as url:
        yield url


@contextmanager
def http_client(url: str) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=url, timeout=15) as http:
        yield http


@pytest.fixture
def held_streams() -> Iterator[list[Any]]:
    """LLM streams the views leave open: kept referenced (so garbage collection cannot record
    them behind our back) and closed when the test ends (so the fake server's stalled
    responses end too)."""
    held: list[Any] = []
    yield held
    for stream in held:
        stream.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- what the views send to the LLM ------------------------------------------------------------


def prompt_of(words: int) -> str:
    return " ".join(WORDS[(i * 3) % len(WORDS)] for i in range(words))


def reply_of(tokens: int) -> str:
    """What the fake LLM answers when asked for ``tokens`` output tokens."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def chat_call(client: openai.OpenAI, args: dict[str, str], **extra: Any) -> str:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt_of(int(args.get("words", "3")))}],
        max_completion_tokens=int(args.get("max", "4")),
        extra_headers={"x-test-label": args["label"]},
        **extra,
    )
    return completion.choices[0].message.content or ""


def chat_stream(client: openai.OpenAI, args: dict[str, str]) -> Iterator[str]:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt_of(int(args.get("words", "3")))}],
        max_completion_tokens=int(args.get("max", "4")),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-test-label": args["label"]},
    )
    with stream:
        for chunk in stream:
            if chunk.choices:
                yield chunk.choices[0].delta.content or ""


# -- the Flask app under test ------------------------------------------------------------------


class Account(flask_login.UserMixin):
    def __init__(self, uid: str) -> None:
        self.id = uid


class DemoApp:
    """A Flask app with Flask-Login and views that call the LLM in every way a view can."""

    def __init__(self, client: openai.OpenAI, held: list[Any] | None = None) -> None:
        app = flask.Flask(__name__)
        app.secret_key = uuid.uuid4().hex
        flask_login.LoginManager(app).user_loader(Account)
        self.app = app
        self.teardowns: Counter[str | None] = Counter()
        self.bodies_closed: list[str] = []
        held = held if held is not None else []

        @app.before_request
        def bind_from_headers() -> None:
            headers = flask.request.headers
            if uid := headers.get("x-bind-user"):
                llm_tally.bind_user(uid)
            flask.g.app_user = headers.get("x-g-user")

        @app.teardown_request
        def count_teardown(exc: BaseException | None) -> None:
            self.teardowns[flask.request.args.get("label")] += 1

        def tag_from_headers() -> None:
            if plan := flask.request.headers.get("x-tag-plan"):
                llm_tally.tag(plan=plan)

        @app.post("/login/<uid>")
        def login(uid: str) -> str:
            flask_login.login_user(Account(uid))
            return "signed in"

        @app.post("/logout")
        def logout() -> str:
            flask_login.logout_user()
            return "signed out"

        @app.get("/chat")
        def chat() -> Any:
            tag_from_headers()
            safety = flask.request.headers.get("x-safety")
            extra = {"safety_identifier": safety} if safety else {}
            content = chat_call(client, flask.request.args.to_dict(), **extra)
            return {
                "content": content,
                "thread": threading.get_ident(),
                "charged": llm_tally.current_user_id(),
            }

        @app.get("/stream")
        def stream() -> Any:
            tag_from_headers()
            args = flask.request.args.to_dict()
            if args.get("pre"):
                chat_call(client, {**args, "label": args["label"] + "-pre"})

            def body() -> Iterator[str]:
                try:
                    yield "start\n"
                    yield from chat_stream(client, args)
                    yield "\nend"
                finally:
                    self.bodies_closed.append(args["label"])

            wrapped = flask.stream_with_context(body()) if args.get("ctx") == "1" else body()
            response = flask.Response(wrapped, mimetype="text/plain")
            response.headers["x-thread"] = str(threading.get_ident())
            return response

        @app.get("/relay-stall")
        def relay_stall() -> Any:
            # Relays an LLM stream that stalls after two words, then keeps the HTTP response
            # alive with padding: werkzeug notices a gone client only when a write fails.
            label = flask.request.args["label"]
            llm = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "relay this"}],
                max_completion_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-test-label": label, "x-fake-stall-after": "2"},
            )
            held.append(llm)

            def body() -> Iterator[bytes]:
                try:
                    chunks = iter(llm)
                    for _ in range(3):  # the role chunk, then the two words sent before the stall
                        chunk = next(chunks)
                        yield (chunk.choices[0].delta.content or "").encode() + b"\n"
                    for _ in range(500):  # bounded: ~10 s if the disconnect went unnoticed
                        time.sleep(0.02)
                        yield b" " * 512
                finally:
                    self.bodies_closed.append(label)

            return flask.Response(body(), mimetype="text/plain")

        @app.get("/peek")
        def peek() -> Any:
            # Opens an LLM stream, reads one chunk and answers normally: the stream is still
            # open when the request ends.
            llm = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "peek at this"}],
                max_completion_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={
                    "x-test-label": flask.request.args["label"],
                    "x-fake-stall-after": "2",
                },
            )
            held.append(llm)
            first = next(iter(llm))
            return {"first": first.choices[0].delta.role}


# -- reading what was stored -------------------------------------------------------------------


def properties_of(row: dict[str, Any]) -> dict[str, Any]:
    value = row["properties"]
    return json.loads(value) if isinstance(value, str) else value


def ledger_by_label(fake_llm: FakeServer) -> dict[str | None, list[dict[str, Any]]]:
    out: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for entry in list(fake_llm.ledger):
        out[entry["label"]].append(entry)
    return out


def rows_by_label(tally: Tally, fake_llm: FakeServer) -> dict[str | None, list[dict[str, Any]]]:
    """Stored rows grouped by the label of the LLM request they record (None: no request)."""
    labels = {e["request_id"]: e["label"] for e in list(fake_llm.ledger)}
    out: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for row in stored_rows(tally):
        out[labels.get(row["request_id"])].append(row)
    return out


def assert_matches_ledger(row: dict[str, Any], entry: dict[str, Any]) -> None:
    assert row["request_id"] == entry["request_id"], (row, entry)
    assert (row["status"], row["usage_source"]) == ("ok", "provider"), row
    assert row["input_tokens"] == entry["input"], (row, entry)
    assert row["output_tokens"] == entry["output"], (row, entry)
    assert row["cached_input_tokens"] == entry["cached"], (row, entry)
    assert row["reasoning_tokens"] == entry["reasoning"], (row, entry)


def only_row_for(tally: Tally, fake_llm: FakeServer, label: str) -> dict[str, Any]:
    """The one stored row of the one LLM request labelled ``label``, checked against it."""
    [entry] = ledger_by_label(fake_llm)[label]
    rows = rows_by_label(tally, fake_llm)[label]
    assert len(rows) == 1, rows
    assert_matches_ledger(rows[0], entry)
    return rows[0]


def wait_for_rows(
    tally: Tally, fake_llm: FakeServer, label: str, timeout: float = 10.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = rows_by_label(tally, fake_llm).get(label, [])
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def list_price_nano(entry: dict[str, Any]) -> int:
    """What the ledger's usage costs at OpenAI's list price, in nano-USD (half-even)."""
    usage = Usage(
        input_tokens=entry["input"],
        output_tokens=entry["output"],
        cache_read_tokens=entry["cached"],
    )
    price = calc_price(usage, entry["model"], provider_id="openai").total_price
    return int((Decimal(price) * NANO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


# == 1. who is charged for a view's LLM call ===================================================


def test_bind_user_in_before_request_charges_the_view_call(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app)
    label = unique("bind")
    with serve(demo.app) as url, http_client(url) as http:
        response = http.get(
            "/chat", params={"label": label, "words": 5, "max": 3}, headers={"x-bind-user": "ann"}
        )
    assert response.status_code == 200
    assert response.json()["content"] == reply_of(3)
    assert response.json()["charged"] == "ann"
    row = only_row_for(tally, fake_llm, label)
    assert row["user_id"] == "ann"
    assert properties_of(row) == {}
    totals = tally.user_totals("ann")
    assert (totals.requests, totals.input_tokens, totals.output_tokens) == (1, 5, 3)


@pytest.mark.parametrize("source", ["flask.g", "header"])
def test_identify_runs_in_the_request_context(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer, source: str
) -> None:
    demo = DemoApp(client)
    if source == "flask.g":
        tally.init_app(demo.app, identify=lambda: flask.g.get("app_user"))
        header = "x-g-user"
    else:
        tally.init_app(demo.app, identify=lambda: flask.request.headers.get("x-app-user"))
        header = "x-app-user"
    labels = {uid: unique(uid) for uid in ("ann", "bob")}
    with serve(demo.app) as url, http_client(url) as http:
        for uid, label in labels.items():
            assert http.get("/chat", params={"label": label}, headers={header: uid}).is_success
        anonymous = unique("anonymous")
        assert http.get("/chat", params={"label": anonymous}).is_success
    for uid, label in labels.items():
        assert only_row_for(tally, fake_llm, label)["user_id"] == uid
    assert only_row_for(tally, fake_llm, anonymous)["user_id"] is None


def test_flask_login_current_user_is_charged(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app)
    before, signed_in, after = unique("before"), unique("signed-in"), unique("after")
    with serve(demo.app) as url, http_client(url) as http:
        assert http.get("/chat", params={"label": before}).is_success
        assert http.post("/login/carol").is_success  # the session cookie stays in the client
        assert http.get("/chat", params={"label": signed_in}).json()["charged"] == "carol"
        assert http.post("/logout").is_success
        assert http.get("/chat", params={"label": after}).is_success
    assert only_row_for(tally, fake_llm, before)["user_id"] is None
    assert only_row_for(tally, fake_llm, signed_in)["user_id"] == "carol"
    assert only_row_for(tally, fake_llm, after)["user_id"] is None


def test_precedence_bind_user_identify_flask_login_header_request_body(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(
        demo.app,
        identify=lambda: flask.request.headers.get("x-app-user"),
        user_header="X-Gateway-User",
    )
    every_source = {
        "x-bind-user": "bound",
        "x-app-user": "identified",
        "x-gateway-user": "gateway",
        "x-safety": "from-body",
    }
    steps = [
        # (headers sent, signed in with Flask-Login, who must be charged)
        (every_source, True, "bound"),
        ({k: v for k, v in every_source.items() if k != "x-bind-user"}, True, "identified"),
        ({"x-gateway-user": "gateway", "x-safety": "from-body"}, True, "flask-user"),
        ({"x-gateway-user": "gateway", "x-safety": "from-body"}, False, "gateway"),
        ({"x-safety": "from-body"}, False, "from-body"),
        ({}, False, None),
    ]
    labels = []
    with serve(demo.app) as url, http_client(url) as http:
        for headers, signed_in, _ in steps:
            assert http.post("/login/flask-user" if signed_in else "/logout").is_success
            label = unique("precedence")
            labels.append(label)
            assert http.get("/chat", params={"label": label}, headers=headers).is_success
    charged = [only_row_for(tally, fake_llm, label)["user_id"] for label in labels]
    assert charged == [expected for _, _, expected in steps]


def test_properties_callable_and_tag_in_the_view(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(
        demo.app,
        properties=lambda: {"plan": "free", "region": flask.request.headers.get("x-region")},
    )
    plain, tagged = unique("props"), unique("tagged")
    with serve(demo.app) as url, http_client(url) as http:
        headers = {"x-bind-user": "ann", "x-region": "eu"}
        assert http.get("/chat", params={"label": plain}, headers=headers).is_success
        headers["x-tag-plan"] = "pro"
        assert http.get("/chat", params={"label": tagged}, headers=headers).is_success
    assert properties_of(only_row_for(tally, fake_llm, plain)) == {"plan": "free", "region": "eu"}
    # tag() wins over the properties callable for the same key; other keys are kept.
    assert properties_of(only_row_for(tally, fake_llm, tagged)) == {"plan": "pro", "region": "eu"}


# == 2. streamed responses =====================================================================


def _stream_cases() -> Iterable[Any]:
    for source in ("bind_user", "identify", "flask_login"):
        yield pytest.param(source, "1", id=f"{source}-stream_with_context")
        yield pytest.param(source, "0", id=f"{source}-plain_generator")


@pytest.mark.parametrize(("source", "ctx"), list(_stream_cases()))
def test_llm_call_inside_a_streamed_body_is_charged_to_the_requests_user(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer, source: str, ctx: str
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app, identify=lambda: flask.g.get("app_user"))
    label = unique(f"stream-{source}")
    headers = {"x-bind-user": "dana"} if source == "bind_user" else {}
    if source == "identify":
        headers = {"x-g-user": "dana"}
    with serve(demo.app) as url, http_client(url) as http:
        if source == "flask_login":
            assert http.post("/login/dana").is_success
        params = {"label": label, "ctx": ctx, "words": 4, "max": 6}
        response = http.get("/stream", params=params, headers=headers)
    assert response.status_code == 200
    assert response.text == "start\n" + reply_of(6) + "\nend"
    assert wait_until(lambda: label in demo.bodies_closed)
    row = only_row_for(tally, fake_llm, label)
    assert (row["input_tokens"], row["output_tokens"]) == (4, 6)
    assert row["user_id"] == "dana"


def test_properties_callable_reaches_a_call_made_in_a_plain_generator_body(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app, properties=lambda: {"region": flask.request.headers["x-region"]})
    label = unique("stream-properties")
    with serve(demo.app) as url, http_client(url) as http:
        headers = {"x-bind-user": "dana", "x-region": "eu"}
        assert http.get("/stream", params={"label": label}, headers=headers).is_success
    assert properties_of(only_row_for(tally, fake_llm, label)) == {"region": "eu"}


@dataclass(frozen=True)
class Visit:
    label: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    user: str | None
    plan: str | None


def plan_visits(rng: random.Random, count: int) -> list[Visit]:
    """Alternating users (bound, identified) and visitors with no user, over every view."""
    users = ["ann", "bob", "carol"]
    visits = []
    for i in range(count):
        kind = ("bind", "identify", "nobody")[i % 3]
        view = ("/chat", "/stream-ctx", "/stream")[(i // 3) % 3]
        label = unique(f"visit{i}")
        params = {"label": label, "words": str(rng.randint(1, 12)), "max": str(rng.randint(1, 9))}
        path = "/chat" if view == "/chat" else "/stream"
        if view == "/stream-ctx":
            params["ctx"] = "1"
        user = None if kind == "nobody" else rng.choice(users)
        plan = None if kind == "nobody" else f"plan-{i}"
        headers: dict[str, str] = {}
        if kind == "bind":
            headers = {"x-bind-user": str(user), "x-tag-plan": str(plan)}
        elif kind == "identify":
            headers = {"x-app-user": str(user), "x-tag-plan": str(plan)}
        visits.append(Visit(label, path, params, headers, user, plan))
    return visits


@pytest.mark.parametrize(
    ("threaded", "workers"), [(False, 1), (True, 16)], ids=["one-worker-thread", "concurrent"]
)
def test_nothing_leaks_to_the_next_request(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer, threaded: bool, workers: int
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app, identify=lambda: flask.request.headers.get("x-app-user"))
    visits = plan_visits(random.Random(11), 45)

    with serve(demo.app, threaded=threaded) as url, http_client(url) as http:

        def visit(v: Visit) -> tuple[Visit, int]:
            response = http.get(v.path, params=v.params, headers=v.headers)
            assert response.status_code == 200, response.text
            if v.path == "/chat":
                assert response.json()["content"] == reply_of(int(v.params["max"]))
                assert response.json()["charged"] == v.user
                return v, response.json()["thread"]
            assert response.text == "start\n" + reply_of(int(v.params["max"])) + "\nend"
            return v, int(response.headers["x-thread"])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(visit, visits))

    if not threaded:
        # Every request was served by the same worker thread, one after the other.
        assert len({thread for _, thread in done}) == 1
    rows = rows_by_label(tally, fake_llm)
    ledger = ledger_by_label(fake_llm)
    for v in visits:
        assert len(rows[v.label]) == 1, (v, rows[v.label])
        [row], [entry] = rows[v.label], ledger[v.label]
        assert_matches_ledger(row, entry)
        assert row["user_id"] == v.user, v
        assert properties_of(row) == ({"plan": v.plan} if v.plan else {}), v
    assert len(stored_rows(tally)) == len(visits)
    assert tally.user_totals(None).requests == sum(v.user is None for v in visits)


# == 3. teardown_request fires twice for a streamed response ===================================


def test_teardown_firing_twice_for_a_streamed_response_does_not_double_record(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app)
    labels = [unique("teardown") for _ in range(3)]
    with serve(demo.app) as url, http_client(url) as http:
        for label in labels:
            params = {"label": label, "ctx": "1", "pre": "1", "max": "5"}
            response = http.get("/stream", params=params, headers={"x-bind-user": "erin"})
            assert response.text == "start\n" + reply_of(5) + "\nend"
    assert wait_until(lambda: all(label in demo.bodies_closed for label in labels))
    for label in labels:
        # The scenario really happened: Flask tore this request down twice...
        assert demo.teardowns[label] == 2
        # ...and each LLM call (one in the view, one in the body) is stored exactly once.
        for call_label in (label + "-pre", label):
            assert only_row_for(tally, fake_llm, call_label)["user_id"] == "erin"
    assert len(stored_rows(tally)) == 2 * len(labels)
    assert tally.user_totals("erin").requests == 2 * len(labels)


# == 4. many users, many concurrent requests ===================================================


def test_twenty_users_ten_concurrent_requests_each_get_exact_totals(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app)
    prefix = uuid.uuid4().hex[:8]
    users = [f"{prefix}-user-{i:02d}" for i in range(20)]
    rng = random.Random(20)
    jobs = []
    for uid in users:
        for k in range(10):
            params = {
                "label": uid,
                "words": str(rng.randint(1, 25)),
                "max": str(rng.randint(1, 12)),
            }
            if k % 3 == 1:
                params["ctx"] = "1"
            jobs.append(("/chat" if k % 3 == 0 else "/stream", params, uid))
    rng.shuffle(jobs)

    with serve(demo.app) as url, http_client(url) as http:

        def run(job: tuple[str, dict[str, str], str]) -> None:
            path, params, uid = job
            response = http.get(path, params=params, headers={"x-bind-user": uid})
            assert response.status_code == 200, response.text
            expected = reply_of(int(params["max"]))
            if path == "/chat":
                assert response.json()["content"] == expected
            else:
                assert response.text == "start\n" + expected + "\nend"

        with ThreadPoolExecutor(max_workers=40) as pool:
            list(pool.map(run, jobs))

    ledger = ledger_by_label(fake_llm)
    rows = stored_rows(tally)
    assert len(rows) == len(jobs)
    assert {row["user_id"] for row in rows} == set(users), "a call was charged to a stranger"
    by_request = {e["request_id"]: e for uid in users for e in ledger[uid]}
    for row in rows:
        # The provider says which user each call was made for: that user must be charged.
        assert by_request[row["request_id"]]["label"] == row["user_id"], row
        assert_matches_ledger(row, by_request[row["request_id"]])
    for uid in users:
        entries = ledger[uid]
        assert len(entries) == 10
        totals = tally.user_totals(uid)
        assert totals.requests == 10 and totals.errors == 0 and totals.unpriced_requests == 0
        assert totals.input_tokens == sum(e["input"] for e in entries)
        assert totals.output_tokens == sum(e["output"] for e in entries)
        assert totals.cached_input_tokens == sum(e["cached"] for e in entries)
        assert totals.cost_usd == Decimal(sum(list_price_nano(e) for e in entries)) / NANO
    assert tally.stats()["open_streams"] == 0


# == 5. LLM streams still open when the response ends ==========================================


def test_relayed_llm_stream_is_aborted_when_the_client_disconnects(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer, held_streams: list[Any]
) -> None:
    demo = DemoApp(client, held_streams)
    tally.init_app(demo.app)
    label = unique("disconnect")
    closed: list[str] = []
    with serve(demo.app, closed_log=closed) as url, http_client(url) as http:
        received = b""
        request = http.build_request(
            "GET", "/relay-stall", params={"label": label}, headers={"x-bind-user": "fay"}
        )
        response = http.send(request, stream=True)
        try:
            for piece in response.iter_bytes():
                received += piece
                if received.count(b"\n") >= 3:
                    break
        finally:
            response.close()  # the client goes away mid-stream
        assert received.split(b"\n")[:3] == [b"", b"alpha", b" bravo"]
        rows = wait_for_rows(tally, fake_llm, label)
        assert wait_until(lambda: label in demo.bodies_closed)
    assert len(rows) == 1, (rows, closed, demo.bodies_closed, tally.stats())
    row = rows[0]
    assert (row["user_id"], row["status"], row["usage_source"]) == ("fay", "aborted", "estimated")
    assert row["output_tokens"] == count_text("alpha bravo", row["response_model"])
    assert held_streams, "the view's LLM stream is still referenced: only the request end saw it"
    assert tally.stats()["open_streams"] == 0


def test_llm_stream_left_open_by_a_normal_response_is_aborted_when_the_request_ends(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer, held_streams: list[Any]
) -> None:
    demo = DemoApp(client, held_streams)
    tally.init_app(demo.app)
    label = unique("peek")
    closed: list[str] = []
    with serve(demo.app, closed_log=closed) as url, http_client(url) as http:
        response = http.get("/peek", params={"label": label}, headers={"x-bind-user": "gus"})
        assert response.json() == {"first": "assistant"}
        rows = wait_for_rows(tally, fake_llm, label)
    assert len(rows) == 1, (rows, closed, tally.stats())
    assert (rows[0]["user_id"], rows[0]["status"]) == ("gus", "aborted")
    assert rows[0]["output_tokens"] == 0
    assert len(held_streams) == 1
    assert tally.stats()["open_streams"] == 0


# == 6. the /llm-usage JSON API ================================================================


@dataclass(frozen=True)
class Seed:
    user: str | None
    model: str
    input: int
    output: int
    cost: str
    ts: datetime


def _at(day: int, hour: int, minute: int = 0, micro: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, 0, micro, tzinfo=UTC)


SEEDS = [
    Seed("ann", "gpt-4o-mini", 100, 20, "0.000123456", _at(1, 9, 30, 250_000)),
    Seed("ann", "gpt-4.1", 50, 10, "0.5", _at(2, 23, 59, 999_999)),
    Seed("ann", "gpt-4o-mini", 10, 1, "0.000000001", _at(3, 0)),
    Seed("bob", "gpt-4o-mini", 1000, 500, "0.25", _at(1, 12)),
    Seed("bob", "gpt-4o-mini", 1, 1, "0.25", _at(1, 13)),
    Seed("bob", "o3-mini", 5, 5, "0.000000007", _at(3, 8)),
    # More decimals than nano-USD: stored rounded half-even to the nano-dollar.
    Seed("team/cy", "gpt-4.1", 7, 3, "3.1415926535", _at(2, 20)),
    Seed("dee", "gpt-4o-mini", 3, 0, "0", _at(3, 6)),
    Seed(None, "gpt-4o-mini", 9, 9, "1", _at(1, 10)),
]
SEED_WINDOW = {"since": "2026-03-01", "until": "2026-03-04"}


def seed_store(tally: Tally) -> None:
    for s in SEEDS:
        tally.record(
            user_id=s.user,
            model=s.model,
            input_tokens=s.input,
            output_tokens=s.output,
            cost_usd=s.cost,
            ts=s.ts,
        )


def seed_cost(seed: Seed) -> Decimal:
    return Decimal(seed.cost).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


def z_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def expected_users(
    since: datetime | None, until: datetime | None, order_by: str = "cost"
) -> list[dict[str, Any]]:
    """The /api/users rows for the seeded records alone, computed from the seeds."""
    chosen = [
        s
        for s in SEEDS
        if s.user is not None
        and (since is None or s.ts >= since)
        and (until is None or s.ts < until)
    ]
    grouped: dict[str, list[Seed]] = defaultdict(list)
    for s in chosen:
        assert s.user is not None
        grouped[s.user].append(s)
    out = []
    for uid, seeds in grouped.items():
        out.append(
            {
                "user_id": uid,
                "requests": len(seeds),
                "errors": 0,
                "input_tokens": sum(s.input for s in seeds),
                "output_tokens": sum(s.output for s in seeds),
                "cached_input_tokens": 0,
                "reasoning_tokens": 0,
                "cost_usd": sum((seed_cost(s) for s in seeds), Decimal(0)),
                "unpriced_requests": 0,
                "first_seen": z_time(min(s.ts for s in seeds)),
                "last_seen": z_time(max(s.ts for s in seeds)),
            }
        )
    keys: dict[str, Callable[[dict[str, Any]], Any]] = {
        "cost": lambda u: u["cost_usd"],
        "requests": lambda u: u["requests"],
        "tokens": lambda u: u["input_tokens"] + u["output_tokens"],
        "last_seen": lambda u: u["last_seen"],
    }
    out.sort(key=lambda u: u["user_id"])
    out.sort(key=keys[order_by], reverse=True)
    return out


def comparable(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """API user rows with the cost string checked for format and turned into a Decimal."""
    out = []
    for u in users:
        assert COST_STRING.match(u["cost_usd"]), u
        for key in ("first_seen", "last_seen"):
            assert u.get(key) is None or u[key].endswith("Z"), u
        out.append({**u, "cost_usd": Decimal(u["cost_usd"])})
    return out


def api_app(tally: Tally, client: openai.OpenAI, **options: Any) -> flask.Flask:
    """The demo app with the endpoint; identify() reads the ``x-app-user`` header."""
    demo = DemoApp(client)
    tally.init_app(demo.app, identify=lambda: flask.request.headers.get("x-app-user"), **options)
    return demo.app


def test_api_users_lists_exact_totals_sorted_and_paged(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    seed_store(tally)
    app = api_app(tally, client)
    live = {"ann": unique("api-ann"), "zed": unique("api-zed")}
    with serve(app) as url, http_client(url) as http:
        for uid, label in live.items():
            params = {"label": label, "words": 6, "max": 7}
            assert http.get("/chat", params=params, headers={"x-bind-user": uid}).is_success
        assert tally.flush(10)

        everything = http.get("/llm-usage/api/users")
        assert everything.status_code == 200
        assert everything.headers["content-type"].startswith("application/json")
        body = everything.json()
        assert set(body) == {"users", "total"}
        seeded_users = {s.user for s in SEEDS if s.user is not None}
        assert body["total"] == tally.count_users() == len(seeded_users | set(live))
        listed = comparable(body["users"])
        reference = tally.users()
        assert [u["user_id"] for u in listed] == [t.user_id for t in reference]
        for u, t in zip(listed, reference, strict=True):
            assert u["requests"] == t.requests and u["cost_usd"] == t.cost_usd
            assert (u["input_tokens"], u["output_tokens"]) == (t.input_tokens, t.output_tokens)
            assert datetime.fromisoformat(u["first_seen"]) == t.first_seen
            assert datetime.fromisoformat(u["last_seen"]) == t.last_seen
        # Live calls add exactly what the provider reported to the seeded totals.
        ledger = ledger_by_label(fake_llm)
        ann = next(u for u in listed if u["user_id"] == "ann")
        ann_seeds = [s for s in SEEDS if s.user == "ann"]
        [ann_entry] = ledger[live["ann"]]
        assert ann["requests"] == len(ann_seeds) + 1
        assert ann["input_tokens"] == sum(s.input for s in ann_seeds) + ann_entry["input"]
        assert ann["cost_usd"] == sum((seed_cost(s) for s in ann_seeds), Decimal(0)) + (
            Decimal(list_price_nano(ann_entry)) / NANO
        )

        since = datetime(2026, 3, 1, tzinfo=UTC)
        until = datetime(2026, 3, 4, tzinfo=UTC)
        for order_by in ("cost", "requests", "tokens", "last_seen"):
            page = http.get("/llm-usage/api/users", params={**SEED_WINDOW, "order_by": order_by})
            assert page.status_code == 200
            assert comparable(page.json()["users"]) == expected_users(since, until, order_by)
            assert page.json()["total"] == len(expected_users(since, until))
        orders = {
            order_by: [u["user_id"] for u in expected_users(since, until, order_by)]
            for order_by in ("cost", "requests", "tokens", "last_seen")
        }
        assert len({tuple(order) for order in orders.values()}) == 4, "seeds must tell sorts apart"

        paged = http.get("/llm-usage/api/users", params={**SEED_WINDOW, "limit": 2, "offset": 1})
        assert comparable(paged.json()["users"]) == expected_users(since, until)[1:3]
        assert paged.json()["total"] == len(expected_users(since, until))

        narrow = {"since": "2026-03-02T06:00:00Z", "until": "2026-03-03T00:00:00+00:00"}
        window = http.get("/llm-usage/api/users", params=narrow)
        start, end = datetime(2026, 3, 2, 6, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC)
        assert len(expected_users(start, end)) >= 2
        assert comparable(window.json()["users"]) == expected_users(start, end)
        assert window.json()["total"] == tally.count_users(start, end)
        assert window.json()["total"] == len(expected_users(start, end))


def test_api_user_detail_has_totals_by_model_and_daily(tally: Tally, client: openai.OpenAI) -> None:
    seed_store(tally)
    assert tally.flush(10)
    app = api_app(tally, client)
    since, until = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)
    with serve(app) as url, http_client(url) as http:
        for uid in ("ann", "bob", "team/cy", "dee"):
            detail = http.get(f"/llm-usage/api/users/{uid}", params=SEED_WINDOW)
            assert detail.status_code == 200, detail.text
            body = detail.json()
            by_model, daily = body.pop("by_model"), body.pop("daily")
            [expected] = [u for u in expected_users(since, until) if u["user_id"] == uid]
            assert comparable([body]) == [expected]
            seeds = [s for s in SEEDS if s.user == uid]

            models: dict[str, list[Seed]] = defaultdict(list)
            days: dict[date, list[Seed]] = defaultdict(list)
            for s in seeds:
                models[s.model].append(s)
                days[s.ts.date()].append(s)
            want_models = sorted(
                (
                    {
                        "model": model,
                        "requests": len(group),
                        "input_tokens": sum(s.input for s in group),
                        "output_tokens": sum(s.output for s in group),
                        "cost_usd": sum((seed_cost(s) for s in group), Decimal(0)),
                    }
                    for model, group in models.items()
                ),
                key=lambda m: (-m["cost_usd"], m["model"]),
            )
            assert comparable(by_model) == want_models
            want_days = [
                {
                    "date": day.isoformat(),
                    "requests": len(group),
                    "input_tokens": sum(s.input for s in group),
                    "output_tokens": sum(s.output for s in group),
                    "tokens": sum(s.input + s.output for s in group),
                    "cost_usd": sum((seed_cost(s) for s in group), Decimal(0)),
                }
                for day, group in sorted(days.items())
            ]
            assert comparable(daily) == want_days
            totals = tally.user_totals(uid)
            assert Decimal(detail.json()["cost_usd"]) == totals.cost_usd
            assert detail.json()["requests"] == totals.requests

        nobody = http.get("/llm-usage/api/users/nobody").json()
        assert (nobody["requests"], nobody["by_model"], nobody["daily"]) == (0, [], [])
        assert nobody["first_seen"] is None and Decimal(nobody["cost_usd"]) == 0


def test_api_me_answers_the_signed_in_user_and_ignores_authorize(
    tally: Tally, client: openai.OpenAI
) -> None:
    seed_store(tally)
    assert tally.flush(10)
    app = api_app(tally, client, authorize=lambda request: False)
    with serve(app) as url, http_client(url) as http:
        anonymous = http.get("/llm-usage/api/me")
        assert anonymous.status_code == 401
        assert "identify" in anonymous.json()["error"]
        for path in ("/llm-usage/", "/llm-usage/api/users", "/llm-usage/api/users/bob"):
            assert http.get(path).status_code == 403, path

        identified = http.get("/llm-usage/api/me", headers={"x-app-user": "bob"})
        assert identified.status_code == 200
        bob = [s for s in SEEDS if s.user == "bob"]
        assert identified.json()["requests"] == len(bob)
        assert Decimal(identified.json()["cost_usd"]) == sum(map(seed_cost, bob), Decimal(0))

        assert http.post("/login/ann").is_success
        signed_in = http.get("/llm-usage/api/me", params=SEED_WINDOW)
        assert signed_in.status_code == 200
        body = signed_in.json()
        assert body["user_id"] == "ann" and len(body["daily"]) == 3
        ann = [s for s in SEEDS if s.user == "ann"]
        assert Decimal(body["cost_usd"]) == sum(map(seed_cost, ann), Decimal(0))
        bad = http.get("/llm-usage/api/me", params={"since": "yesterday"})
        assert bad.status_code == 400 and bad.json()["error"].startswith("since")


def test_api_me_answers_for_the_user_bound_with_bind_user(
    tally: Tally, client: openai.OpenAI
) -> None:
    seed_store(tally)
    assert tally.flush(10)
    app = api_app(tally, client)
    with serve(app) as url, http_client(url) as http:
        bound = http.get("/llm-usage/api/me", headers={"x-bind-user": "bob"})
        assert bound.status_code == 200, bound.text
        assert bound.json()["user_id"] == "bob"
        # bind_user wins over identify() for the calls: /api/me must show the same user.
        both = http.get("/llm-usage/api/me", headers={"x-bind-user": "bob", "x-app-user": "ann"})
        assert both.json()["user_id"] == "bob"


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_api_default_access_is_loopback_without_a_proxy(
    tally: Tally, client: openai.OpenAI, header: str
) -> None:
    app = api_app(tally, client)
    with serve(app) as url, http_client(url) as http:
        assert http.get("/llm-usage/api/users").status_code == 200
        index = http.get("/llm-usage/")
        assert index.status_code == 200 and "api/users" in index.text
        for path in ("/llm-usage/", "/llm-usage/api/users", "/llm-usage/api/users/ann"):
            forwarded = http.get(path, headers={header: "203.0.113.7"})
            assert forwarded.status_code == 403, path
            assert "authorize" in forwarded.json()["error"]


def test_api_custom_authorize_gets_the_flask_request(tally: Tally, client: openai.OpenAI) -> None:
    seen: list[bool] = []

    def authorize(request: Any) -> bool:
        seen.append(isinstance(request, flask.Request))
        return bool(request.headers.get("x-admin") == "yes")

    app = api_app(tally, client, authorize=authorize)
    with serve(app) as url, http_client(url) as http:
        assert http.get("/llm-usage/api/users").status_code == 403
        # A custom authorize replaces the loopback rule: a proxied admin is let in.
        admin = {"x-admin": "yes", "X-Forwarded-For": "203.0.113.7"}
        assert http.get("/llm-usage/api/users", headers=admin).status_code == 200
        assert http.get("/llm-usage/api/users/ann", headers=admin).status_code == 200
    assert seen == [True, True, True]


def test_api_authorize_that_raises_denies_and_never_answers_500(
    tally: Tally, client: openai.OpenAI
) -> None:
    def authorize(request: Any) -> bool:
        raise RuntimeError("the permission service is down")

    app = api_app(tally, client, authorize=authorize)
    with serve(app) as url, http_client(url) as http:
        for path in ("/llm-usage/", "/llm-usage/api/users", "/llm-usage/api/users/ann"):
            response = http.get(path)
            assert response.status_code == 403, (path, response.text)
            assert "authorize" in response.json()["error"]
        assert http.get("/llm-usage/api/me", headers={"x-app-user": "ann"}).status_code == 200


BAD_PARAMETERS = [
    ({"limit": "0"}, "limit"),
    ({"limit": "abc"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"order_by": "money"}, "order_by"),
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01"}, "until"),
    ({"since": "2026-03-05", "until": "2026-03-01"}, "until"),
]


def test_api_bad_parameters_are_400_naming_the_parameter(
    tally: Tally, client: openai.OpenAI
) -> None:
    app = api_app(tally, client)
    with serve(app) as url, http_client(url) as http:
        for params, name in BAD_PARAMETERS:
            response = http.get("/llm-usage/api/users", params=params)
            assert response.status_code == 400, (params, response.text)
            assert response.json()["error"].startswith(f"{name}:"), (params, response.json())
        # Periods are checked on the detail routes too.
        for path in ("/llm-usage/api/users/ann", "/llm-usage/api/me"):
            response = http.get(
                path,
                params={"since": "2026-03-05", "until": "2026-03-01"},
                headers={"x-app-user": "a"},
            )
            assert response.status_code == 400 and "since" in response.json()["error"]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        pytest.param({"limit": "²"}, "limit", id="limit-superscript-two"),
        pytest.param({"offset": "①"}, "offset", id="offset-circled-one"),
    ],
)
def test_api_non_ascii_digits_are_400_not_500(
    tally: Tally, client: openai.OpenAI, params: dict[str, str], name: str
) -> None:
    app = api_app(tally, client)
    with serve(app) as url, http_client(url) as http:
        response = http.get("/llm-usage/api/users", params=params)
    assert response.status_code == 400, response.text[:200]
    assert response.json()["error"].startswith(f"{name}:")


# == 7. the same answers as the ASGI endpoint ==================================================

PARITY_QUERIES: list[tuple[str, dict[str, str], dict[str, str]]] = [
    ("/api/users", {}, {}),
    ("/api/users", {"order_by": "requests"}, {}),
    ("/api/users", {"order_by": "tokens", "limit": "2"}, {}),
    ("/api/users", {"order_by": "last_seen", "offset": "1"}, {}),
    ("/api/users", {**SEED_WINDOW, "limit": "2", "offset": "1"}, {}),
    ("/api/users", {"since": "2026-03-02T06:00:00Z", "until": "2026-03-03T00:00:00+00:00"}, {}),
    ("/api/users", {"since": "2026-03-02T06:00:00"}, {}),
    ("/api/users/ann", {}, {}),
    ("/api/users/ann", SEED_WINDOW, {}),
    ("/api/users/team/cy", {}, {}),
    ("/api/users/bob", {"until": "2026-03-02"}, {}),
    ("/api/users/nobody", {}, {}),
    ("/api/me", {}, {}),
    ("/api/me", {}, {"x-app-user": "bob"}),
    ("/api/me", {"since": "2026-03-03"}, {"x-app-user": "ann"}),
    ("/api/users", {}, {"X-Forwarded-For": "203.0.113.7"}),
    *[("/api/users", params, {}) for params, _ in BAD_PARAMETERS],
    ("/api/users/ann", {"since": "nope"}, {}),
]


@contextmanager
def both_endpoints(tally: Tally, client: openai.OpenAI) -> Iterator[tuple[str, str]]:
    """Base URLs of the Flask endpoint and of ``tally.asgi_app()`` served by uvicorn."""
    app = api_app(tally, client)
    asgi = tally.asgi_app(identify=lambda request: request.headers.get("x-app-user"))
    with serve(app) as flask_url, BackgroundServer(asgi) as asgi_server:
        yield flask_url + "/llm-usage", asgi_server.url


def test_flask_and_asgi_endpoints_answer_identically(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    seed_store(tally)
    demo = DemoApp(client)
    tally.init_app(demo.app)
    with serve(demo.app) as url, http_client(url) as http:
        for uid in ("ann", "bob", "zed"):
            params = {"label": unique(f"parity-{uid}"), "words": 3, "max": 2}
            assert http.get("/chat", params=params, headers={"x-bind-user": uid}).is_success
    assert tally.flush(10)

    with (
        both_endpoints(tally, client) as (flask_base, asgi_base),
        http_client(flask_base) as flask_http,
        http_client(asgi_base) as asgi_http,
    ):
        statuses = Counter[int]()
        for path, params, headers in PARITY_QUERIES:
            ours = flask_http.get(flask_base + path, params=params, headers=headers)
            theirs = asgi_http.get(asgi_base + path, params=params, headers=headers)
            assert ours.status_code == theirs.status_code, (path, params, ours.text, theirs.text)
            assert json.loads(ours.content) == json.loads(theirs.content), (path, params)
            statuses[ours.status_code] += 1
        assert flask_http.get(flask_base + "/").text == asgi_http.get(asgi_base + "/").text
    assert set(statuses) == {200, 400, 401, 403}
    assert statuses[200] >= 10


def test_repeated_query_parameters_are_read_the_same_by_both_endpoints(
    tally: Tally, client: openai.OpenAI
) -> None:
    seed_store(tally)
    assert tally.flush(10)
    with (
        both_endpoints(tally, client) as (flask_base, asgi_base),
        http_client(flask_base) as flask_http,
        http_client(asgi_base) as asgi_http,
    ):
        for query in ("limit=1&limit=3", "order_by=tokens&order_by=cost", "limit=0&limit=2"):
            ours = flask_http.get(f"{flask_base}/api/users?{query}")
            theirs = asgi_http.get(f"{asgi_base}/api/users?{query}")
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), query


# == 8. set-up, configuration, and plain WSGI apps =============================================


def test_init_app_twice_is_refused_and_the_tally_is_registered(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    demo = DemoApp(client)
    tally.init_app(demo.app)
    assert demo.app.extensions["llm_tally"] is tally
    middleware = demo.app.wsgi_app
    assert isinstance(middleware, LLMUsageWSGIMiddleware)
    with pytest.raises(RuntimeError, match=r"already set up on this app.*once per app"):
        tally.init_app(demo.app)
    with Tally(tally.database_url) as other, pytest.raises(RuntimeError, match="already set up"):
        other.init_app(demo.app)
    assert demo.app.wsgi_app is middleware, "a refused init_app must not wrap the app again"
    label = unique("once")
    with serve(demo.app) as url, http_client(url) as http:
        assert http.get("/chat", params={"label": label}, headers={"x-bind-user": "ann"}).is_success
    assert only_row_for(tally, fake_llm, label)["user_id"] == "ann"


def test_config_moves_the_endpoint_and_opts_in_to_the_user_header(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    configured, default = DemoApp(client), DemoApp(client)
    configured.app.config["LLM_TALLY_MOUNT_PATH"] = "/admin/usage"
    configured.app.config["LLM_TALLY_USER_HEADER"] = "X-Gateway-User"
    tally.init_app(configured.app, mount_path="/ignored")
    with Tally(tally.database_url) as second:
        second.init_app(default.app)
        labels = {}
        for name, demo in (("configured", configured), ("default", default)):
            with serve(demo.app) as url, http_client(url) as http:
                labels[name] = unique(name)
                headers = {"X-Gateway-User": "gateway-user"}
                assert http.get("/chat", params={"label": labels[name]}, headers=headers).is_success
                if demo is configured:
                    assert http.get("/admin/usage/api/users").status_code == 200
                    assert http.get("/ignored/api/users").status_code == 404
                    assert http.get("/llm-usage/api/users").status_code == 404
                    me = http.get("/admin/usage/api/me", headers=headers)
                    assert me.status_code == 200 and me.json()["user_id"] == "gateway-user"
                else:
                    assert http.get("/llm-usage/api/users").status_code == 200
                    # Not opted in: a client-sent header must not name the user.
                    assert http.get("/llm-usage/api/me", headers=headers).status_code == 401
        rows = rows_by_label(tally, fake_llm)
        assert [r["user_id"] for r in rows[labels["configured"]]] == ["gateway-user"]
        assert [r["user_id"] for r in rows[labels["default"]]] == [None]


@pytest.mark.parametrize("mount_path", ["/", "usage"])
def test_config_mount_path_is_checked_like_the_argument(
    tally: Tally, client: openai.OpenAI, mount_path: str
) -> None:
    with pytest.raises(ValueError, match="mount_path"):
        tally.init_app(DemoApp(client).app, mount_path=mount_path)
    demo = DemoApp(client)
    original = demo.app.wsgi_app
    demo.app.config["LLM_TALLY_MOUNT_PATH"] = mount_path
    with pytest.raises(ValueError, match="mount_path"):
        tally.init_app(demo.app)
    assert demo.app.wsgi_app == original and "llm_tally" not in demo.app.extensions


def make_bare_wsgi_app(
    client: openai.OpenAI, closed: list[str], held: list[Any]
) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """A WSGI callable with no framework: query string ``label=...&kind=...&max=...``."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        args = dict(pair.split("=", 1) for pair in environ["QUERY_STRING"].split("&"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        if args["kind"] == "list":
            return [b"list:", chat_call(client, args).encode()]
        if args["kind"] == "peek":
            llm = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "peek"}],
                stream=True,
                extra_headers={"x-test-label": args["label"], "x-fake-stall-after": "2"},
            )
            held.append(llm)
            next(iter(llm))
            return [b"peeked"]

        def body() -> Iterator[bytes]:
            try:
                yield b"head|"
                for piece in chat_stream(client, args):
                    yield piece.encode()
                yield b"|tail"
            finally:
                closed.append(args["label"])

        return body()

    return app


def test_wsgi_middleware_around_a_bare_wsgi_app(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer, held_streams: list[Any]
) -> None:
    closed: list[str] = []
    app = LLMUsageWSGIMiddleware(
        make_bare_wsgi_app(client, closed, held_streams),
        tally=tally,
        identify=lambda environ: environ.get("HTTP_X_APP_USER"),
        properties=lambda environ: {"plan": environ.get("HTTP_X_PLAN")},
    )
    labels = {kind: unique(f"bare-{kind}") for kind in ("generator", "list", "nobody", "peek")}
    served_closed: list[str] = []
    with serve(app, closed_log=served_closed) as url, http_client(url) as http:
        user = {"x-app-user": "hal", "x-plan": "team"}
        streamed = http.get(f"/?label={labels['generator']}&kind=generator&max=7", headers=user)
        assert streamed.text == "head|" + reply_of(7) + "|tail"
        listed = http.get(f"/?label={labels['list']}&kind=list&max=2", headers=user)
        assert listed.text == "list:" + reply_of(2)
        assert http.get(f"/?label={labels['nobody']}&kind=generator&max=1").is_success
        assert http.get(f"/?label={labels['peek']}&kind=peek", headers=user).text == "peeked"
        peeked = wait_for_rows(tally, fake_llm, labels["peek"])
    assert wait_until(lambda: {labels["generator"], labels["nobody"]} <= set(closed))
    for kind in ("generator", "list"):
        row = only_row_for(tally, fake_llm, labels[kind])
        assert (row["user_id"], properties_of(row)) == ("hal", {"plan": "team"})
    nobody = only_row_for(tally, fake_llm, labels["nobody"])
    assert (nobody["user_id"], properties_of(nobody)) == (None, {})
    assert [(r["user_id"], r["status"]) for r in peeked] == [("hal", "aborted")], (
        served_closed,
        tally.stats(),
    )


# == 9. the app's callables failing ============================================================


def test_failing_identify_properties_and_authorize_never_break_a_flask_request(
    tally: Tally, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    def explode(*args: Any) -> Any:
        raise RuntimeError("app code failed")

    demo = DemoApp(client)
    tally.init_app(demo.app, identify=explode, properties=explode, authorize=explode)
    anonymous, signed_in, tagged = unique("fail-anon"), unique("fail-login"), unique("fail-tag")
    with serve(demo.app) as url, http_client(url) as http:
        response = http.get("/chat", params={"label": anonymous, "max": 3})
        assert response.status_code == 200 and response.json()["content"] == reply_of(3)
        streamed = http.get("/stream", params={"label": unique("fail-stream"), "ctx": "1"})
        assert streamed.status_code == 200 and streamed.text.endswith("\nend")
        assert http.post("/login/ivy").is_success
        # identify() failing falls through to the next source: Flask-Login.
        assert http.get("/chat", params={"label": signed_in}).json()["charged"] == "ivy"
        headers = {"x-tag-plan": "pro"}
        assert http.get("/chat", params={"label": tagged}, headers=headers).is_success
        assert http.get("/llm-usage/api/users").status_code == 403
        me = http.get("/llm-usage/api/me")
        assert me.status_code == 200 and me.json()["user_id"] == "ivy"
    assert (only_row_for(tally, fake_llm, anonymous)["user_id"]) is None
    row = only_row_for(tally, fake_llm, signed_in)
    assert (row["user_id"], properties_of(row)) == ("ivy", {})
    assert properties_of(only_row_for(tally, fake_llm, tagged)) == {"plan": "pro"}


def _raise(environ: Any) -> Any:
    raise RuntimeError("app code failed")


@pytest.mark.parametrize(
    ("identify", "properties"),
    [
        pytest.param(_raise, _raise, id="raising"),
        pytest.param(lambda e: "x" * 300, lambda e: {"plan": "x" * 300}, id="invalid-values"),
        pytest.param(lambda e: "", lambda e: ["not", "a", "dict"], id="wrong-types"),
    ],
)
def test_failing_callables_never_break_a_plain_wsgi_request(
    tally: Tally,
    client: openai.OpenAI,
    fake_llm: FakeServer,
    held_streams: list[Any],
    identify: Callable[[Any], Any],
    properties: Callable[[Any], Any],
) -> None:
    closed: list[str] = []
    app = LLMUsageWSGIMiddleware(
        make_bare_wsgi_app(client, closed, held_streams),
        tally=tally,
        identify=identify,
        properties=properties,
    )
    labels = [unique("bare-failing") for _ in range(2)]
    with serve(app) as url, http_client(url) as http:
        response = http.get(f"/?label={labels[0]}&kind=generator&max=4")
        assert response.status_code == 200
        assert response.text == "head|" + reply_of(4) + "|tail"
        response = http.get(f"/?label={labels[1]}&kind=list&max=2")
        assert (response.status_code, response.text) == (200, "list:" + reply_of(2))
    for label in labels:
        row = only_row_for(tally, fake_llm, label)
        assert (row["user_id"], properties_of(row)) == (None, {})

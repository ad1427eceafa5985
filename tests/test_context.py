"""Who a call is charged to: user(), bind_user(), tag(), Helicone headers, request-body ids."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

import llm_tally
from llm_tally import Tally

from .conftest import FakeServer, only_row, stored_rows

MESSAGES = [{"role": "user", "content": "hello"}]


def chat(client: openai.OpenAI, **kwargs: object) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kwargs)  # type: ignore[call-overload]


def test_call_outside_any_context_has_no_user(tally: Tally, client: openai.OpenAI) -> None:
    chat(client)
    row = only_row(tally)
    assert row["user_id"] is None and row["properties"] == {}
    assert tally.user_totals(None).requests == 1


def test_nested_contexts_inherit_and_restore(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user("outer", plan="free", feature="chat"):
        with llm_tally.user("inner", plan="pro"):
            assert llm_tally.current_user_id() == "inner"
            chat(client)
        chat(client)
    assert llm_tally.current_user_id() is None
    inner, outer = stored_rows(tally)
    assert inner["user_id"] == "inner"
    assert inner["properties"] == {"plan": "pro", "feature": "chat"}
    assert outer["user_id"] == "outer"
    assert outer["properties"] == {"plan": "free", "feature": "chat"}


def test_bind_user_and_tag_change_the_open_context(tally: Tally, client: openai.OpenAI) -> None:
    with llm_tally.user(None, plan="free"):
        chat(client)
        llm_tally.bind_user("late-user")
        llm_tally.tag(feature="search", plan="pro")
        chat(client)
        llm_tally.tag(feature=None)
        chat(client)
    first, second, third = stored_rows(tally)
    assert first["user_id"] is None and first["properties"] == {"plan": "free"}
    assert second["user_id"] == "late-user"
    assert second["properties"] == {"plan": "pro", "feature": "search"}
    assert third["properties"] == {"plan": "pro"}


def test_bind_user_in_a_worker_thread_reaches_the_caller(
    tally: Tally, client: openai.OpenAI
) -> None:
    # What a sync FastAPI dependency does: runs in a thread pool with a *copy* of the context.
    with llm_tally.user(None):
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(ctx.run, llm_tally.bind_user, "from-dependency").result()
        chat(client)
    assert only_row(tally)["user_id"] == "from-dependency"


def test_bind_user_outside_a_context_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"llm_tally.user"):
        llm_tally.bind_user("u1")
    with pytest.raises(RuntimeError, match=r"middleware"):
        llm_tally.tag(plan="pro")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "x" * 300}, "user_id"),
        ({"user_id": "bad\nid"}, "user_id"),
        ({"user_id": 1.5}, "user_id"),
        ({"user_id": "u", "plan": object()}, "plan"),
        ({"user_id": "u", "plan": "p" * 300}, "plan"),
    ],
)
def test_bad_user_or_properties_are_rejected_with_the_field_named(
    kwargs: dict[str, object], field: str
) -> None:
    user_id = kwargs.pop("user_id")
    with pytest.raises(ValueError, match=field):
        llm_tally.user(user_id, **kwargs)  # type: ignore[arg-type]


def test_int_user_ids_and_property_values_are_stored_as_text(
    tally: Tally, client: openai.OpenAI
) -> None:
    with llm_tally.user(42, seats=3, trial=True):
        chat(client)
    row = only_row(tally)
    assert row["user_id"] == "42" and row["properties"] == {"seats": "3", "trial": "True"}


async def test_async_tasks_inherit_the_context(tally: Tally, aclient: openai.AsyncOpenAI) -> None:
    async def one() -> None:
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]

    async with llm_tally.user("async-u", plan="team"):
        await asyncio.gather(one(), one(), one())
    rows = stored_rows(tally)
    assert [r["user_id"] for r in rows] == ["async-u"] * 3
    assert all(r["properties"] == {"plan": "team"} for r in rows)


def test_helicone_headers_set_user_and_properties_and_never_leave(tally: Tally) -> None:
    seen: list[httpx2.Headers] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers)
        return httpx2.Response(
            200,
            json={
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o-mini",
                "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    c = openai.OpenAI(
        api_key="k",
        default_headers={"Helicone-Property-Team": "core", "X-Keep": "yes"},
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with llm_tally.user("context-user", plan="free"):
        chat(
            c,
            extra_headers={
                "Helicone-User-Id": "helicone-user",
                "Helicone-Property-Plan": "enterprise",
                "helicone-property-feature": "summarize",
                "X-Other": "kept",
            },
        )
        chat(c)
    first, second = stored_rows(tally)
    assert first["user_id"] == "helicone-user"
    assert first["properties"] == {
        "plan": "enterprise",
        "feature": "summarize",
        "team": "core",
    }
    assert second["user_id"] == "context-user"
    assert second["properties"] == {"plan": "free", "team": "core"}
    for headers in seen:
        assert not [k for k in headers if k.lower().startswith("helicone-")]
        assert headers["x-keep"] == "yes"
    assert seen[0]["x-other"] == "kept"


def test_safety_identifier_or_user_field_is_the_user_when_none_is_bound(
    tally: Tally, client: openai.OpenAI
) -> None:
    chat(client, safety_identifier="hashed-abc")
    chat(client, user="legacy-user")
    with llm_tally.user("bound"):
        chat(client, safety_identifier="ignored")
    rows = stored_rows(tally)
    assert [r["user_id"] for r in rows] == ["hashed-abc", "legacy-user", "bound"]


def test_a_call_is_recorded_by_the_tally_bound_to_its_context(
    tmp_path: object, client: openai.OpenAI, fake_llm: FakeServer
) -> None:
    first = Tally(f"sqlite:///{tmp_path}/first.db")
    second = Tally(f"sqlite:///{tmp_path}/second.db")
    try:
        assert llm_tally.default_tally() is first
        with llm_tally.user("a"):
            chat(client)
        with llm_tally.user("b", tally=second):
            chat(client)
            with llm_tally.user("c"):  # nested: inherits the outer block's tally
                chat(client)
        assert [r["user_id"] for r in stored_rows(first)] == ["a"]
        assert [r["user_id"] for r in stored_rows(second)] == ["b", "c"]
        first.close()
        assert llm_tally.default_tally() is second
        chat(client)
        assert len(stored_rows(second)) == 3
    finally:
        first.close()
        second.close()


def test_no_tally_means_nothing_is_recorded_and_nothing_changes(client: openai.OpenAI) -> None:
    assert llm_tally.default_tally() is None
    with llm_tally.user("u1"):
        result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert result.usage is not None

"""Installing into the OpenAI SDK: once per process, undone explicitly, loud if the SDK moves."""

from __future__ import annotations

import logging

import openai
import pytest
from openai._base_client import AsyncAPIClient, SyncAPIClient

import llm_tally
from llm_tally import Tally
from llm_tally._internal import internal_error_counts, set_raise_internal_errors
from llm_tally.integrations import openai as integration

from .conftest import stored_rows

MESSAGES = [{"role": "user", "content": "hello"}]


def test_the_sdk_funnel_llm_tally_relies_on_still_exists() -> None:
    # If a new SDK release renames these, this fails before users lose records silently.
    for cls in (SyncAPIClient, AsyncAPIClient):
        for name in ("request", "_process_response"):
            assert name in cls.__dict__, f"{cls.__name__}.{name} moved: update the integration"
    assert (
        hasattr(openai.Stream, "__stream__")
        or "_iterator" in openai.Stream.__init__.__code__.co_names
    )


def test_creating_a_tally_instruments_and_closing_the_last_undoes(
    db_url: str, tmp_path: object
) -> None:
    original = SyncAPIClient.__dict__["request"]
    first = Tally(db_url)
    assert llm_tally.is_openai_instrumented()
    wrapped = SyncAPIClient.__dict__["request"]
    assert wrapped is not original
    second = Tally(f"sqlite:///{tmp_path}/other.db")
    assert SyncAPIClient.__dict__["request"] is wrapped  # not wrapped twice
    first.close()
    assert llm_tally.is_openai_instrumented()
    second.close()
    assert not llm_tally.is_openai_instrumented()
    assert SyncAPIClient.__dict__["request"] is original
    assert AsyncAPIClient.__dict__["request"] is integration._originals.get(
        (AsyncAPIClient, "request"), AsyncAPIClient.__dict__["request"]
    )


def test_instrument_twice_is_a_no_op_and_uninstrument_is_explicit(
    db_url: str, client: openai.OpenAI
) -> None:
    assert llm_tally.instrument_openai() is True
    assert llm_tally.instrument_openai() is False
    with Tally(db_url, instrument=False) as tally:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert len(stored_rows(tally)) == 1
        assert llm_tally.uninstrument_openai() is True
        assert llm_tally.uninstrument_openai() is False
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert len(stored_rows(tally)) == 1  # nothing recorded once undone


def test_an_internal_bug_never_breaks_the_call(
    db_url: str, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Production mode: our own failure is logged once, counted, and the call goes on."""
    set_raise_internal_errors(False)
    original = integration._Call.observe_result

    def broken(self: object, result: object) -> None:
        raise RuntimeError("simulated llm-tally bug")

    integration._Call.observe_result = broken  # type: ignore[method-assign]
    try:
        with (
            Tally(db_url),
            caplog.at_level(logging.ERROR, logger="llm_tally"),
            llm_tally.user("u1"),
        ):
            results = [
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                for _ in range(3)
            ]
    finally:
        integration._Call.observe_result = original  # type: ignore[method-assign]
        set_raise_internal_errors(True)
    assert all(r.choices[0].message.content for r in results)
    assert internal_error_counts["observe result"] == 3
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 1

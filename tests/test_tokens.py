"""tiktoken offline: never a download; the shipped vocabulary seeds tiktoken's cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llm_tally import _tokens


def run_isolated(code: str, cache_dir: str) -> str:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": cache_dir}
    # No network here anyway; make any download attempt fail fast and visibly.
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


def test_vocabulary_is_seeded_from_the_shipped_copy(tmp_path: object) -> None:
    out = run_isolated(
        """
        import os
        from llm_tally import _tokens
        enc = _tokens.load_encoding("o200k_base")
        cached = os.listdir(os.environ["TIKTOKEN_CACHE_DIR"])
        print(enc is not None, _tokens.count_text("hello world", "gpt-4o"), len(cached))
        """,
        str(tmp_path),
    )
    assert out == "True 2 1"


def test_unavailable_vocabulary_falls_back_to_a_heuristic(tmp_path: object) -> None:
    out = run_isolated(
        """
        import llm_tally._tokens as t
        url, _ = t._VOCABULARIES["o200k_base"]
        t._VOCABULARIES["o200k_base"] = (url, "0" * 64)  # so that nothing verifies
        print(t.load_encoding("o200k_base"), t.count_text("x" * 40, "gpt-4o"))
        """,
        str(tmp_path),
    )
    assert out == "None 10"


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        (None, "o200k_base"),
        ("unknown-model", "o200k_base"),
    ],
)
def test_encoding_choice(model: str | None, name: str) -> None:
    assert _tokens.encoding_name_for_model(model) == name


def test_chat_prompt_counts_message_overhead() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    count = _tokens.count_text
    text_only = count("be brief", "gpt-4o") + count("hi", "gpt-4o")
    roles = count("system", "gpt-4o") + count("user", "gpt-4o")
    assert _tokens.count_prompt(messages, "gpt-4o") == text_only + roles + 3 * 2 + 3

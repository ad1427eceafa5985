"""User ids and properties: any input is stored as documented or refused (docs/security.md).

The rules are written here a second time, from the table in docs/security.md, as a plain
oracle; hypothesis then throws arbitrary values (text of any Unicode category, ints of any
size, floats, bytes, other objects) at every place a value comes in:

- bound by the app (``user()``, ``bind_user()``, ``tag()``, ``record()``): stored as the
  oracle says, or a ``ValueError`` that names the field;
- given by the app's callables or a request (``identify``, a ``Helicone-User-Id`` header):
  taken as the oracle says, or ignored; the request and the LLM call never fail;
- stored and read back through SQL: verbatim, quotes, ``%`` and ``--`` included.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import llm_tally
from llm_tally import Tally
from llm_tally._validation import (
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY_LENGTH,
    MAX_PROPERTY_VALUE_LENGTH,
    MAX_USER_ID_LENGTH,
    check_properties,
    check_user_id,
)

from .conftest import stored_rows
from .web_support import starlette_app

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# -- the documented rules, written independently -----------------------------------------------


def printable(text: str) -> bool:
    # Not str.isprintable(), to be an independent statement of the same rule.
    import unicodedata

    return all(ch == " " or unicodedata.category(ch)[0] not in "CZ" for ch in text)


def expected_user_id(value: object) -> str | None:
    """The stored id, or raise AssertionError for an id the docs say is refused."""
    if value is None:
        return None
    assert not isinstance(value, bool) and isinstance(value, str | int), "type"
    text = value if isinstance(value, str) else _int_text(value)
    assert 1 <= len(text) <= MAX_USER_ID_LENGTH, "length"
    assert printable(text), "printable"
    return text


def _int_text(value: int) -> str:
    digits = len(str(abs(value))) if abs(value) < 10**4000 else 4001
    assert digits < 4000, "length"
    return str(value)


def expected_properties(values: dict[Any, Any]) -> dict[str, str]:
    assert len(values) <= MAX_PROPERTIES, "count"
    stored = {}
    for key, value in values.items():
        assert isinstance(key, str) and 1 <= len(key) <= MAX_PROPERTY_KEY_LENGTH, "key"
        assert printable(key) and '"' not in key and "\\" not in key, "key chars"
        if value is None:
            continue
        assert isinstance(value, str | int | float | bool), "value type"
        text = (
            _int_text(value)
            if isinstance(value, int) and not isinstance(value, bool)
            else str(value)
        )
        assert len(text) <= MAX_PROPERTY_VALUE_LENGTH and printable(text), "value"
        stored[key] = text
    return stored


def outcome(oracle: Any, value: Any) -> Any:
    try:
        return ("ok", oracle(value))
    except AssertionError:
        return ("refused", None)


# -- values to throw ---------------------------------------------------------------------------

# Every Unicode category, surrogates included, and the characters markup and SQL care about.
text = st.one_of(
    st.text(max_size=300),
    st.text(st.characters(codec=None), max_size=20),
    st.text(st.sampled_from("<>\"'\\%_;-=+@ \t\n\r\x00\u202e\u200d\ufeff\ud800a"), max_size=12),
    st.just("a" * MAX_USER_ID_LENGTH),
    st.just("a" * (MAX_USER_ID_LENGTH + 1)),
)
anything = st.one_of(
    text,
    st.integers(),
    st.just(10**5000),
    st.booleans(),
    st.floats(),
    st.binary(max_size=8),
    st.none(),
    st.builds(object),
    st.lists(st.integers(), max_size=2),
)
properties = st.dictionaries(
    st.one_of(st.text(max_size=70), st.integers()),
    st.one_of(
        text,
        st.integers(),
        st.just(-(10**5000)),
        st.floats(),
        st.booleans(),
        st.none(),
        st.binary(max_size=4),
    ),
    max_size=4,
) | st.dictionaries(
    st.from_regex(r"k[0-9]{1,3}", fullmatch=True), st.just("v"), min_size=60, max_size=70
)


# -- bound by the app: stored as documented, or a ValueError naming the field -----------------


@given(value=anything)
@SETTINGS
def test_a_user_id_is_stored_as_documented_or_refused_naming_the_field(value: Any) -> None:
    expected = outcome(expected_user_id, value)
    try:
        got = ("ok", check_user_id(value, "user_id"))
    except ValueError as exc:
        assert str(exc).startswith("user_id"), exc
        got = ("refused", None)
    assert got == expected


@given(value=properties)
@SETTINGS
def test_properties_are_stored_as_documented_or_refused_naming_the_field(value: Any) -> None:
    expected = outcome(expected_properties, value)
    try:
        got = ("ok", check_properties(value, "properties"))
    except ValueError as exc:
        assert str(exc).startswith("properties"), exc
        got = ("refused", None)
    assert got == expected


@given(user_id=anything, props=properties)
@SETTINGS
def test_user_bind_user_and_tag_follow_the_same_rules(user_id: Any, props: Any) -> None:
    user_ok = outcome(expected_user_id, user_id)
    # (Keys that are user()'s own parameter names cannot be passed as properties.)
    string_keys = {
        k: v for k, v in props.items() if isinstance(k, str) and k not in ("tally", "user_id")
    }
    props_ok = outcome(expected_properties, string_keys)
    try:
        with llm_tally.user(user_id) as bound:
            assert user_ok[0] == "ok"
            assert bound.user_id == user_ok[1]
    except ValueError as exc:
        assert user_ok[0] == "refused" and "user_id" in str(exc)
    with llm_tally.user("outer"):
        try:
            llm_tally.bind_user(user_id)
            assert llm_tally.current_user_id() == user_ok[1] or user_ok[1] is None
        except ValueError as exc:
            assert user_ok[0] == "refused" and "user_id" in str(exc)
            assert llm_tally.current_user_id() == "outer", "a refused id changes nothing"
        try:
            llm_tally.tag(**string_keys)
            assert props_ok[0] == "ok"
            with llm_tally.user(None) as inner:
                assert inner.properties == props_ok[1]
        except ValueError as exc:
            assert props_ok[0] == "refused" and "properties" in str(exc)
        try:
            with llm_tally.user("u", **string_keys) as block:
                assert props_ok[0] == "ok" and block.properties == props_ok[1]
        except ValueError as exc:
            assert props_ok[0] == "refused" and "properties" in str(exc)


# -- from the app's callables and from requests: taken as documented, or ignored ---------------


@pytest.fixture
def quiet_app(tally: Tally) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    given_back: dict[str, Any] = {}
    app = starlette_app(tally, identify=lambda request: given_back["value"])
    with TestClient(app) as client:
        yield client, given_back


def test_identify_results_are_taken_as_documented_or_ignored(
    quiet_app: tuple[TestClient, dict[str, Any]],
) -> None:
    client, given_back = quiet_app

    @given(value=anything)
    @SETTINGS
    def ask(value: Any) -> None:
        given_back["value"] = value
        # What identify gives: an id, any object's str() (not bytes, not a bool), or nothing.
        if isinstance(value, bytes) or value in ("", None) or isinstance(value, bool):
            expected: Any = ("refused", None)
        else:
            as_id = value if isinstance(value, str | int) else str(value)
            expected = outcome(expected_user_id, as_id)
        response = client.get("/llm-usage/api/me")
        if expected[0] == "ok":
            assert response.status_code == 200, response.text
            assert response.json()["user_id"] == expected[1]
        else:
            assert response.status_code == 401, response.text

    ask()


def test_helicone_headers_are_taken_as_documented_or_ignored_and_never_sent(
    tally: Tally,
) -> None:
    sent: list[dict[str, str]] = []

    def provider(request: httpx2.Request) -> httpx2.Response:
        sent.append(dict(request.headers))
        body = {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return httpx2.Response(200, json=body)

    client = openai.OpenAI(
        api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(provider))
    )
    seen = 0

    @given(user_id=text, plan=text)
    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def call(user_id: str, plan: str) -> None:
        nonlocal seen
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"Helicone-User-Id": user_id, "Helicone-Property-Plan": plan},
        )
        seen += 1
        row = stored_rows(tally)[-1]
        if user_id == "":
            assert row["user_id"] is None
        else:
            assert row["user_id"] == outcome(expected_user_id, user_id)[1]
        plan_ok = outcome(expected_properties, {"plan": plan})
        assert row["properties"] == (plan_ok[1] if plan_ok[0] == "ok" else {})

    call()
    assert len(sent) == seen > 0
    assert not [k for headers in sent for k in headers if k.lower().startswith("helicone-")]


# -- through SQL and back: verbatim ------------------------------------------------------------

BUILT_IN = ("user", "model", "provider", "operation")
stored_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("C", "Z")) | st.sampled_from("'\"%_;- "),
    min_size=1,
    max_size=40,
)


def test_ids_and_properties_come_back_from_sql_verbatim(tally: Tally) -> None:
    keys = stored_text.filter(lambda k: '"' not in k and "\\" not in k and k not in BUILT_IN)

    @given(user_id=stored_text, key=keys, value=stored_text)
    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def round_trip(user_id: str, key: str, value: str) -> None:
        before = tally.user_totals(user_id).requests
        tally.record(user_id=user_id, model="m", properties={key: value}, cost_usd="0.01")
        assert tally.flush(10)
        assert tally.user_totals(user_id).requests == before + 1
        assert value in {group.value for group in tally.totals_by(key)}
        assert tally.has_property(key)

    round_trip()
    with tally.engine.connect() as conn:
        tables = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")
        assert "llm_tally_usage" in {name for (name,) in tables}


SQL_VALUES = ("x'); DROP TABLE llm_tally_usage; --", "%", "_", "a' OR '1'='1", '"', "\\x", "$1")


@pytest.mark.postgres
def test_sql_metacharacters_come_back_from_postgres_verbatim(pg_url: str) -> None:
    with Tally(pg_url) as tally:
        for value in SQL_VALUES:
            key = value.replace('"', "q").replace("\\", "b")
            tally.record(user_id=value, model=value, properties={key: value}, cost_usd="0.01")
        assert tally.flush(10)
        users = {u.user_id for u in tally.users(limit=100)}
        assert users == set(SQL_VALUES)
        for value in SQL_VALUES:
            key = value.replace('"', "q").replace("\\", "b")
            assert tally.user_totals(value).cost_usd == Decimal("0.01")
            # The other calls have no such property: the None group.
            assert [g.value for g in tally.totals_by(key)] == [None, value]

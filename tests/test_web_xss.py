"""Stored XSS and CSV injection: hostile values in the store, rendered by every dashboard page.

User ids, property keys and values, model, provider and operation names, error types and
request ids hold ``<script>``, attribute breakouts, ``javascript:`` URLs, look-alike Unicode
and spreadsheet formulas (see :mod:`.web_support`). Every dashboard page of the OpenAPI
document, and the 400 page that quotes a bad parameter, is checked:

- in the HTML: no element or attribute the dashboard does not write itself, no event
  handler, no ``javascript:`` link, and each hostile value present as text;
- in Debian's Chromium: no dialog, no console error, no request besides the page itself,
  first as served (with its Content-Security-Policy) and then with the policy stripped, so
  that escaping alone is what keeps the page inert.

The CSV export and ``llm-tally export`` / ``report --format csv`` write no cell that a
spreadsheet would evaluate.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, urlencode

import httpx2
import pytest

from llm_tally import Tally
from llm_tally.cli import main as cli_main
from llm_tally.web.openapi import document
from llm_tally.web.routes import ROUTES

from .test_dashboard import needs_chromium, servers
from .web_support import (
    ATTR_USER,
    EVIL_FEATURE,
    EVIL_KEY,
    EVIL_MODEL,
    EVIL_OPERATION,
    EVIL_PLAN,
    EVIL_REQUEST_ID,
    EVIL_USERS,
    EVIL_VALUE,
    FORMULA_USER,
    JS_USER,
    MOUNT,
    XSS_USER,
    seed,
)

# Every element the dashboard's own templates write.
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "a", "header", "nav", "main", "footer",
    "h1", "h2", "p", "span", "section", "table", "caption", "thead", "tbody", "tr", "th", "td",
    "dl", "div", "dt", "dd", "form", "label", "input", "button", "ul", "li", "details",
    "summary", "figure", "svg", "rect", "line", "text", "time",
}  # fmt: skip
URL_ATTRIBUTES = {"href", "action", "src", "xlink:href", "formaction"}


class Markup(HTMLParser):
    """Every element, attribute and text of a page, as a browser's parser sees them."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str]] = []
        self.texts: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(tag, name, value or "") for name, value in attrs]

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def assert_inert(page: str, shown: tuple[str, ...]) -> None:
    markup = Markup(page)
    assert set(markup.tags) <= ALLOWED_TAGS, set(markup.tags) - ALLOWED_TAGS
    assert markup.tags.count("style") == 1 and markup.tags.count("script") == 0
    for tag, name, value in markup.attributes:
        assert not name.startswith("on"), (tag, name, value)
        assert name != "style", (tag, name, value)
        if name in URL_ATTRIBUTES:
            scheme = re.sub(r"[\x00-\x20]", "", value).lower().split(":", 1)
            # Relative links only: a ':' may appear only after the first '/', '?' or '#'.
            assert len(scheme) == 1 or re.search(r"[/?#]", scheme[0]), (tag, name, value)
    csp = [v for t, n, v in markup.attributes if t == "meta" and n == "content" and "script" in v]
    assert csp == [] or all("default-src 'none'" in v for v in csp)
    for value in shown:
        assert value in markup.text, f"{value!r} is not shown as text"


def dashboard_pages() -> list[tuple[str, tuple[str, ...]]]:
    """(URL path and query, the hostile values it must show as text) for every dashboard page
    of the OpenAPI document, each user's page, and pages that echo hostile parameters."""
    pages: list[tuple[str, tuple[str, ...]]] = []
    html = [r for r in ROUTES if r.media_type.startswith("text/html")]
    assert {r.path for r in html} == {
        p for p, item in document()["paths"].items() if "dashboard" in item["get"]["tags"]
    }
    all_time = urlencode({"period": "all"})
    for route in html:
        if "{user_id}" not in route.path:
            shown = (XSS_USER, ATTR_USER, EVIL_PLAN) if route.path == "/" else (XSS_USER,)
            pages.append((f"{MOUNT}{route.path}?{all_time}", shown))
            continue
        for user in EVIL_USERS:
            path = route.path.replace("{user_id}", quote(user, safe=""))
            pages.append((f"{MOUNT}{path}?{all_time}", (user, EVIL_MODEL, EVIL_VALUE)))
    echoed = {"period": "all", "q": "<", "property": EVIL_KEY, "value": EVIL_VALUE}
    pages.append((f"{MOUNT}/?{urlencode(echoed)}", (EVIL_KEY, EVIL_VALUE, XSS_USER)))
    pages.append((f"{MOUNT}/?{urlencode({'q': XSS_USER, 'period': 'all'})}", (XSS_USER,)))
    return pages


PAGES = dashboard_pages()
# Bad parameters, echoed by the 400 page.
ERROR_PAGES = (
    f"{MOUNT}/?{urlencode({'since': XSS_USER})}",
    f"{MOUNT}/?{urlencode({'order_by': ATTR_USER})}",
    f"{MOUNT}/users/{quote(JS_USER, safe='')}?{urlencode({'period': EVIL_FEATURE})}",
    f"{MOUNT}/anomalies?{urlencode({'until': EVIL_OPERATION})}",
)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tally]:
    with Tally(f"sqlite:///{tmp_path_factory.mktemp('xss') / 'usage.db'}") as tally:
        seed(tally)
        yield tally


@pytest.fixture(autouse=True)
def _no_leftover_tallies() -> Iterator[None]:
    # The module's store outlives each test (conftest's check would close it in between).
    yield


def test_every_dashboard_page_shows_hostile_values_as_inert_text(hostile: Tally) -> None:
    with servers(hostile) as urls:
        for framework, url in urls.items():
            with httpx2.Client(base_url=url, timeout=30) as http:
                for path, shown in PAGES:
                    response = http.get(path)
                    assert response.status_code == 200, (framework, path)
                    assert response.headers["content-type"].startswith("text/html")
                    assert "script-src" not in response.headers["content-security-policy"]
                    assert "default-src 'none'" in response.headers["content-security-policy"]
                    assert response.headers["x-content-type-options"] == "nosniff"
                    assert_inert(response.text, shown)
                for path in ERROR_PAGES:
                    response = http.get(path)
                    assert response.status_code == 400, (framework, path)
                    assert_inert(response.text, ())


def test_the_html_check_catches_markup_that_got_through() -> None:
    """The checker itself: each way a value could escape is caught."""
    clean = "<html><head><style></style></head><body><p>&lt;script&gt;</p></body></html>"
    assert_inert(clean, ("<script>",))
    for leak in (
        "<script>alert(1)</script>",
        '<img src=x onerror="alert(1)">',
        '<a href="javascript:alert(1)">x</a>',
        '<a href=" java\tscript:alert(1)">x</a>',
        '<p onmouseover="alert(1)">x</p>',
        '<span style="background:url(javascript:alert(1))">x</span>',
    ):
        with pytest.raises(AssertionError):
            assert_inert(clean.replace("<p>", leak + "<p>"), ())


# -- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    from .test_dashboard import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Watched:
    """A browser tab that notes every dialog, console error, page error and request."""

    def __init__(self, browser: Any, strip_csp: bool) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.events: list[str] = []
        self.requests: list[str] = []
        self.url = ""
        self.page.on("dialog", self._dialog)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.events.append(f"error: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        if strip_csp:
            self.page.route("**/*", self._without_csp)

    def _console(self, message: Any) -> None:
        # The browser asks for /favicon.ico by itself (the endpoint serves none), and notes the
        # status of a 400 page: neither is something a page ran.
        url = message.location.get("url", "")
        if url.endswith("/favicon.ico") or (
            url == self.url and message.text.startswith("Failed to load resource")
        ):
            return
        self.events.append(f"console {message.type}: {message.text} {message.location}")

    def _dialog(self, dialog: Any) -> None:
        self.events.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    @staticmethod
    def _without_csp(route: Any) -> None:
        response = route.fetch()
        body = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", response.text())
        headers = {
            k: v for k, v in response.headers.items() if k.lower() != "content-security-policy"
        }
        route.fulfill(response=response, body=body, headers=headers)

    def visit(self, url: str) -> None:
        self.url = url
        self.requests.clear()
        self.page.goto(url)
        # Hover, focus and animate everything: handlers such as onmouseover would fire now.
        self.page.evaluate(
            """() => document.querySelectorAll('*').forEach(e => {
                for (const type of ['mouseover', 'mouseenter', 'focus', 'animationstart'])
                    e.dispatchEvent(new Event(type, {bubbles: true}));
            })"""
        )
        self.page.wait_for_load_state("load")
        assert self.requests == [url], f"the page loaded something: {self.requests}"
        dom = self.page.evaluate(
            """() => ({
                scripts: document.querySelectorAll('script, iframe, img, object, embed').length,
                handlers: [...document.querySelectorAll('*')].flatMap(
                    e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on')),
                protocols: [...document.querySelectorAll('a')].map(a => a.protocol),
            })"""
        )
        assert dom["scripts"] == 0 and dom["handlers"] == [], dom
        assert set(dom["protocols"]) <= {"http:"}, dom["protocols"]

    def close(self) -> None:
        self.context.close()


@needs_chromium
@pytest.mark.parametrize("strip_csp", [False, True], ids=["with-csp", "escaping-alone"])
def test_browser_runs_nothing_on_any_dashboard_page(
    hostile: Tally, chromium: Any, strip_csp: bool
) -> None:
    with servers(hostile) as urls:
        tab = Watched(chromium, strip_csp)
        try:
            for url in urls.values():
                for path, shown in PAGES:
                    tab.visit(url + path)
                    body = tab.page.locator("body").inner_text()
                    for value in shown:
                        assert value.strip() in body, (path, value)
                for path in ERROR_PAGES:
                    tab.visit(url + path)
        finally:
            tab.close()
        assert tab.events == []


@needs_chromium
def test_browser_check_sees_a_script_that_runs(chromium: Any) -> None:
    """The watcher itself: an unescaped value would be caught (with the policy stripped)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from llm_tally.demo.serve import BackgroundServer

    leaked = f"<html><body><p>{ATTR_USER}</p><script>alert('run')</script></body></html>"
    app = Starlette(routes=[Route("/", lambda request: HTMLResponse(leaked))])
    with BackgroundServer(app) as server:
        tab = Watched(chromium, strip_csp=True)
        try:
            with pytest.raises(AssertionError):
                tab.visit(f"{server.url}/")
        finally:
            tab.close()
    assert any(event.startswith("dialog") for event in tab.events)


# -- CSV injection -----------------------------------------------------------------------------

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def assert_no_formula(rows: list[dict[str, str]]) -> None:
    for row in rows:
        for column, cell in row.items():
            if cell.startswith(FORMULA_START):
                assert re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", cell), (column, cell)


def test_csv_export_neutralises_formula_cells_and_keeps_numbers(hostile: Tally) -> None:
    with servers(hostile) as urls:
        exports = {}
        for framework, url in urls.items():
            response = httpx2.get(f"{url}{MOUNT}/api/export.csv", timeout=30)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
            assert response.headers["content-disposition"].startswith("attachment")
            assert response.headers["x-content-type-options"] == "nosniff"
            exports[framework] = response.text
    assert exports["asgi"] == exports["flask"]
    rows = list(csv.DictReader(io.StringIO(exports["asgi"])))
    assert len(rows) == hostile.count_records()
    assert_no_formula(rows)
    users = {row["user_id"] for row in rows}
    assert "'" + FORMULA_USER in users, "the formula is kept as text, after a quote"
    assert XSS_USER in users, "other values are kept verbatim"
    assert {row["request_id"] for row in rows} >= {"'" + EVIL_REQUEST_ID}
    # The hostile provider and operation are kept verbatim: they do not start a formula.
    assert any(row["operation"] == EVIL_OPERATION for row in rows)


def test_cli_export_and_report_write_no_formula(
    hostile: Tally, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(hostile.engine.url)
    out = tmp_path / "usage.csv"
    assert cli_main(["export", "--database-url", url, "-o", str(out)]) == 0
    exported = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert_no_formula(exported)
    assert "'" + FORMULA_USER in {row["user_id"] for row in exported}
    capsys.readouterr()
    assert cli_main(["report", "--database-url", url, "--by", "user", "--format", "csv"]) == 0
    report = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert_no_formula(report)
    assert "'" + FORMULA_USER in {row["user_id"] for row in report}

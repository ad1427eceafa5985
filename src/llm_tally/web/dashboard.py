"""The usage dashboard: complete HTML pages rendered on the server from the Python API.

Framework-neutral like :mod:`.api`: query parameters in, an HTML string out, or
:class:`~.api.ApiError` for a bad parameter. No JavaScript and nothing fetched at run time:
plain HTML, a little inline CSS and SVG charts drawn here. Every value that came from the
host app or its users (user ids, property values, model names, reasons, the query string)
is escaped with :func:`html.escape`.

- ``GET {mount}/``: :func:`users_page_html`, totals of a period and a table of users, with
  filters, the plan and feature breakdowns, anomalies and the costliest (model, feature) pairs.
- ``GET {mount}/users/{user_id}``: :func:`user_page_html`, one user's totals, daily charts,
  models, activity and most recent calls.

:func:`users_page` and :func:`user_page` give ``(status, html)``, the page of a bad parameter
included: what the ASGI and Flask adapters serve. Links are relative to the page, so the
pages work wherever the endpoint is mounted.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from .._money import nano_to_usd
from .._time import TimeBound, bound_to_epoch_us, from_epoch_us
from .._validation import check_properties, check_user_id
from ..storage import analytics
from ..storage.queries import ORDER_BY_VALUES, DayTotals, UserTotals
from . import api

if TYPE_CHECKING:
    from .._tally import Tally

#: Period presets: the value of ``?period=`` and its label. Dates (``since``/``until``) win.
PRESETS: dict[str, str] = {
    "month": "This month",
    "7d": "Last 7 days",
    "30d": "Last 30 days",
    "all": "All time",
}
DEFAULT_PRESET = "month"
PAGE_SIZE = 50
RECENT_CALLS = 20
BREAKDOWNS = ("plan", "feature")
#: Longer periods chart only the days that had calls (no empty days in between).
MAX_CHART_DAYS = 400
_SCAN_CHUNK = 10_000
# Parameters that links keep (sorting, paging and presets change some of them).
_STATE = ("period", "since", "until", "q", "property", "value", "order_by", "limit")
_PERIOD_STATE = ("period", "since", "until")


def _e(value: object) -> str:
    """Escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


# -- parameters --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """The period a page shows: ``[since, until)``, from a preset or from explicit dates."""

    since: TimeBound
    until: TimeBound
    #: The preset in force, or None when ``since``/``until`` were given.
    preset: str | None

    def describe(self) -> str:
        if self.preset == "all":
            return "All time"
        if self.preset is not None:
            return f"{PRESETS[self.preset]}: from {_bound_text(self.since)} to now"
        start = _bound_text(self.since) if self.since is not None else "the first call"
        end = f"until {_bound_text(self.until)} (excluded)" if self.until is not None else "now"
        return f"Custom: from {start} to {end}"


def _bound_text(bound: TimeBound) -> str:
    if isinstance(bound, datetime):
        return api.iso(bound if bound.tzinfo else bound.replace(tzinfo=UTC)) or ""
    return bound.isoformat() if bound is not None else ""


def resolve_period(params: Mapping[str, str], now: datetime) -> Period:
    """``since``/``until`` when either is given, else the ``period`` preset (UTC days)."""
    preset = api.choice_param(params, "period", tuple(PRESETS), DEFAULT_PRESET)
    since, until = api.parse_period(params)
    if since is not None or until is not None:
        return Period(since, until, None)
    today = now.astimezone(UTC).date()
    starts: dict[str, date | None] = {
        "month": today.replace(day=1),
        "7d": today - timedelta(days=6),
        "30d": today - timedelta(days=29),
        "all": None,
    }
    return Period(starts[preset], None, preset)


def _property_filter(params: Mapping[str, str]) -> tuple[str, str] | None:
    name, value = params.get("property") or "", params.get("value") or ""
    if not name and not value:
        return None
    if not name:
        raise api.ApiError(400, "property: a property name (e.g. plan) is needed with value")
    if not value:
        raise api.ApiError(400, f"value: a value is needed to filter on property {name[:64]!r}")
    try:
        [(key, text)] = check_properties({name: value}, "property").items()
    except ValueError as exc:
        raise api.ApiError(400, str(exc)) from None
    return key, text


def _checked_user(user_id: str) -> str:
    try:
        checked = check_user_id(user_id)
    except ValueError as exc:
        raise api.ApiError(400, str(exc)) from None
    return checked or user_id  # a str id is never None once checked


def _href(path: str, params: Mapping[str, str], keep: Sequence[str], **changes: str) -> str:
    """``path`` with the kept parameters of this request, changed (an empty value drops one)."""
    query = {name: params[name] for name in keep if params.get(name)}
    for name, value in changes.items():
        if value:
            query[name] = value
        else:
            query.pop(name, None)
    encoded = urlencode(query)
    return f"{path}?{encoded}" if encoded else path


def _user_href(user_id: str, params: Mapping[str, str]) -> str:
    """The user page's URL from the users page (the id percent-encoded, ``/`` included),
    keeping the period."""
    return _href(f"users/{quote(user_id, safe='')}", params, _PERIOD_STATE)


# -- formatting --------------------------------------------------------------------------------


def usd(amount: Decimal) -> str:
    """Exact dollars: every significant digit kept, at least cents (``$0.000075``, ``$1.50``)."""
    text = format(amount, "f")
    if "." in text:
        whole, fraction = text.split(".")
        fraction = fraction.rstrip("0").ljust(2, "0")
        text = f"{whole}.{fraction}"
    else:
        text += ".00"
    return f"${text}"


def _int(value: int) -> str:
    return f"{value:,}"


def _when(moment: datetime | None, seconds: bool = False) -> str:
    if moment is None:
        return '<span class="muted">—</span>'
    utc = moment.astimezone(UTC)
    shown = f"{utc:%Y-%m-%d %H:%M:%S}" if seconds else f"{utc:%Y-%m-%d %H:%M}"
    return f'<time datetime="{_e(api.iso(utc))}">{shown}</time>'


def _or_none(value: str | None, missing: str = "(not set)") -> str:
    return _e(value) if value is not None else f'<span class="muted">{missing}</span>'


def _ms(value: Decimal | None) -> str:
    return f"{value.normalize():f} ms" if value is not None else "—"


def _percent(ratio: Decimal) -> str:
    return f"{(ratio * 100).normalize():f} %"


# -- building blocks ---------------------------------------------------------------------------

_CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--soft:#f6f8fa;--accent:#0a58a8;
--bar:#2f6fba;--bar-cost:#a35200;--focus:#c2410c}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:#fff}
a{color:var(--accent)}
a:focus-visible,button:focus-visible,input:focus-visible,summary:focus-visible,
main:focus-visible{outline:3px solid var(--focus);outline-offset:2px;border-radius:2px}
.skip{position:absolute;left:-9999px;top:.5rem;background:#fff;padding:.5rem 1rem;
border:2px solid var(--focus);z-index:10}
.skip:focus{left:.5rem}
.top{display:flex;gap:1.5rem;align-items:baseline;padding:.6rem 1.5rem;
border-bottom:1px solid var(--line);background:var(--soft)}
.top .brand{font-weight:700;color:var(--fg);text-decoration:none}
main{max-width:84rem;margin:0 auto;padding:.5rem 1.5rem 3rem}
main:focus{outline:none}
h1{font-size:1.5rem;margin:.75rem 0 .25rem}
h2{font-size:1.1rem;margin:1.75rem 0 .5rem}
.muted{color:var(--muted)}
time{white-space:nowrap}
.uid{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}
.presets{display:flex;flex-wrap:wrap;gap:.25rem 1rem;margin:.5rem 0;padding:0;list-style:none}
.presets a[aria-current]{color:var(--fg);font-weight:700;text-decoration:none;
border-bottom:3px solid var(--accent)}
form.filters{display:flex;flex-wrap:wrap;align-items:flex-end;gap:.5rem 1rem;padding:.75rem 1rem;
background:var(--soft);border:1px solid var(--line);border-radius:6px}
.filters label{display:flex;flex-direction:column;font-size:.85rem;color:var(--muted)}
.filters input{font:inherit;color:var(--fg);padding:.25rem .4rem;border:1px solid #8c959f;
border-radius:4px;min-width:9rem}
.filters button{font:inherit;padding:.3rem 1rem;border-radius:4px;border:1px solid var(--accent);
background:var(--accent);color:#fff;cursor:pointer}
.filters .hint{flex-basis:100%;font-size:.8rem;color:var(--muted);margin:0}
dl.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));gap:.75rem;
margin:1rem 0}
dl.cards div{border:1px solid var(--line);border-radius:6px;padding:.5rem .8rem}
dl.cards dt{color:var(--muted);font-size:.85rem}
dl.cards dd{margin:0;font-size:1.3rem;font-weight:600;font-variant-numeric:tabular-nums}
dl.cards dd time{font-size:1rem;white-space:normal}
.note{color:var(--muted);font-size:.9rem}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;margin:.25rem 0}
caption{text-align:left;color:var(--muted);font-size:.85rem;padding:.25rem 0}
th,td{padding:.35rem .6rem;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600;white-space:nowrap}
th.n,td.n{text-align:right;white-space:nowrap}
tbody tr:hover{background:#f1f6fc}
tbody th .uid{display:inline-block;min-width:11rem}
.pager{display:flex;gap:1.5rem;align-items:baseline;margin:.5rem 0}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,30rem),1fr));
gap:0 2.5rem}
figure{margin:0}
svg.chart{display:block;width:100%;max-width:760px;height:auto}
svg.chart .bar{fill:var(--bar)}
svg.chart.cost .bar{fill:var(--bar-cost)}
svg.chart .bar:hover{opacity:.75}
svg.chart text{font-size:14px;fill:var(--muted)}
svg.chart line{stroke:var(--line)}
details{margin:.5rem 0}
footer{max-width:84rem;margin:0 auto;padding:1rem 1.5rem 2rem;color:var(--muted);
font-size:.85rem;border-top:1px solid var(--line)}
"""

# No script may run, whatever a value manages to smuggle in: defence in depth behind escaping.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; base-uri 'none'"
)


def _page(title: str, body: str, home: str) -> str:
    """A complete page; ``home`` is the users page relative to this one (``./`` or ``../``)."""
    base = _e(home)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="referrer" content="no-referrer">
<title>{_e(title)} · llm-tally</title>
<style>{_CSS}</style>
</head>
<body>
<a class="skip" href="#main">Skip to main content</a>
<header class="top"><a class="brand" href="{base}">llm-tally</a>
<nav aria-label="Dashboard"><a href="{base}">Users</a>
<a href="{base}anomalies">Anomalies</a></nav></header>
<main id="main" tabindex="-1">
{body}
</main>
<footer>All times UTC. Costs are exact, in US dollars. JSON API:
<a href="{base}api/users">api/users</a>, <a href="{base}api/by/plan">api/by/plan</a>,
<a href="{base}api/anomalies">api/anomalies</a>,
<a href="{base}api/expensive">api/expensive</a>; every call as CSV:
<a href="{base}api/export.csv">api/export.csv</a>; all routes:
<a href="{base}api/openapi.json">api/openapi.json</a>.</footer>
</body></html>
"""


def _cards(element_id: str, label: str, items: Iterable[tuple[str, str]]) -> str:
    cells = "".join(f"<div><dt>{_e(name)}</dt><dd>{value}</dd></div>" for name, value in items)
    return f'<dl class="cards" id="{element_id}" aria-label="{_e(label)}">{cells}</dl>'


@dataclass(frozen=True, slots=True)
class _Column:
    label: str
    numeric: bool = False
    #: The ``order_by`` value this column sorts by, if any.
    sort: str | None = None


def _table(
    element_id: str,
    caption: str,
    columns: Sequence[_Column],
    rows: Iterable[Sequence[str]],
    *,
    sort_link: Callable[[str], str] | None = None,
    current_sort: str | None = None,
) -> str:
    """A table; ``rows`` hold HTML (already escaped), the first cell of each is a row header."""
    head = []
    for column in columns:
        classes = ' class="n"' if column.numeric else ""
        label = _e(column.label)
        if column.sort is not None and sort_link is not None:
            if column.sort == current_sort:
                head.append(
                    f'<th scope="col"{classes} aria-sort="descending">'
                    f'<a href="{_e(sort_link(column.sort))}">{label}</a> ▼</th>'
                )
                continue
            label = (
                f'<a href="{_e(sort_link(column.sort))}" '
                f'title="Sort by {label.lower()}, largest first">{label}</a>'
            )
        head.append(f'<th scope="col"{classes}>{label}</th>')
    body = []
    for row in rows:
        cells = []
        for index, (column, cell) in enumerate(zip(columns, row, strict=True)):
            classes = ' class="n"' if column.numeric else ""
            tag = '<th scope="row"' if index == 0 else "<td"
            cells.append(f"{tag}{classes}>{cell}{'</th>' if index == 0 else '</td>'}")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table id="{element_id}"><caption>{_e(caption)}</caption>'
        f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _period_controls(
    path: str, params: Mapping[str, str], period: Period, keep: Sequence[str], extra: str
) -> str:
    """Preset links and the GET form with dates (and ``extra`` fields)."""
    presets = []
    for value, label in PRESETS.items():
        current = ' aria-current="true"' if period.preset == value else ""
        link = _href(path, params, keep, period=value, since="", until="", offset="")
        presets.append(f'<li><a href="{_e(link)}"{current}>{_e(label)}</a></li>')
    since_text = params.get("since", "") if period.preset is None else ""
    until_text = params.get("until", "") if period.preset is None else ""
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{_e(params[name])}">'
        for name in ("period", "order_by", "limit")
        if name in keep and params.get(name)
    )
    return f"""<p class="muted" id="period-now">Period: {_e(period.describe())}</p>
<nav aria-label="Period presets"><ul class="presets">{"".join(presets)}</ul></nav>
<form class="filters" method="get" action="{_e(path)}" aria-label="Filters">
{_date_input("since", "From", since_text)}
{_date_input("until", "Until (excluded)", until_text)}
{extra}{hidden}
<button type="submit">Apply</button> <a href="{_e(path)}">Reset</a>
<p class="hint">Dates, when set, replace the preset. Days are UTC.</p>
</form>"""


def _date_input(name: str, label: str, value: str) -> str:
    kind = "date" if value == "" or len(value) == 10 else "text"
    return (
        f'<label for="f-{name}">{_e(label)}<input id="f-{name}" name="{name}" type="{kind}" '
        f'value="{_e(value)}" placeholder="2026-11-01"></label>'
    )


def _text_input(name: str, label: str, value: str, placeholder: str) -> str:
    return (
        f'<label for="f-{name}">{_e(label)}<input id="f-{name}" name="{name}" type="search" '
        f'value="{_e(value)}" placeholder="{_e(placeholder)}"></label>'
    )


# -- the users page ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Summary:
    requests: int
    users: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    unpriced_requests: int
    #: Calls made outside any user (counted in the totals above when unfiltered).
    anonymous: UserTotals | None


def _sort_key(order_by: str) -> Callable[[UserTotals], Any]:
    keys: dict[str, Callable[[UserTotals], Any]] = {
        "cost": lambda u: u.cost_usd,
        "requests": lambda u: u.requests,
        "tokens": lambda u: u.total_tokens,
        "last_seen": lambda u: u.last_seen,
    }
    return keys[order_by]


def _all_users(tally: Tally, period: Period, order_by: str) -> Iterable[UserTotals]:
    """Every user of the period, in ``order_by`` order, fetched in chunks."""
    offset = 0
    while True:
        chunk = tally.users(
            period.since,
            period.until,
            order_by,  # type: ignore[arg-type]
            _SCAN_CHUNK,
            offset,
        )
        yield from chunk
        if len(chunk) < _SCAN_CHUNK:
            return
        offset += _SCAN_CHUNK


def _users_with_property(
    tally: Tally, period: Period, name: str, value: str, order_by: str
) -> list[UserTotals]:
    """Per-user totals of the calls whose property ``name`` is ``value``, in ``order_by`` order."""
    since, until = (bound_to_epoch_us(b, "period") for b in (period.since, period.until))
    rows = analytics.users_with_property(tally.engine, name, value, since, until)
    # As the SQL of tally.users(): largest first, ties by user id.
    rows.sort(key=lambda u: u.user_id or "")
    rows.sort(key=_sort_key(order_by), reverse=True)
    return rows


def _summary_of(rows: Sequence[UserTotals]) -> _Summary:
    return _Summary(
        requests=sum(u.requests for u in rows),
        users=len(rows),
        errors=sum(u.errors for u in rows),
        input_tokens=sum(u.input_tokens for u in rows),
        output_tokens=sum(u.output_tokens for u in rows),
        cost_usd=sum((u.cost_usd for u in rows), Decimal(0)),
        unpriced_requests=sum(u.unpriced_requests for u in rows),
        anonymous=None,
    )


def _listing(
    tally: Tally,
    period: Period,
    order_by: str,
    search: str,
    prop: tuple[str, str] | None,
    limit: int,
    offset: int,
) -> tuple[list[UserTotals], int, _Summary]:
    """(this page of users, how many match, totals of the period or of the matching users)."""
    if prop is None and not search:
        rows = tally.users(
            period.since,
            period.until,
            order_by,  # type: ignore[arg-type]
            limit,
            offset,
        )
        totals = tally.totals(period.since, period.until)
        anonymous = tally.user_totals(None, period.since, period.until)
        summary = _Summary(
            requests=totals.requests,
            users=totals.users,
            errors=totals.errors,
            input_tokens=totals.input_tokens,
            output_tokens=totals.output_tokens,
            cost_usd=totals.cost_usd,
            unpriced_requests=totals.unpriced_requests,
            anonymous=anonymous if anonymous.requests else None,
        )
        return rows, summary.users, summary
    if prop is None:
        matched = list(_all_users(tally, period, order_by))
    else:
        matched = _users_with_property(tally, period, prop[0], prop[1], order_by)
    if search:
        needle = search.casefold()
        matched = [u for u in matched if needle in (u.user_id or "").casefold()]
    return matched[offset : offset + limit], len(matched), _summary_of(matched)


_USER_COLUMNS = (
    _Column("User"),
    _Column("Requests", True, "requests"),
    _Column("Errors", True),
    _Column("Input tokens", True),
    _Column("Output tokens", True),
    _Column("Total tokens", True, "tokens"),
    _Column("Cost", True, "cost"),
    _Column("First seen"),
    _Column("Last seen", False, "last_seen"),
)

_GROUP_COLUMNS = (
    _Column("Users", True),
    _Column("Requests", True),
    _Column("Cost", True),
    _Column("Avg cost per user", True),
    _Column("Avg cost per request", True),
)


def _user_link(user_id: str, params: Mapping[str, str]) -> str:
    href = _user_href(user_id, params)
    return f'<a class="user-link uid" href="{_e(href)}">{_e(user_id)}</a>'


def users_page_html(tally: Tally, params: Mapping[str, str], now: datetime | None = None) -> str:
    """``GET {mount}/``: the users page. Its links are relative, so it works wherever it is
    mounted (and behind a proxy that strips a prefix); ``now`` (default: the current time)
    anchors the presets and the anomalies.

    Parameters: ``period`` (month, 7d, 30d, all), ``since``/``until`` (dates win over the
    preset), ``q`` (part of a user id, any case), ``property`` + ``value`` (only the calls
    carrying that property value), ``order_by`` (cost, requests, tokens, last_seen),
    ``limit``, ``offset``. Raises :class:`~.api.ApiError` (400) for a bad one.
    """
    moment = now or datetime.now(UTC)
    period = resolve_period(params, moment)
    order_by = api.choice_param(params, "order_by", ORDER_BY_VALUES, "cost")
    limit = api.int_param(params, "limit", PAGE_SIZE, 1, api.MAX_LIMIT)
    offset = api.int_param(params, "offset", 0, 0, 10**9)
    search = (params.get("q") or "").strip()
    prop = _property_filter(params)
    rows, matching, summary = _listing(tally, period, order_by, search, prop, limit, offset)
    home = "./"

    filters = (
        _text_input("q", "User id contains", search, "e.g. @example.com")
        + _text_input("property", "Property", params.get("property") or "", "e.g. plan")
        + _text_input("value", "equals", params.get("value") or "", "e.g. pro")
    )
    parts = [
        "<h1>LLM usage by user</h1>",
        _period_controls(home, params, period, _STATE, filters),
    ]

    filtered = prop is not None or bool(search)
    scope = "Matching users" if filtered else "Period"
    parts.append(
        _cards(
            "totals",
            f"{scope} totals",
            [
                ("Cost", usd(summary.cost_usd)),
                ("Requests", _int(summary.requests)),
                ("Users", _int(summary.users)),
                ("Errors", _int(summary.errors)),
                ("Input tokens", _int(summary.input_tokens)),
                ("Output tokens", _int(summary.output_tokens)),
            ],
        )
    )
    notes = []
    if filtered:
        what = []
        if search:
            what.append(f"user ids containing “{_e(search)}”")
        if prop is not None:
            what.append(f"only calls with {_e(prop[0])} = “{_e(prop[1])}”")
        notes.append(f"Filtered: {', '.join(what)}. Totals are those of the matching users.")
    elif summary.anonymous is not None:
        notes.append(
            f"Includes {_int(summary.anonymous.requests)} calls made outside any user "
            f"({usd(summary.anonymous.cost_usd)}), not listed below."
        )
    if summary.unpriced_requests:
        notes.append(
            f"{_int(summary.unpriced_requests)} calls used a model without a known price: "
            "their cost is not counted."
        )
    parts.extend(f'<p class="note">{note}</p>' for note in notes)

    parts.append('<section aria-labelledby="h-users"><h2 id="h-users">Users</h2>')
    if rows:
        parts.append(
            _table(
                "users",
                f"Users {offset + 1} to {offset + len(rows)} of {matching}, "
                f"by {order_by.replace('_', ' ')} (largest first). Select a column to sort.",
                _USER_COLUMNS,
                (
                    (
                        _user_link(u.user_id or "", params),
                        _int(u.requests),
                        _int(u.errors),
                        _int(u.input_tokens),
                        _int(u.output_tokens),
                        _int(u.total_tokens),
                        usd(u.cost_usd),
                        _when(u.first_seen),
                        _when(u.last_seen),
                    )
                    for u in rows
                ),
                sort_link=lambda key: _href(home, params, _STATE, order_by=key),
                current_sort=order_by,
            )
        )
        parts.append(_pager(home, params, offset, limit, len(rows), matching))
    else:
        parts.append('<p id="no-users">No user made a call in this period.</p>')
    parts.append("</section>")

    for dimension in BREAKDOWNS:
        groups = tally.totals_by(dimension, period.since, period.until)
        parts.append(
            f'<section aria-labelledby="h-by-{dimension}">'
            f'<h2 id="h-by-{dimension}">By {dimension}</h2>'
        )
        if groups:
            parts.append(
                _table(
                    f"by-{dimension}",
                    f"Every call of the period, grouped by the property “{dimension}”.",
                    (_Column(dimension.capitalize()), *_GROUP_COLUMNS),
                    (
                        (
                            _or_none(g.value),
                            _int(g.users),
                            _int(g.requests),
                            usd(g.cost_usd),
                            usd(g.avg_cost_per_user),
                            usd(g.avg_cost_per_request),
                        )
                        for g in groups
                    ),
                )
            )
        else:
            parts.append("<p>No calls in this period.</p>")
        parts.append("</section>")

    parts.append(_pairs_section(tally, period))
    # Anomalies score every active user against their own history: their own page, so that
    # this one stays fast on large stores (see docs/performance.md).
    anomalies = _href("anomalies", params, _PERIOD_STATE)
    parts.append(
        '<section aria-labelledby="h-anomalies"><h2 id="h-anomalies">Anomalies</h2>'
        f'<p><a id="anomalies-link" href="{_e(anomalies)}">Users far above their usual use or '
        "the other users' in the last hour or day</a></p></section>"
    )
    return _page("Usage by user", "\n".join(parts), home)


def anomalies_page_html(
    tally: Tally, params: Mapping[str, str], now: datetime | None = None
) -> str:
    """``GET {mount}/anomalies``: the anomalies of the last hour and the last day."""
    moment = now or datetime.now(UTC)
    resolve_period(params, moment)  # a bad period in the links is a 400, as on other pages
    return _page("Anomalies", _anomalies_section(tally, params, moment), "./")


def _pager(
    home: str, params: Mapping[str, str], offset: int, limit: int, shown: int, matching: int
) -> str:
    links = []
    if offset > 0:
        previous = _href(home, params, _STATE, offset=str(max(offset - limit, 0)))
        links.append(f'<a href="{_e(previous)}" rel="prev">← Previous {limit}</a>')
    if offset + shown < matching:
        following = _href(home, params, _STATE, offset=str(offset + limit))
        links.append(f'<a href="{_e(following)}" rel="next">Next {limit} →</a>')
    if not links:
        return ""
    return f'<nav class="pager" aria-label="Pages of users">{"".join(links)}</nav>'


def _anomalies_section(tally: Tally, params: Mapping[str, str], now: datetime) -> str:
    found = [(window, a) for window in ("hour", "day") for a in tally.anomalies(window, now=now)]
    parts = [
        '<section aria-labelledby="h-anomalies"><h2 id="h-anomalies">Anomalies</h2>',
        '<p class="note">Users whose requests or cost in the last hour or day are far above '
        "their own baseline or the other users' (robust z-score of 5 or more).</p>",
    ]
    if not found:
        parts.append('<p id="no-anomalies">No anomaly in the last hour or the last day.</p>')
    else:
        parts.append(
            _table(
                "anomalies",
                "Most unusual first.",
                (
                    _Column("User"),
                    _Column("Window"),
                    _Column("Metric"),
                    _Column("Compared to"),
                    _Column("Score", True),
                    _Column("Reason"),
                ),
                (
                    (
                        _user_link(a.user_id, params),
                        f"last {window}",
                        _e(a.metric),
                        "own history" if a.compared_to == "self" else "other users",
                        _e(f"{a.score:f}"),
                        f'<span class="reason">{_e(a.reason)}</span>',
                    )
                    for window, a in found
                ),
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _pairs_section(tally: Tally, period: Period) -> str:
    pairs = tally.expensive_pairs("feature", period.since, period.until, limit=10)
    parts = [
        '<section aria-labelledby="h-pairs"><h2 id="h-pairs">Costliest model and feature pairs</h2>'
    ]
    if not pairs:
        parts.append("<p>No calls in this period.</p>")
    else:
        parts.append(
            _table(
                "pairs",
                "The ten (model, feature) pairs that cost the most in the period.",
                (
                    _Column("Model"),
                    _Column("Feature"),
                    _Column("Requests", True),
                    _Column("Cost", True),
                    _Column("Avg cost per request", True),
                ),
                (
                    (
                        _or_none(p.model, "(unknown)"),
                        _or_none(p.value),
                        _int(p.requests),
                        usd(p.cost_usd),
                        usd(p.avg_cost_per_request),
                    )
                    for p in pairs
                ),
            )
        )
    parts.append("</section>")
    return "".join(parts)


# -- the user page -----------------------------------------------------------------------------


def _utc_day(bound: date | datetime) -> date:
    if isinstance(bound, datetime):
        return (bound if bound.tzinfo else bound.replace(tzinfo=UTC)).astimezone(UTC).date()
    return bound


def chart_days(daily: Sequence[DayTotals], period: Period, now: datetime) -> list[date]:
    """The days a daily chart shows: the whole period (empty days too) when it is known and no
    longer than :data:`MAX_CHART_DAYS`, else only the days with calls."""
    days = [d.day for d in daily]
    if not days:
        return []
    start = _utc_day(period.since) if period.since is not None else days[0]
    if period.until is not None:
        until = period.until
        end = (
            _utc_day(until - timedelta(microseconds=1))
            if isinstance(until, datetime)
            else until - timedelta(days=1)
        )
    elif period.since is not None:
        end = now.astimezone(UTC).date()
    else:
        end = days[-1]
    start, end = min(start, days[0]), max(end, days[-1])
    if (end - start).days >= MAX_CHART_DAYS:
        return days
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


_CHART_W, _CHART_H = 720, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 96, 10, 12, 32


def bar_chart_svg(
    chart_id: str,
    title: str,
    days: Sequence[date],
    values: Mapping[date, Decimal],
    tooltip: Callable[[date, Decimal], str],
    axis_label: Callable[[Decimal], str],
    css_class: str = "",
) -> str:
    """A bar per day of ``days`` (none where the value is 0), each with a ``<title>`` tooltip."""
    plot_w = _CHART_W - _LEFT - _RIGHT
    plot_h = _CHART_H - _TOP - _BOTTOM
    top = max((values.get(d, Decimal(0)) for d in days), default=Decimal(0))
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.8, 1.0)
    baseline = _TOP + plot_h
    bars = []
    for index, day in enumerate(days):
        value = values.get(day, Decimal(0))
        if value <= 0 or top <= 0:
            continue
        height = max(float(value / top) * plot_h, 1.5)
        x = _LEFT + index * slot + (slot - bar_w) / 2
        bars.append(
            f'<rect class="bar" x="{x:.2f}" y="{baseline - height:.2f}" width="{bar_w:.2f}" '
            f'height="{height:.2f}"><title>{_e(tooltip(day, value))}</title></rect>'
        )
    labels = [
        f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{_e(axis_label(top))}</text>',
        f'<text x="{_LEFT - 6}" y="{baseline + 4}" text-anchor="end">{_e(axis_label(Decimal(0)))}'
        "</text>",
    ]
    if days:
        labels.append(
            f'<text x="{_LEFT}" y="{_CHART_H - 10}" text-anchor="start">{days[0].isoformat()}'
            "</text>"
        )
        if len(days) > 1:
            labels.append(
                f'<text x="{_CHART_W - _RIGHT}" y="{_CHART_H - 10}" text-anchor="end">'
                f"{days[-1].isoformat()}</text>"
            )
    classes = f"chart {css_class}".strip()
    return (
        f'<svg id="{chart_id}" class="{classes}" viewBox="0 0 {_CHART_W} {_CHART_H}" '
        f'role="img" aria-labelledby="{chart_id}-title" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{chart_id}-title">{_e(title)}</title>'
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_CHART_W - _RIGHT}" y2="{_TOP}"/>'
        f'<line x1="{_LEFT}" y1="{baseline}" x2="{_CHART_W - _RIGHT}" y2="{baseline}"/>'
        f"{''.join(labels)}{''.join(bars)}</svg>"
    )


def _plural(count: int | Decimal, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _charts(daily: Sequence[DayTotals], period: Period, now: datetime) -> str:
    if not daily:
        return '<p id="no-daily">No calls in this period, so no daily chart.</p>'
    days = chart_days(daily, period, now)
    requests = {d.day: Decimal(d.requests) for d in daily}
    cost = {d.day: d.cost_usd for d in daily}
    span = f"{days[0].isoformat()} to {days[-1].isoformat()}"
    request_chart = bar_chart_svg(
        "chart-requests",
        f"Requests per day, {span}",
        days,
        requests,
        lambda day, value: f"{day.isoformat()}: {_plural(int(value), 'request')}",
        lambda value: f"{int(value):,}",
    )
    cost_chart = bar_chart_svg(
        "chart-cost",
        f"Cost per day, {span}",
        days,
        cost,
        lambda day, value: f"{day.isoformat()}: {usd(value)}",
        usd,
        "cost",
    )
    table = _table(
        "daily",
        "Days with calls.",
        (
            _Column("Day"),
            _Column("Requests", True),
            _Column("Input tokens", True),
            _Column("Output tokens", True),
            _Column("Cost", True),
        ),
        (
            (
                d.day.isoformat(),
                _int(d.requests),
                _int(d.input_tokens),
                _int(d.output_tokens),
                usd(d.cost_usd),
            )
            for d in daily
        ),
    )
    return f"""<div class="grid2">
<section aria-labelledby="h-daily-requests"><h2 id="h-daily-requests">Daily requests</h2>
<figure>{request_chart}</figure></section>
<section aria-labelledby="h-daily-cost"><h2 id="h-daily-cost">Daily cost</h2>
<figure>{cost_chart}</figure></section>
</div>
<details><summary>Daily figures as a table</summary>{table}</details>"""


def _activity_section(tally: Tally, user_id: str, period: Period) -> str:
    found = tally.activity("user", period.since, period.until, key=user_id)
    head = '<section aria-labelledby="h-activity"><h2 id="h-activity">Activity</h2>'
    if not found:
        return f'{head}<p id="no-activity">No activity in this period.</p></section>'
    a = found[0]
    items = [
        ("Active days", _int(a.active_days)),
        ("Requests per active day", f"{a.avg_requests_per_active_day:f}"),
        ("Tokens per request", f"{a.avg_tokens_per_request:f}"),
        ("Error rate", _percent(a.error_rate)),
        ("Latency p50", _ms(a.latency_p50_ms)),
        ("Latency p95", _ms(a.latency_p95_ms)),
        ("Time to first token p50", _ms(a.ttft_p50_ms)),
    ]
    return f"{head}{_cards('activity', 'Activity', items)}</section>"


def recent_calls(
    tally: Tally, user_id: str, period: Period, count: int = RECENT_CALLS
) -> list[dict[str, Any]]:
    """The user's last ``count`` calls of the period, newest first."""
    since, until = (bound_to_epoch_us(b, "period") for b in (period.since, period.until))
    stored_id = tally.pseudonym(user_id) or user_id  # the id as stored (pseudonymised or not)
    return analytics.latest_records(tally.engine, stored_id, since, until, count)


def _properties_text(properties: Mapping[str, Any] | None) -> str:
    if not properties:
        return '<span class="muted">—</span>'
    return ", ".join(f"{_e(k)}={_e(v)}" for k, v in sorted(properties.items()))


def _recent_section(tally: Tally, user_id: str, period: Period) -> str:
    calls = recent_calls(tally, user_id, period)
    head = (
        '<section aria-labelledby="h-recent"><h2 id="h-recent">Recent calls</h2>'
        '<p class="note">Prompts and answers are never stored: only what each call used and '
        "cost.</p>"
    )
    if not calls:
        return f'{head}<p id="no-recent">No calls in this period.</p></section>'
    table = _table(
        "recent",
        f"The last {len(calls)} calls of the period, newest first.",
        (
            _Column("Time"),
            _Column("Model"),
            _Column("Operation"),
            _Column("Status"),
            _Column("Input tokens", True),
            _Column("Output tokens", True),
            _Column("Cost", True),
            _Column("Latency", True),
            _Column("Properties"),
        ),
        (
            (
                _when(from_epoch_us(c["ts"]), seconds=True),
                _or_none(c["response_model"] or c["request_model"], "(unknown)"),
                _e(c["operation"]),
                _e(c["status"]),
                _int(c["input_tokens"]),
                _int(c["output_tokens"]),
                usd(nano_to_usd(c["cost_nano_usd"]))
                if c["cost_nano_usd"] is not None
                else '<span class="muted">unpriced</span>',
                _ms(Decimal(c["latency_us"]) / 1000) if c["latency_us"] is not None else "—",
                _properties_text(c["properties"]),
            )
            for c in calls
        ),
    )
    return f"{head}{table}</section>"


def user_page_html(
    tally: Tally,
    user_id: str,
    params: Mapping[str, str],
    now: datetime | None = None,
) -> str:
    """``GET {mount}/users/{user_id}``: one user's totals, daily charts, models, activity and
    last calls for a period (``period`` or ``since``/``until``, as on the users page)."""
    checked = _checked_user(user_id)
    moment = now or datetime.now(UTC)
    period = resolve_period(params, moment)
    # Links relative to {mount}/users/{id}: the users page is "../".
    here = quote(checked, safe="")
    totals = tally.user_totals(checked, period.since, period.until)
    daily = tally.user_daily(checked, period.since, period.until)
    models = tally.user_by_model(checked, period.since, period.until)
    back = _href("../", params, _PERIOD_STATE)

    parts = [
        f'<p><a href="{_e(back)}">← All users</a></p>',
        f'<h1>User <span class="uid">{_e(checked)}</span></h1>',
        _period_controls(here, params, period, _PERIOD_STATE, ""),
        _cards(
            "user-totals",
            "Totals of the period",
            [
                ("Cost", usd(totals.cost_usd)),
                ("Requests", _int(totals.requests)),
                ("Errors", _int(totals.errors)),
                ("Input tokens", _int(totals.input_tokens)),
                ("Output tokens", _int(totals.output_tokens)),
                ("Cached input tokens", _int(totals.cached_input_tokens)),
                ("First seen", _when(totals.first_seen)),
                ("Last seen", _when(totals.last_seen)),
            ],
        ),
    ]
    if totals.unpriced_requests:
        parts.append(
            f'<p class="note">{_int(totals.unpriced_requests)} calls used a model without a '
            "known price: their cost is not counted.</p>"
        )
    parts.append(_activity_section(tally, checked, period))
    parts.append(_charts(daily, period, moment))
    parts.append('<section aria-labelledby="h-models"><h2 id="h-models">By model</h2>')
    if models:
        parts.append(
            _table(
                "by-model",
                "Most expensive first.",
                (
                    _Column("Model"),
                    _Column("Requests", True),
                    _Column("Input tokens", True),
                    _Column("Output tokens", True),
                    _Column("Cost", True),
                ),
                (
                    (
                        _or_none(m.model, "(unknown)"),
                        _int(m.requests),
                        _int(m.input_tokens),
                        _int(m.output_tokens),
                        usd(m.cost_usd),
                    )
                    for m in models
                ),
            )
        )
    else:
        parts.append("<p>No calls in this period.</p>")
    parts.append("</section>")
    parts.append(_recent_section(tally, checked, period))
    return _page(f"User {checked}", "\n".join(parts), "../")


def error_page_html(status: int, message: str, home: str) -> str:
    """The page answered for a bad parameter (``status`` 400): what was wrong, and a way back
    to ``home`` (the users page, relative to the page asked for)."""
    body = (
        f'<h1>Bad request</h1><p id="error" role="alert">{_e(message)}</p>'
        f'<p>HTTP status {status}. <a href="{_e(home)}">Back to all users</a></p>'
    )
    return _page("Bad request", body, home)


def users_page(
    tally: Tally, params: Mapping[str, str], now: datetime | None = None
) -> tuple[int, str]:
    """``(status, html)`` for ``GET {mount}/``: the users page, or the page of a bad parameter."""
    return _status_and_page(lambda: users_page_html(tally, params, now), "./")


def anomalies_page(
    tally: Tally, params: Mapping[str, str], now: datetime | None = None
) -> tuple[int, str]:
    """``(status, html)`` for ``GET {mount}/anomalies``."""
    return _status_and_page(lambda: anomalies_page_html(tally, params, now), "./")


def user_page(
    tally: Tally, user_id: str, params: Mapping[str, str], now: datetime | None = None
) -> tuple[int, str]:
    """``(status, html)`` for ``GET {mount}/users/{user_id}``."""
    return _status_and_page(lambda: user_page_html(tally, user_id, params, now), "../")


def _status_and_page(render: Callable[[], str], home: str) -> tuple[int, str]:
    """200 and the page, or the status and error page of a bad parameter."""
    try:
        return 200, render()
    except api.ApiError as exc:
        return exc.status, error_page_html(exc.status, exc.message, home)

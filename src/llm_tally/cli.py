"""The ``llm-tally`` command line: ``demo``, reports, ``export``, ``prune`` and ``db``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from ._time import TimeBound, parse_time_bound
from .storage.engine import resolve_database_url
from .storage.queries import ORDER_BY_VALUES
from .web.export import EXPORT_FIELDS, export_row, safe_row

if TYPE_CHECKING:
    from sqlalchemy import Engine

EXIT_USAGE = 2


class CliError(Exception):
    """A mistake in the command line: printed, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        command: Callable[[argparse.Namespace], int] = args.run
        return command(args)
    except (CliError, ValueError) as exc:
        print(f"llm-tally {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-tally", description="Per-user LLM usage and cost.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="serve a demo app whose users call a built-in fake LLM, with /llm-usage"
    )
    demo.add_argument(
        "--database-url", default=None, help="store usage here (default: a temporary SQLite file)"
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="interface to serve on (default: %(default)s)"
    )
    demo.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any)")
    demo.add_argument("--once", action="store_true", help="play the scripted users, print, exit")
    demo.set_defaults(run=_demo)

    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--database-url",
        default=None,
        help="the store (default: $LLM_TALLY_DATABASE_URL, else sqlite:///llm_tally.db)",
    )
    store = argparse.ArgumentParser(add_help=False, parents=[database])
    store.add_argument("--since", help="start, included: a date (2026-11-01) or ISO datetime")
    store.add_argument("--until", help="end, excluded: a date (2026-12-01) or ISO datetime")

    report = commands.add_parser(
        "report", parents=[store], help="totals per user, plan, model, feature or any property"
    )
    report.add_argument(
        "--by", default="user", help="user, model, provider, operation or a property such as plan"
    )
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--order-by", choices=ORDER_BY_VALUES, default="cost", help="for --by user")
    report.add_argument("--limit", type=int, default=1000, help="for --by user (default: 1000)")
    report.set_defaults(run=_report)

    activity = commands.add_parser(
        "activity", parents=[store], help="cadence, call size, error rate, latency per user/model"
    )
    activity.add_argument("--by", choices=("user", "model"), default="user")
    activity.add_argument("--key", default=None, help="only this user (or model)")
    activity.add_argument("--format", choices=("table", "csv", "json"), default="table")
    activity.set_defaults(run=_page("activity_page", "rows", ("by", "key")))

    anomalies = commands.add_parser(
        "anomalies", parents=[store], help="users far above their own or other users' usage"
    )
    anomalies.add_argument("--window", choices=("hour", "day"), default="hour")
    anomalies.add_argument("--threshold", default="5", help="robust z-score (default: 5)")
    anomalies.add_argument("--min-requests", default="5", help="ignore quieter users")
    anomalies.add_argument("--format", choices=("table", "csv", "json"), default="table")
    anomalies.set_defaults(
        run=_page("anomalies_page", "anomalies", ("window", "threshold", "min_requests"))
    )

    expensive = commands.add_parser(
        "expensive", parents=[store], help="the costliest (model, feature) pairs and calls"
    )
    expensive.add_argument("--by", default="feature", help="the property paired with the model")
    expensive.add_argument("--user", dest="user_id", default=None, help="only this user")
    expensive.add_argument("--limit", default="20")
    expensive.add_argument("--calls", action="store_true", help="list calls instead of pairs")
    expensive.add_argument("--format", choices=("table", "csv", "json"), default="table")
    expensive.set_defaults(run=_expensive)

    profit = commands.add_parser(
        "profitability", parents=[store], help="revenue, cost and margin per user"
    )
    profit.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="PLAN=USD",
        help="monthly price of a plan, repeatable: --price free=0 --price pro=20",
    )
    profit.add_argument("--by", default="plan", help="the property that names the plan")
    profit.add_argument("--format", choices=("table", "csv", "json"), default="table")
    profit.set_defaults(run=_profitability)

    export = commands.add_parser(
        "export", parents=[store], help="every stored call of a period, for billing"
    )
    export.add_argument("--format", choices=("csv",), default="csv")
    export.add_argument("--user", default=None, help="only this user's calls")
    export.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    export.set_defaults(run=_export)

    prune = commands.add_parser(
        "prune",
        parents=[database],
        help="delete the calls (and their totals) of the months before a date",
    )
    prune.add_argument(
        "--before", required=True, help="the first day of a month, UTC (2026-01-01): kept"
    )
    prune.set_defaults(run=_prune)

    db = commands.add_parser("db", help="the store's schema: its revision, upgrading it")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser(
        "upgrade",
        parents=[database],
        help="create the store's tables, or upgrade them to this llm-tally's revision",
    )
    upgrade.set_defaults(run=_db_upgrade)
    current = db_commands.add_parser(
        "current",
        parents=[database],
        help="print the store's revision; exit code 1 when it needs `llm-tally db upgrade`",
    )
    current.set_defaults(run=_db_current)
    return parser


def _db_upgrade(args: argparse.Namespace) -> int:
    from .storage import schema

    with _store_engine(resolve_database_url(args.database_url)) as engine:
        before = schema.upgrade_store(engine)
        after = schema.store_state(engine)
        shown = schema.shown_url(engine)
    if before.ahead:
        print(f"{shown} is {before.describe()}: left as it is")
        return 1
    if before.up_to_date:
        print(f"{shown} is already at revision {after.revision} (up to date)")
    elif before.revision is None and before.before_migrations is None:
        print(f"{shown}: created llm-tally's tables at revision {after.revision}")
    else:
        print(f"{shown}: upgraded to revision {after.revision} (it was {before.describe()})")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from .storage import schema

    with _store_engine(_existing_store(args.database_url)) as engine:
        state = schema.store_state(engine)
        print(f"{schema.shown_url(engine)} is {state.describe()}")
    return 0 if state.up_to_date else 1


@contextmanager
def _store_engine(url: str) -> Iterator[Engine]:
    from .storage.engine import create_store_engine

    engine = create_store_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _prune(args: argparse.Namespace) -> int:
    before = parse_time_bound(args.before, "--before")
    with _open_store(args.database_url) as tally:
        deleted = tally.prune(before)
    print(f"deleted {deleted} call(s) before {args.before}, and their totals")
    return 0


def _period(args: argparse.Namespace) -> tuple[TimeBound, TimeBound]:
    since = parse_time_bound(args.since, "--since") if args.since else None
    until = parse_time_bound(args.until, "--until") if args.until else None
    return since, until


def _open_store(url: str | None) -> Any:
    from ._tally import Tally

    return Tally(_existing_store(url), instrument=False)


def _existing_store(url: str | None) -> str:
    """The store's URL; a CliError rather than creating a SQLite file that is not there."""
    url = resolve_database_url(url)
    if url.startswith("sqlite:///") and not os.path.exists(url.removeprefix("sqlite:///")):
        raise CliError(f"no store at {url}: pass --database-url or set LLM_TALLY_DATABASE_URL")
    return url


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    run_demo(args.database_url, host=args.host, port=args.port, once=args.once)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .web import api

    since, until = _period(args)
    with _open_store(args.database_url) as tally:
        if args.by == "user":
            users = tally.users(since, until, order_by=args.order_by, limit=args.limit)
            rows = [api.totals_json(t) for t in users]
        else:
            if args.by not in ("model", "provider", "operation") and not tally.has_property(
                args.by
            ):
                raise CliError(
                    f"unknown property {args.by!r}: no stored call has it (use user, model, "
                    "provider, operation or a property your app sets, such as plan)"
                )
            rows = [api.group_json(g) for g in tally.totals_by(args.by, since, until)]
    _write(rows, args.format, sys.stdout)
    return 0


def _params(args: argparse.Namespace, names: Iterable[str]) -> dict[str, str]:
    """The command's options as the JSON API's query parameters: one code path, one answer."""
    params = {"since": args.since or "", "until": args.until or ""}
    for name in names:
        value = getattr(args, name)
        if value is not None:
            params[name] = str(value)
    return params


def _answer(build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    from .web import api

    try:
        return build()
    except api.ApiError as exc:
        raise CliError(exc.message) from None


def _page(function: str, key: str, names: tuple[str, ...]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .web import api

        page = getattr(api, function)
        with _open_store(args.database_url) as tally:
            result = _answer(lambda: page(tally, _params(args, names)))
        _write(result[key], args.format, sys.stdout)
        return 0

    return run


def _expensive(args: argparse.Namespace) -> int:
    from .web import api

    with _open_store(args.database_url) as tally:
        params = _params(args, ("by", "user_id", "limit"))
        result = _answer(lambda: api.expensive_page(tally, params))
    _write(result["calls" if args.calls else "pairs"], args.format, sys.stdout)
    return 0


def _profitability(args: argparse.Namespace) -> int:
    from .web import api

    prices: dict[str, str] = {}
    for item in args.price:
        plan, sep, price = item.partition("=")
        if not sep or not plan:
            raise CliError(f"--price: expected PLAN=USD such as pro=20, got {item!r}")
        prices[plan] = price
    if not prices:
        raise CliError("--price: give the monthly price of each plan, e.g. --price pro=20")
    from .storage.insights import check_revenue

    check_revenue(prices)
    with _open_store(args.database_url) as tally:
        params = _params(args, ("by",))
        result = _answer(lambda: api.profitability_page(tally, prices, params))
    _write(result["users"], args.format, sys.stdout)
    return 0


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nested values (properties) as JSON text, for tables and CSV."""
    return [
        {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in row.items()}
        for row in rows
    ]


def _write(rows: list[dict[str, Any]], fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    rows = _flat(rows)
    if not rows:
        out.write("no calls in this period\n" if fmt == "table" else "")
        return
    columns = list(rows[0])
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(safe_row(row) for row in rows)
        return
    texts = [["" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(t[i]) for t in texts)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(t[i]) for t in texts) for i in range(len(columns))]

    def line(cells: Iterable[str]) -> str:
        return "  ".join(
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out.write(line(columns) + "\n")
    out.write(line("-" * w for w in widths) + "\n")
    for cells in texts:
        out.write(line(cells) + "\n")


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


def _export(args: argparse.Namespace) -> int:
    since, until = _period(args)
    with _open_store(args.database_url) as tally:
        total = tally.count_records(since, until, args.user) if args.output != "-" else 0
        out: IO[str]
        out = sys.stdout if args.output == "-" else open(args.output, "w", newline="")  # noqa: SIM115
        try:
            writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
            writer.writeheader()
            for n, record in enumerate(tally.iter_records(since, until, user_id=args.user), 1):
                writer.writerow(export_row(record))
                if total and (n % 5000 == 0 or n == total):
                    _progress(n, total)
        finally:
            if out is not sys.stdout:
                out.close()
        if total:
            print(file=sys.stderr)
    return 0


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(
        f"\rexporting [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}",
        end="",
        file=sys.stderr,
        flush=True,
    )

"""The Tally: one store, its background writer, and the Python API over it."""

from __future__ import annotations

import atexit
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import Engine

from . import _pricing
from ._internal import guard, internal_error_counts, logger
from ._money import usd_to_nano
from ._pseudonym import Pseudonyms
from ._record import (
    STATUS_ABORTED,
    STATUS_ERROR,
    STATUS_OK,
    USAGE_MANUAL,
    USAGE_UNKNOWN,
    CallRecord,
    PendingRecord,
    new_record_id,
)
from ._scope import OpenCall
from ._time import TimeBound, bound_to_epoch_us, to_epoch_us
from ._validation import check_properties, check_user_id
from .storage import analytics, insights, queries, retention, rollups, schema
from .storage.analytics import GroupTotals
from .storage.engine import create_store_engine, resolve_database_url
from .storage.journal import Journal, default_directory
from .storage.queries import ORDER_BY_VALUES, DayTotals, ModelTotals, OrderBy, UserTotals
from .storage.writer import BackgroundWriter, Row, row_of

InjectStreamUsage = bool | Literal["auto"]
Migrate = bool | Literal["auto"]

_registry_lock = threading.RLock()
_open_tallies: list[Tally] = []


def default_tally() -> Tally | None:
    """The process default: the earliest-created Tally that is still open."""
    try:
        return _open_tallies[0]
    except IndexError:  # none open (or the last one closed by another thread just now)
        return None


class Tally:
    """Records every instrumented LLM call into a SQLModel store and answers usage questions.

    ``Tally()`` stores into ``$LLM_TALLY_DATABASE_URL`` or the SQLite file ``./llm_tally.db``;
    pass any SQLAlchemy URL for another store. Creating a Tally instruments the OpenAI SDK
    (once per process); closing the last open Tally undoes it. A call is recorded by the
    Tally bound to its context (``user(..., tally=t)`` or the middleware), else by the
    process default: the earliest-created Tally still open.

    ``inject_stream_usage`` asks chat streams for a final usage chunk (and hides that chunk
    from callers who did not ask for it): ``"auto"`` does so for OpenAI's own API only.

    ``journal``: every call is written to a local crash journal before it is queued, so a
    process killed before storing it loses nothing (the next Tally on the store replays
    it), and records wait there when the store is down longer than ``max_queue`` records.
    ``True`` puts it beside a SQLite file, else under ``$LLM_TALLY_JOURNAL_DIR`` or
    ``~/.local/state/llm-tally/journal``; a path chooses the directory; ``False`` turns it
    off. See docs/operations.md.

    ``pseudonymize_key`` (or ``$LLM_TALLY_PSEUDONYMIZE_KEY``): store ``h:`` + a keyed hash
    (HMAC-SHA256) of each user id instead of the id. Every method that takes a user id
    still takes the real one; results and the dashboard show pseudonyms, and
    :meth:`pseudonym` tells which one is whose. See docs/security.md.

    ``migrate="auto"`` (or ``True``) creates the store's tables, or upgrades a store that an
    older llm-tally wrote, when the Tally is created (several processes may do so at once).
    With ``migrate=False`` the schema is never changed: a store that is not up to date
    raises ``StoreNotUpgraded``, and ``llm-tally db upgrade`` upgrades it.
    ``create_tables`` is the former name of ``migrate`` (deprecated).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        instrument: bool = True,
        inject_stream_usage: InjectStreamUsage = "auto",
        migrate: Migrate = "auto",
        create_tables: bool | None = None,
        max_queue: int = 100_000,
        batch_size: int = 2_000,
        flush_interval: float = 0.05,
        journal: bool | str | os.PathLike[str] = True,
        pseudonymize_key: str | bytes | None = None,
    ) -> None:
        if inject_stream_usage not in (True, False, "auto"):
            raise ValueError("inject_stream_usage must be True, False or 'auto'")
        upgrade = _check_migrate(migrate, create_tables)
        for name, value in (("max_queue", max_queue), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(flush_interval, int | float) or flush_interval <= 0:
            raise ValueError(f"flush_interval must be a positive number, got {flush_interval!r}")
        if not isinstance(journal, bool | str | os.PathLike) or journal == "":
            raise ValueError(f"journal must be True, False or a directory path, got {journal!r}")
        self._pseudonyms = Pseudonyms.configured(pseudonymize_key)
        self.database_url = resolve_database_url(database_url)
        self.inject_stream_usage: InjectStreamUsage = inject_stream_usage
        self.engine: Engine = create_store_engine(self.database_url)
        try:
            schema.prepare(self.engine, migrate=upgrade)
        except BaseException:
            self.engine.dispose()
            raise
        self._pricer = _pricing.Pricer()
        self._open_calls: set[OpenCall] = set()
        self._open_calls_lock = threading.Lock()
        self._writer = BackgroundWriter(
            self.engine,
            self._to_row,
            journal=_open_journal(journal, self.database_url),
            max_queue=max_queue,
            batch_size=batch_size,
            interval=flush_interval,
        )
        self._closed = False
        self._instrumented = False
        with _registry_lock:
            _open_tallies.append(self)
        if instrument:
            from .integrations.openai import instrument_openai

            instrument_openai()
            self._instrumented = True

    # -- recording ---------------------------------------------------------------------------

    def submit(self, record: CallRecord | PendingRecord) -> None:
        """Queue a finished call for storage (internal: used by the integrations).

        A ``PendingRecord`` is turned into a record by the writer thread, which keeps the
        parsing of usage and token estimates off the caller's path.
        """
        if self._pseudonyms is not None:
            record.user_id = self._pseudonyms.of(record.user_id)
        self._writer.submit(record)

    def track_open_call(self, call: OpenCall) -> None:
        with self._open_calls_lock:
            self._open_calls.add(call)

    def untrack_open_call(self, call: OpenCall) -> None:
        with self._open_calls_lock:
            self._open_calls.discard(call)

    def record(
        self,
        *,
        user_id: str | int | None,
        model: str,
        provider: str = "openai",
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_usd: Decimal | int | str | None = None,
        ts: datetime | date | None = None,
        properties: dict[str, Any] | None = None,
        operation: str = "manual",
        status: str = STATUS_OK,
        latency_ms: int | None = None,
        record_id: str | None = None,
    ) -> str:
        """Store a call made outside the instrumented SDKs (another provider, a batch job).

        Token counts follow OpenAI's convention (``input_tokens`` includes cached tokens).
        The cost is computed from genai-prices when ``cost_usd`` is not given. Returns the
        record id.
        """
        checked_user = check_user_id(user_id)
        if not isinstance(model, str) or not model or len(model) > 256:
            raise ValueError("model must be a non-empty string of at most 256 characters")
        if not isinstance(provider, str) or not provider or len(provider) > 64:
            raise ValueError("provider must be a non-empty string of at most 64 characters")
        if not isinstance(operation, str) or not operation or len(operation) > 32:
            raise ValueError("operation must be a non-empty string of at most 32 characters")
        if status not in (STATUS_OK, STATUS_ERROR, STATUS_ABORTED):
            raise ValueError(f"status must be one of 'ok', 'error', 'aborted', got {status!r}")
        tokens = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_input_tokens": cached_input_tokens,
            "cache_write_tokens": cache_write_tokens,
            "reasoning_tokens": reasoning_tokens,
        }
        for name, value in tokens.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if cached_input_tokens + cache_write_tokens > input_tokens:
            raise ValueError(
                "input_tokens must include cached_input_tokens and cache_write_tokens "
                f"(got input_tokens={input_tokens}, cached_input_tokens={cached_input_tokens}, "
                f"cache_write_tokens={cache_write_tokens})"
            )
        if reasoning_tokens > output_tokens:
            raise ValueError("output_tokens must include reasoning_tokens")
        cost_nano: int | None = None
        if cost_usd is not None:
            if isinstance(cost_usd, float | bool) or not isinstance(cost_usd, Decimal | int | str):
                raise ValueError(
                    f"cost_usd must be a Decimal, int or str (floats are inexact), got {cost_usd!r}"
                )
            try:
                amount = Decimal(cost_usd)
            except InvalidOperation:
                raise ValueError(f"cost_usd is not a number: {cost_usd!r}") from None
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"cost_usd must be >= 0, got {cost_usd!r}")
            cost_nano = usd_to_nano(amount)
        if latency_ms is not None and (
            isinstance(latency_ms, bool) or not isinstance(latency_ms, int) or latency_ms < 0
        ):
            raise ValueError(f"latency_ms must be an int >= 0, got {latency_ms!r}")
        if record_id is not None and (
            not isinstance(record_id, str) or not 1 <= len(record_id) <= 32
        ):
            raise ValueError("record_id must be a string of 1 to 32 characters")
        record = CallRecord(
            id=record_id or new_record_id(),
            ts_us=to_epoch_us(ts, "ts") if ts is not None else time.time_ns() // 1000,
            user_id=checked_user,
            properties=check_properties(properties or {}),
            provider=provider,
            operation=operation,
            request_model=model,
            response_model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens,
            cost_nano_usd=cost_nano,
            cost_source=_pricing.COST_GIVEN if cost_nano is not None else None,
            latency_us=latency_ms * 1000 if latency_ms is not None else None,
            status=status,
            usage_source=USAGE_MANUAL,
        )
        self.submit(record)
        return record.id

    def set_price(
        self,
        model: str,
        *,
        input_per_mtok: Decimal | str | int,
        output_per_mtok: Decimal | str | int,
        cached_input_per_mtok: Decimal | str | int | None = None,
        cache_write_per_mtok: Decimal | str | int | None = None,
    ) -> None:
        """Register a price (USD per million tokens) for a model genai-prices does not know.

        Custom prices win over genai-prices. They apply to calls stored from now on.
        """
        self._pricer.set_price(
            model,
            input_per_mtok=input_per_mtok,
            output_per_mtok=output_per_mtok,
            cached_input_per_mtok=cached_input_per_mtok,
            cache_write_per_mtok=cache_write_per_mtok,
        )

    def _to_row(self, item: CallRecord | PendingRecord) -> Row | None:
        """Resolve and price a record (writer thread); None drops a record we cannot store."""
        if isinstance(item, CallRecord):
            record = item
        else:
            built = guard("build record", item.to_record)
            if built is None:
                self._writer.stats.dropped += 1  # counted, so that health() says degraded
                return None
            record = built
        if record.usage_source == USAGE_UNKNOWN:
            record.cost_source = _pricing.COST_UNKNOWN  # no tokens to price
        elif record.cost_nano_usd is None and record.cost_source is None:
            priced = guard(
                "pricing",
                self._pricer.cost_nano_usd,
                record.provider,
                (record.response_model, record.request_model),
                _pricing.TokenUsage(
                    record.input_tokens,
                    record.output_tokens,
                    record.cached_input_tokens,
                    record.cache_write_tokens,
                ),
                record.ts_us,
                record.base_url,
            )
            record.cost_nano_usd, record.cost_source = priced or (None, _pricing.COST_UNKNOWN)
        if record.cost_source is None:
            record.cost_source = _pricing.COST_UNKNOWN
        return row_of(record)

    # -- reading -----------------------------------------------------------------------------

    def pseudonym(self, user_id: str | int | None) -> str | None:
        """The id stored for ``user_id``: its pseudonym when ``pseudonymize_key`` is set,
        else the id itself (as a str). Raises ValueError for an id that cannot be stored."""
        checked = check_user_id(user_id)
        return checked if self._pseudonyms is None else self._pseudonyms.of(checked)

    def user_totals(
        self, user_id: str | int | None, since: TimeBound = None, until: TimeBound = None
    ) -> UserTotals:
        """One user's totals for ``[since, until)``; datetimes are UTC when naive.

        ``user_id=None`` gives the calls made outside any user context. Only stored records
        count: call :meth:`flush` first to include calls that just happened.
        """
        return queries.user_totals(self.engine, self.pseudonym(user_id), *_period(since, until))

    def users(
        self,
        since: TimeBound = None,
        until: TimeBound = None,
        order_by: OrderBy = "cost",
        limit: int = 100,
        offset: int = 0,
    ) -> list[UserTotals]:
        """Per-user totals for ``[since, until)``, largest first by ``order_by``."""
        if order_by not in ORDER_BY_VALUES:
            raise ValueError(
                f"order_by must be one of {', '.join(ORDER_BY_VALUES)}; got {order_by!r}"
            )
        for name, value, low in (("limit", limit, 1), ("offset", offset, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        return queries.users(
            self.engine, *_period(since, until), order_by, min(limit, 10_000), offset
        )

    def count_users(self, since: TimeBound = None, until: TimeBound = None) -> int:
        """How many distinct users made calls in ``[since, until)``."""
        return queries.count_users(self.engine, *_period(since, until))

    def user_by_model(
        self, user_id: str | int | None, since: TimeBound = None, until: TimeBound = None
    ) -> list[ModelTotals]:
        """One user's totals per model, most expensive first."""
        return queries.by_model(self.engine, self.pseudonym(user_id), *_period(since, until))

    def user_daily(
        self, user_id: str | int | None, since: TimeBound = None, until: TimeBound = None
    ) -> list[DayTotals]:
        """One user's totals per UTC day, oldest first."""
        return queries.daily(self.engine, self.pseudonym(user_id), *_period(since, until))

    def totals_by(
        self, dimension: str, since: TimeBound = None, until: TimeBound = None
    ) -> list[GroupTotals]:
        """Totals per value of a property (``"plan"``, ``"feature"``...) or of ``"user"``,
        ``"model"``, ``"provider"``, ``"operation"``, most expensive first.

        Each group has its users, requests, tokens, exact ``cost_usd`` and the averages
        ``avg_cost_per_user`` and ``avg_cost_per_request``. Calls without the property are
        grouped under ``value=None``.
        """
        return analytics.totals_by(self.engine, _check_dimension(dimension), *_period(since, until))

    def totals(self, since: TimeBound = None, until: TimeBound = None) -> GroupTotals:
        """Everything in ``[since, until)`` as one group: distinct users (calls without a
        user are counted in requests and cost, not in ``users``), requests, tokens, cost."""
        return analytics.period_totals(self.engine, *_period(since, until))

    def prune(self, before: datetime | date) -> int:
        """Delete every call before ``before`` — the first day of a month, UTC — and the
        rollups of those months, for retention. Later reports are unchanged. Returns how
        many calls were deleted. Raises ValueError for another date."""
        return retention.prune(self.engine, to_epoch_us(before, "before"))

    def has_property(self, key: str) -> bool:
        """Whether any stored call carries the property ``key``."""
        return analytics.has_property(self.engine, _check_dimension(key))

    def iter_records(
        self,
        since: TimeBound = None,
        until: TimeBound = None,
        user_id: str | int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stored records of ``[since, until)`` in time order, streamed (for billing exports).

        Times are epoch microseconds (``ts``) and money integer nano-USD (``cost_nano_usd``),
        as stored.
        """
        return analytics.iter_records(
            self.engine, *_period(since, until), user_id=self.pseudonym(user_id)
        )

    def count_records(
        self, since: TimeBound = None, until: TimeBound = None, user_id: str | int | None = None
    ) -> int:
        """How many calls were stored in ``[since, until)`` (of one user if given)."""
        return analytics.count_records(
            self.engine, *_period(since, until), user_id=self.pseudonym(user_id)
        )

    def profitability(
        self,
        revenue: insights.Revenue,
        since: TimeBound,
        until: TimeBound,
        by: str = "plan",
    ) -> list[insights.UserProfit]:
        """Each user's revenue, cost and margin for ``[since, until)``, least profitable first.

        ``revenue`` maps a value of the property ``by`` (the plan on the user's latest call
        in the period) to a monthly price, e.g. ``{"free": 0, "pro": "20.00"}``, or is a
        callable ``user_id -> monthly price``. The price is counted per calendar month of the
        period, partial months pro rata (``month_period()`` gives whole months).
        """
        if since is None or until is None:
            raise ValueError("since and until are both needed to compute revenue for a period")
        insights.check_revenue(revenue)
        return insights.profitability(
            self.engine, revenue, _check_dimension(by), _aware(since), _aware(until)
        )

    def activity(
        self,
        by: Literal["user", "model"] = "user",
        since: TimeBound = None,
        until: TimeBound = None,
        key: str | None = None,
    ) -> list[insights.Activity]:
        """Per user (or model): first/last seen, active days, requests per active day, tokens
        per request, error rate, latency p50/p95 and time-to-first-token p50. ``key`` limits
        the answer to one user (or model)."""
        if by not in ("user", "model"):
            raise ValueError(f"by must be 'user' or 'model', got {by!r}")
        if by == "user" and key is not None and self._pseudonyms is not None:
            key = self._pseudonyms.of(key)  # a key that is no valid id simply matches no one
        return insights.activity(self.engine, by, *_period(since, until), key=key)

    def anomalies(
        self,
        window: Literal["hour", "day"] = "hour",
        now: datetime | None = None,
        baseline_windows: int | None = None,
        threshold: Decimal | int | str = 5,
        min_requests: int = 5,
    ) -> list[insights.Anomaly]:
        """Users whose requests or cost in the last hour (or day) are far above their own
        baseline (the previous 24 hours / 14 days by default) or the other users', by a
        robust z-score (median and MAD) of at least ``threshold``; each with its reason."""
        if window not in ("hour", "day"):
            raise ValueError(f"window must be 'hour' or 'day', got {window!r}")
        if baseline_windows is None:
            baseline_windows = 24 if window == "hour" else 14
        baseline = baseline_windows
        if isinstance(baseline, bool) or not isinstance(baseline, int) or baseline < 2:
            raise ValueError(f"baseline_windows must be an int >= 2, got {baseline_windows!r}")
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
            raise ValueError(f"min_requests must be an int >= 1, got {min_requests!r}")
        bar: Decimal | None = None
        if isinstance(threshold, Decimal | int | str) and not isinstance(threshold, bool):
            try:
                bar = Decimal(threshold)
            except ArithmeticError:
                bar = None
        if bar is None or not bar.is_finite() or bar <= 0:
            raise ValueError(
                f"threshold must be a positive number (Decimal, int or str), got {threshold!r}"
            )
        moment = now if now is not None else datetime.now(UTC)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return insights.anomalies(self.engine, window, moment, baseline, bar, min_requests)

    def expensive_calls(
        self,
        since: TimeBound = None,
        until: TimeBound = None,
        user_id: str | int | None = None,
        limit: int = 20,
    ) -> list[dict[str, Any]]:
        """The costliest stored calls of the period (of one user if given)."""
        return insights.expensive_calls(
            self.engine, *_period(since, until), self.pseudonym(user_id), _check_limit(limit)
        )

    def expensive_pairs(
        self,
        dimension: str = "feature",
        since: TimeBound = None,
        until: TimeBound = None,
        user_id: str | int | None = None,
        limit: int = 20,
    ) -> list[insights.PairTotals]:
        """The costliest (model, property value) pairs, e.g. (gpt-4o, feature=summarize)."""
        return insights.expensive_pairs(
            self.engine,
            _check_dimension(dimension),
            *_period(since, until),
            self.pseudonym(user_id),
            _check_limit(limit),
        )

    def stats(self) -> dict[str, Any]:
        """Health of the writer, from memory (no database query): queue depth, records
        written, dropped, spilled to the journal and replayed from it, the journal's
        directory and size on disk, write errors and the last one, when the last write
        succeeded and failed (Unix times), streams still open, and llm-tally's own internal
        errors by kind (counted for the whole process; each kind is logged once)."""
        s = self._writer.stats
        journal = self._writer.journal
        return {
            "queue_depth": self._writer.depth,
            "max_queue": self._writer.max_queue,
            "written": s.written,
            "dropped": s.dropped,
            "spilled": s.spilled,
            "replayed": s.replayed,
            "journal_dir": str(journal.directory) if journal is not None else None,
            "journal_bytes": journal.size_bytes() if journal is not None else 0,
            "journal_errors": journal.errors if journal is not None else 0,
            "last_journal_error": journal.last_error if journal is not None else None,
            "write_errors": s.write_errors,
            "last_write_error": s.last_write_error,
            "last_write_at": s.last_write_at,
            "last_write_error_at": s.last_write_error_at,
            "open_streams": len(self._open_calls),
            # Process-wide: llm-tally's own failures by kind, each logged once (see _internal).
            "internal_errors": dict(internal_error_counts),
        }

    def health(self) -> dict[str, Any]:
        """:meth:`stats`, plus a check that the store answers and how many stored calls wait
        to be rolled up (SQLite). ``status`` is ``"ok"``, or ``"degraded"`` when the store
        does not answer, the last write failed, records were dropped, or the queue is full
        and records wait in the journal."""
        report: dict[str, Any] = self.stats()
        try:
            report["rollup_backlog"] = rollups.pending_rows(self.engine)
            report["store_error"] = None
        except Exception as exc:
            report["rollup_backlog"] = None
            report["store_error"] = f"{type(exc).__name__}: {exc}"[:500]
        failing = report["last_write_error_at"] is not None and (
            report["last_write_at"] is None
            or report["last_write_error_at"] > report["last_write_at"]
        )
        # A writer stuck waiting for a lock has no error yet, but the backlog shows it.
        backlog = report["queue_depth"] >= report["max_queue"] or self._writer.spill_waiting
        healthy = (
            report["store_error"] is None and not failing and not report["dropped"] and not backlog
        )
        report["status"] = "ok" if healthy else "degraded"
        return report

    # -- web apps ----------------------------------------------------------------------------

    def init_app(
        self,
        app: Any,
        *,
        identify: Callable[..., Any] | None = None,
        properties: Callable[..., Any] | None = None,
        authorize: Callable[[Any], Any] | None = None,
        mount_path: str = "/llm-usage",
        user_header: str | None = None,
        revenue: insights.Revenue | None = None,
    ) -> None:
        """Charge every LLM call made while serving a request to its user, and mount ``/llm-usage``.

        Recognises FastAPI/Starlette (pure ASGI middleware + a mounted endpoint) and Flask
        (WSGI middleware + a blueprint; state in ``app.extensions["llm_tally"]``).

        - ``identify``: returns the request's user id. ASGI: ``identify(request)``, sync or
          async. Flask: ``identify()``, called inside the request context.
        - ``properties``: returns a dict of properties (e.g. the user's plan), same calling
          convention as ``identify``.
        - ``authorize``: ``authorize(request) -> bool`` (async allowed for ASGI) guards the
          endpoint; without it only loopback clients not behind a proxy are let in.
        - ``user_header``: opt in to trusting a header set by your gateway (e.g.
          ``"X-User-Id"``). Off by default: any client could send it and spoof a user.
        - ``revenue``: monthly price per plan (``{"free": 0, "pro": "20.00"}``) or a callable
          ``user_id -> monthly price``, for ``/api/profitability``.
        """
        from .web.api import check_mount_path

        if revenue is not None:
            insights.check_revenue(revenue)
        options: dict[str, Any] = {
            "identify": identify,
            "properties": properties,
            "authorize": authorize,
            "mount_path": check_mount_path(mount_path),
            "user_header": user_header,
            "revenue": revenue,
        }
        if hasattr(app, "wsgi_app") and hasattr(app, "extensions"):
            from .web.flask import init_flask

            init_flask(self, app, **options)
        elif hasattr(app, "add_middleware") and hasattr(app, "mount"):
            from .web.asgi import init_starlette

            init_starlette(self, app, **options)
        else:
            raise TypeError(
                f"init_app() supports FastAPI, Starlette and Flask apps, got {type(app).__name__}. "
                "For another ASGI app wrap it in llm_tally.LLMUsageMiddleware and mount "
                "tally.asgi_app(); for another WSGI app use llm_tally.LLMUsageWSGIMiddleware."
            )

    def asgi_app(
        self,
        *,
        authorize: Callable[[Any], Any] | None = None,
        identify: Callable[..., Any] | None = None,
        user_header: str | None = None,
        revenue: insights.Revenue | None = None,
    ) -> Any:
        """The ``/llm-usage`` endpoint as an ASGI app, for manual mounting."""
        from .web.asgi import usage_app

        return usage_app(
            self, authorize=authorize, identify=identify, user_header=user_header, revenue=revenue
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every call recorded so far is stored. False if ``timeout`` ran out."""
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Record still-open streams as aborted, flush, stop the writer, release the store."""
        if self._closed:
            return
        self._closed = True
        with self._open_calls_lock:
            open_calls = list(self._open_calls)
        for call in open_calls:
            guard("abort open call", call.abort)
        with _registry_lock:
            if self in _open_tallies:
                _open_tallies.remove(self)
            last = self._instrumented and not any(t._instrumented for t in _open_tallies)
        if last:
            from .integrations.openai import uninstrument_openai

            uninstrument_openai()
        if not self._writer.close(timeout):
            logger.warning(
                "llm-tally: %d record(s) were not stored before close() gave up after %ss%s",
                self._writer.depth,
                timeout,
                "; they stay in the crash journal for the next Tally on this store"
                if self._writer.journal is not None
                else "",
            )
        self.engine.dispose()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Tally:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Tally {self.database_url!r}{' closed' if self._closed else ''}>"


def _aware(moment: TimeBound) -> datetime:
    """A datetime in its own time zone; naive ones and dates (midnight) are UTC."""
    if isinstance(moment, datetime):
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if isinstance(moment, date):
        return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    raise ValueError(f"expected a datetime or a date, got {type(moment).__name__}")


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValueError(f"limit must be an int from 1 to 10000, got {limit!r}")
    return limit


def _check_dimension(dimension: str) -> str:
    if dimension in rollups.BUILT_IN_DIMENSIONS:
        return dimension
    try:
        check_properties({dimension: ""}, "dimension")
    except ValueError:
        raise ValueError(
            f"dimension must be one of {', '.join(rollups.BUILT_IN_DIMENSIONS)} or a property "
            f"name (1 to 64 printable characters), got {dimension!r}"
        ) from None
    return dimension


def _period(since: TimeBound, until: TimeBound) -> tuple[int | None, int | None]:
    return bound_to_epoch_us(since, "since"), bound_to_epoch_us(until, "until")


def _open_journal(journal: bool | str | os.PathLike[str], database_url: str) -> Journal | None:
    """The crash journal asked for; a default place that cannot be used is logged and skipped
    (the app must start), an explicit one raises."""
    if journal is False:
        return None
    directory = default_directory(database_url) if journal is True else Path(journal)
    if directory is None:
        return None
    try:
        return Journal(directory)
    except OSError as exc:
        if journal is not True:
            raise ValueError(f"journal: cannot use {str(directory)!r} ({exc})") from exc
        logger.warning(
            "llm-tally: no crash journal (%s); records are only queued in memory. Set "
            "LLM_TALLY_JOURNAL_DIR or Tally(journal=...) to a writable directory.",
            exc,
        )
        return None


def _check_migrate(migrate: Migrate, create_tables: bool | None) -> bool:
    """Whether to upgrade the store at start, from ``migrate`` and its former name."""
    if migrate != "auto" and not isinstance(migrate, bool):
        raise ValueError(
            "migrate must be 'auto' (create or upgrade the store's tables at start) or False "
            f"(never change them; `llm-tally db upgrade` does), got {migrate!r}"
        )
    if create_tables is None:
        return migrate is not False
    if not isinstance(create_tables, bool):
        raise ValueError(f"create_tables must be True or False, got {create_tables!r}")
    warnings.warn(
        "Tally(create_tables=...) is deprecated: use migrate='auto' or migrate=False",
        DeprecationWarning,
        stacklevel=3,
    )
    if migrate is False and create_tables:
        raise ValueError("create_tables=True contradicts migrate=False: pass migrate only")
    return create_tables


def _restart_writers_in_child() -> None:
    # A Tally created before fork() (gunicorn --preload, multiprocessing) keeps recording in
    # each child, with the child's own writer thread, connections and journal files.
    for tally in list(_open_tallies):
        guard("restart after fork", tally._writer.restart_in_child)


os.register_at_fork(after_in_child=_restart_writers_in_child)


@atexit.register
def _close_open_tallies() -> None:
    # Records still queued at interpreter exit are stored rather than lost, within one
    # deadline for all Tallies (gunicorn gives a worker 30 s in all to stop).
    from ._shutdown import flush_before_exit

    tallies = list(_open_tallies)
    guard("flush at exit", flush_before_exit, tallies)
    for tally in tallies:
        guard("close at exit", tally.close, 1.0)

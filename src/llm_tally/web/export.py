"""Stored calls as CSV, for billing: ``llm-tally export`` and ``GET {mount}/api/export.csv``.

Cells that come from the host app or its users (user ids, models, error types...) may start
with ``=``, ``+``, ``-`` or ``@``; a spreadsheet opening the file would run such a cell as a
formula ("CSV injection"). :func:`csv_cell` prefixes those with ``'``, which spreadsheets
show as text; plain numbers such as ``-12.50`` (a negative margin) are left as they are.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .._money import nano_to_usd
from .._time import from_epoch_us

EXPORT_FIELDS = (
    "id",
    "time",
    "user_id",
    "properties",
    "provider",
    "operation",
    "request_model",
    "response_model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "cost_source",
    "status",
    "error_type",
    "http_status",
    "latency_ms",
    "usage_source",
    "request_id",
)

# What spreadsheets read as the start of a formula (OWASP's list: tab and CR too).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?\Z")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell that no spreadsheet evaluates: text starting like a formula
    gets a leading ``'``; numbers and other values are unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.match(value):
        return "'" + value
    return value


def safe_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every cell through :func:`csv_cell`."""
    return {key: csv_cell(value) for key, value in row.items()}


def export_row(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record as a CSV row: ISO-8601 UTC time, exact USD, JSON properties, and no
    cell that a spreadsheet would run as a formula."""
    cost = record["cost_nano_usd"]
    latency = record["latency_us"]
    return safe_row(
        {
            **{k: record[k] for k in EXPORT_FIELDS if k in record},
            "time": from_epoch_us(record["ts"]).isoformat().replace("+00:00", "Z"),
            "properties": json.dumps(record["properties"], sort_keys=True),
            "cost_usd": "" if cost is None else format(nano_to_usd(cost), "f"),
            "latency_ms": "" if latency is None else f"{latency / 1000:.3f}",
        }
    )


def export_csv(records: Iterable[dict[str, Any]], chunk_rows: int = 1000) -> Iterator[str]:
    """The CSV text of ``records`` (header first), in pieces of ``chunk_rows`` rows."""
    buffer = io.StringIO()
    out = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS)
    out.writeheader()
    for n, record in enumerate(records, 1):
        out.writerow(export_row(record))
        if n % chunk_rows == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()

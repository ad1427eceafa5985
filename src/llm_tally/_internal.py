"""The one place where llm-tally's own failures are caught.

llm-tally runs inside someone else's production app: a bug of ours must never
break or change the app's LLM call. Every hook calls through :func:`guard` (or
:func:`report_internal_error`), which logs each kind of failure once, counts every
occurrence, and re-raises only when the test suite asks for it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import ParamSpec, TypeVar

logger = logging.getLogger("llm_tally")

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
internal_error_counts: Counter[str] = Counter()
_raise_internal_errors = os.environ.get("LLM_TALLY_RAISE_INTERNAL_ERRORS", "") == "1"


def set_raise_internal_errors(enabled: bool) -> None:
    """Make internal errors propagate (for test suites); production keeps them quiet."""
    global _raise_internal_errors
    _raise_internal_errors = enabled


def report_internal_error(kind: str, exc: BaseException) -> None:
    """Count and log an internal failure; the first of each kind is logged with its traceback."""
    with _lock:
        internal_error_counts[kind] += 1
        first = internal_error_counts[kind] == 1
    if first:
        logger.error(
            "llm-tally internal error (%s); the app's call is unaffected. "
            "Further errors of this kind are counted, not logged.",
            kind,
            exc_info=exc,
        )
    if _raise_internal_errors:
        raise exc


def guard(kind: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    """Call ``fn``; on failure report it as ``kind`` and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        report_internal_error(kind, exc)
        return None

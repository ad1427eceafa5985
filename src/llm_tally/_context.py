"""The request-scoped ContextVar: middleware and ``llm_tally.user()`` write it, the rest reads it.

It holds a mutable :class:`~llm_tally._scope.Scope`, not the user id itself: thread
pools copy a context forwards only, so a value *set* inside a sync FastAPI
dependency would never reach the endpoint, while a change made to the shared
object does.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._scope import Scope

current_scope: ContextVar[Scope | None] = ContextVar("llm_tally_scope", default=None)

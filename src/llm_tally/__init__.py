"""llm-tally: per-user LLM usage and exact cost, recorded inside your own app.

Quick start::

    import llm_tally
    from llm_tally import Tally

    tally = Tally()                     # SQLite file ./llm_tally.db
    with llm_tally.user("user-123", plan="pro"):
        client.chat.completions.create(...)   # recorded for user-123
    tally.flush()
    print(tally.user_totals("user-123").cost_usd)
"""

from ._pricing import base_model
from ._scope import bind_user, current_user_id, tag, user
from ._tally import Tally, default_tally
from ._time import month_period
from .integrations.openai import instrument_openai, is_openai_instrumented, uninstrument_openai
from .middleware import LLMUsageMiddleware, LLMUsageWSGIMiddleware
from .storage.analytics import GroupTotals
from .storage.models import UsageRecord
from .storage.queries import DayTotals, ModelTotals, UserTotals
from .storage.schema import StoreNotUpgraded

__version__ = "0.1.0"

__all__ = [
    "DayTotals",
    "GroupTotals",
    "LLMUsageMiddleware",
    "LLMUsageWSGIMiddleware",
    "ModelTotals",
    "StoreNotUpgraded",
    "Tally",
    "UsageRecord",
    "UserTotals",
    "__version__",
    "base_model",
    "bind_user",
    "current_user_id",
    "default_tally",
    "instrument_openai",
    "is_openai_instrumented",
    "month_period",
    "tag",
    "uninstrument_openai",
    "user",
]

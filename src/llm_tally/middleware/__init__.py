"""Per-request user binding for web apps: pure ASGI (FastAPI, Starlette) and WSGI (Flask)."""

from .asgi import LLMUsageMiddleware
from .wsgi import LLMUsageWSGIMiddleware

__all__ = ["LLMUsageMiddleware", "LLMUsageWSGIMiddleware"]

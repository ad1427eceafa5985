"""Finding the request's user: the app's callables, Starlette's auth, Flask-Login, a header."""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from .._validation import user_id_from, warn_once


def check_middleware_arguments(tally: Any, identify: Any, properties: Any) -> None:
    from .._tally import Tally

    if tally is not None and not isinstance(tally, Tally):
        raise ValueError(f"tally must be a llm_tally.Tally or None, got {type(tally).__name__}")
    check_callable(identify, "identify")
    check_callable(properties, "properties")


def check_callable(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a callable or None, got {type(value).__name__}")


def check_header(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or not value.isascii() or " " in value:
        raise ValueError(
            f"user_header must be an HTTP header name such as 'X-User-Id', got {value!r}"
        )
    return value.lower()


def call_app_code(fn: Callable[..., Any], *args: Any, source: str) -> Any:
    """Call the app's own callable; its failure is logged, never raised into the request."""
    try:
        return fn(*args)
    except Exception as exc:
        warn_once(source, exc)
        return None


async def call_app_code_async(fn: Callable[..., Any], *args: Any, source: str) -> Any:
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result
    except Exception as exc:
        warn_once(source, exc)
        return None


def user_from_starlette(scope: Mapping[str, Any]) -> str | None:
    """``scope["user"]`` set by Starlette's AuthenticationMiddleware, when authenticated."""
    user = scope.get("user")
    if user is None:
        return None
    try:
        if not user.is_authenticated:
            return None
        identity = user.identity
    except (AttributeError, NotImplementedError):
        identity = getattr(user, "display_name", None)
    return user_id_from(identity, "scope['user'].identity")


def user_from_flask_login() -> str | None:
    """Flask-Login's ``current_user`` when Flask-Login is installed and the user logged in."""
    try:
        from flask_login import current_user
    except ImportError:
        return None
    try:
        if not current_user.is_authenticated:
            return None
        return user_id_from(current_user.get_id(), "flask_login.current_user.get_id()")
    except Exception as exc:
        warn_once("flask_login.current_user", exc)
        return None


def user_from_asgi_header(scope: Mapping[str, Any], header: str | None) -> str | None:
    if header is None:
        return None
    wanted = header.encode("latin-1")
    for name, value in scope.get("headers", ()):
        if name.lower() == wanted:
            return user_id_from(value.decode("latin-1"), f"header {header}")
    return None


def user_from_environ_header(environ: Mapping[str, Any], header: str | None) -> str | None:
    if header is None:
        return None
    value = environ.get("HTTP_" + header.upper().replace("-", "_"))
    return user_id_from(value, f"header {header}") if value else None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"

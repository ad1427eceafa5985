"""WSGI middleware: the same per-request scope for Flask and any WSGI app."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .._context import current_scope
from .._scope import Scope as UsageScope
from .._shutdown import flush_on_sigterm
from .._validation import properties_from, user_id_from
from ._identify import (
    call_app_code,
    check_header,
    check_middleware_arguments,
    user_from_environ_header,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .._tally import Tally


class LLMUsageWSGIMiddleware:
    """Opens a usage scope for each request of a WSGI app.

    The app runs in a copy of the caller's context, so nothing leaks to the next request a
    worker thread serves, and each piece of a streamed body is produced inside that same
    context (a streamed response that calls the LLM is charged to the right user). LLM
    streams still open when the response is closed are recorded as aborted.

    ``identify(environ)`` and ``properties(environ)`` run at the start of the request; for
    Flask, prefer ``tally.init_app(app, ...)``, whose callables run inside the request context.

    Created in the main thread of a process where SIGTERM would end it at once (werkzeug's
    server), it makes SIGTERM store the queued records first; see docs/operations.md#shutdown.
    """

    def __init__(
        self,
        app: WSGIApplication,
        tally: Tally | None = None,
        identify: Callable[[WSGIEnvironment], Any] | None = None,
        properties: Callable[[WSGIEnvironment], dict[str, Any]] | None = None,
        user_header: str | None = None,
    ) -> None:
        check_middleware_arguments(tally, identify, properties)
        self.app = app
        self.tally = tally
        self.identify = identify
        self.properties = properties
        self.user_header = check_header(user_header)
        # Set by tally.init_app(flask_app): resolvers that run inside Flask's request context.
        self.resolve_user: Callable[[], str | None] | None = None
        self.resolve_properties: Callable[[], dict[str, str]] | None = None
        flush_on_sigterm()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        usage = UsageScope(None, {}, self.tally, abort_open_calls_on_exit=True)
        if self.identify is not None:
            found = call_app_code(self.identify, environ, source="identify")
            usage.user_id = user_id_from(found, "identify()")
        if self.properties is not None:
            found = call_app_code(self.properties, environ, source="properties")
            usage.properties = properties_from(found, "properties()")
        header = self.user_header
        resolve_user = self.resolve_user
        if resolve_user is not None:
            usage.resolve_user = lambda: resolve_user() or user_from_environ_header(environ, header)
        elif header is not None:
            usage.resolve_user = lambda: user_from_environ_header(environ, header)
        usage.resolve_properties = self.resolve_properties
        context = contextvars.copy_context()
        context.run(current_scope.set, usage)
        try:
            body = context.run(self.app, environ, start_response)
        except BaseException:
            usage.close()
            raise
        return _ScopedBody(body, context, usage)


class _ScopedBody:
    """The response body, produced piece by piece inside the request's context."""

    def __init__(self, body: Iterable[bytes], context: contextvars.Context, usage: UsageScope):
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._context = context
        self._usage = usage

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._usage.close()

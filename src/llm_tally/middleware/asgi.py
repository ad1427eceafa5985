"""Pure ASGI middleware: every LLM call made while serving a request is charged to its user."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._context import current_scope
from .._scope import Scope as UsageScope
from .._shutdown import SHUTDOWN_FLUSH_TIMEOUT, flush_before_exit
from .._tally import default_tally
from .._validation import properties_from, user_id_from
from ._identify import (
    call_app_code_async,
    check_header,
    check_middleware_arguments,
    user_from_asgi_header,
    user_from_starlette,
)

if TYPE_CHECKING:
    from .._tally import Tally

Identify = Callable[[Request], Any | Awaitable[Any]]
Properties = Callable[[Request], dict[str, Any] | Awaitable[dict[str, Any]]]


class LLMUsageMiddleware:
    """Opens a usage scope for each HTTP request; websocket and lifespan pass through. At
    lifespan shutdown, before the server hears "shutdown complete", it waits (at most
    ``shutdown_flush_timeout`` seconds, logged when that is not enough) until every call
    recorded so far is stored: a server that exits right after, or re-raises SIGTERM as
    uvicorn does, loses nothing.

    The request's user is, in order: ``llm_tally.bind_user()`` called while serving it (for
    example in an auth dependency); ``identify(request)`` (sync or async); Starlette's
    ``scope["user"]`` when authenticated; the ``user_header`` if you opted in to trusting
    one. ``properties(request)`` adds properties such as the user's plan. LLM streams still
    open when the request ends are recorded as aborted.
    """

    def __init__(
        self,
        app: ASGIApp,
        tally: Tally | None = None,
        identify: Identify | None = None,
        properties: Properties | None = None,
        user_header: str | None = None,
        shutdown_flush_timeout: float = SHUTDOWN_FLUSH_TIMEOUT,
    ) -> None:
        check_middleware_arguments(tally, identify, properties)
        self.shutdown_flush_timeout = shutdown_flush_timeout
        self.app = app
        self.tally = tally
        self.identify = identify
        self.properties = properties
        self.user_header = check_header(user_header)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._flushing_at_shutdown(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        usage = UsageScope(None, {}, self.tally, abort_open_calls_on_exit=True)
        usage.resolve_user = functools.partial(_later_user, scope, self.user_header)
        token = current_scope.set(usage)
        response_done = False

        async def receive_or_disconnect() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not response_done:
                # The client left mid-response. The request may not end for a while (a sync
                # generator blocked on the LLM holds it): record its open LLM streams now.
                usage.close()
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal response_done
            if message["type"] == "http.response.body" and not message.get("more_body"):
                response_done = True
            await send(message)

        try:
            if self.identify is not None or self.properties is not None:
                await self._identify(usage, Request(scope, receive))
            await self.app(scope, receive_or_disconnect, send_and_note)
        finally:
            current_scope.reset(token)
            usage.close()

    def _flushing_at_shutdown(self, send: Send) -> Send:
        async def send_after_flush(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await run_in_threadpool(self._flush)
            await send(message)

        return send_after_flush

    def _flush(self) -> None:
        tally = self.tally or default_tally()
        if tally is not None:
            flush_before_exit([tally], self.shutdown_flush_timeout)

    async def _identify(self, usage: UsageScope, request: Request) -> None:
        if self.identify is not None:
            found = await call_app_code_async(self.identify, request, source="identify")
            usage.user_id = usage.user_id or user_id_from(found, "identify()")
        if self.properties is not None:
            found = await call_app_code_async(self.properties, request, source="properties")
            usage.properties = {**properties_from(found, "properties()"), **usage.properties}


def _later_user(scope: Scope, header: str | None) -> str | None:
    # Asked when a call starts: an AuthenticationMiddleware inside ours has run by then.
    return user_from_starlette(scope) or user_from_asgi_header(scope, header)


async def request_user(
    request: Request, identify: Identify | None, user_header: str | None
) -> str | None:
    """The user of ``request`` as the middleware sees it (for ``/api/me``)."""
    usage = current_scope.get()
    if usage is not None and usage.who()[0] is not None:
        return usage.who()[0]
    if identify is not None:
        found = user_id_from(
            await call_app_code_async(identify, request, source="identify"), "identify()"
        )
        if found is not None:
            return found
    return _later_user(request.scope, user_header)

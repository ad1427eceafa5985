"""The ``/llm-usage`` endpoint as a Starlette app, and ``init_app`` for Starlette/FastAPI."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from ..middleware._identify import (
    call_app_code_async,
    check_callable,
    check_header,
    check_middleware_arguments,
    is_loopback,
)
from ..middleware.asgi import Identify, LLMUsageMiddleware, Properties, request_user
from ..storage.insights import Revenue
from . import routes

if TYPE_CHECKING:
    from .._tally import Tally

Authorize = Callable[[Request], bool | Awaitable[bool]]


class _AnyText(PathConvertor):
    """Any text, line breaks included (Starlette's ``path`` stops at one)."""

    regex = "(?s:.*)"


register_url_convertor(routes.ANY_PATH, _AnyText())


class _Mount(Mount):
    """A mount whose sub-path may hold line breaks too (Starlette's stops at one): a user id
    holding one reaches the endpoint and gets its 400, as on Flask, not a 404."""

    def __init__(self, path: str, app: ASGIApp) -> None:
        super().__init__(path, app=app)
        self.path_regex = re.compile(self.path_regex.pattern, re.DOTALL)


_FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")


def default_authorize(request: Request) -> bool:
    """Loopback clients only, and only when no proxy forwarded the request."""
    client = request.client.host if request.client else None
    return is_loopback(client) and not any(h in request.headers for h in _FORWARDED)


def usage_app(
    tally: Tally,
    *,
    authorize: Authorize | None = None,
    identify: Identify | None = None,
    user_header: str | None = None,
    revenue: Revenue | None = None,
) -> Starlette:
    """The ``/llm-usage`` endpoint as an ASGI app, to mount anywhere."""
    check_callable(authorize, "authorize")
    check_callable(identify, "identify")
    header = check_header(user_header)
    allowed = authorize or default_authorize
    endpoint = routes.Endpoint(tally, revenue)

    def serve(route: routes.Route) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            caller = None
            if route.access == "caller":
                caller = await request_user(request, identify, header)
                if caller is None:
                    return _response(routes.no_user())
            # A failing authorize() denies access (and is logged); it never answers 500.
            elif await call_app_code_async(allowed, request, source="authorize") is not True:
                return _response(routes.forbidden())
            asked = routes.Asked(
                request.path_params,
                request.query_params,
                caller,
                # The mount's path as the client sees it (Mount and the server's root_path).
                request.scope.get("root_path", ""),
            )
            # Queries block: off the event loop.
            return _response(await run_in_threadpool(route.handle, endpoint, asked))

        return handle

    return Starlette(
        routes=[
            Route(route.template("starlette"), serve(route), methods=["GET"])
            for route in routes.ROUTES
        ]
    )


def _response(answer: routes.Answer) -> Response:
    if isinstance(answer.body, str):
        return Response(answer.body, answer.status, answer.headers, answer.media_type)
    # The CSV export: its rows are read from the store as they are sent.
    return StreamingResponse(answer.body, answer.status, answer.headers, answer.media_type)


def init_starlette(
    tally: Tally,
    app: Any,
    *,
    identify: Identify | None,
    properties: Properties | None,
    authorize: Authorize | None,
    mount_path: str,
    user_header: str | None,
    revenue: Revenue | None,
) -> None:
    if getattr(app.state, "llm_tally", None) is not None:
        raise RuntimeError(
            "llm-tally is already set up on this app: call tally.init_app(app) once per app."
        )
    # Check everything before touching the app: Starlette builds middleware only at the first
    # request, so a bad argument would otherwise surface as a 500 on every request.
    check_middleware_arguments(tally, identify, properties)
    endpoint = usage_app(
        tally, authorize=authorize, identify=identify, user_header=user_header, revenue=revenue
    )
    app.add_middleware(
        LLMUsageMiddleware,
        tally=tally,
        identify=identify,
        properties=properties,
        user_header=user_header,
    )
    app.router.routes.append(_Mount(mount_path, endpoint))
    app.state.llm_tally = tally

"""The ``/llm-usage`` endpoint as a Starlette app, and ``init_app`` for Starlette/FastAPI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..middleware._identify import (
    call_app_code_async,
    check_callable,
    check_header,
    check_middleware_arguments,
    is_loopback,
)
from ..middleware.asgi import Identify, LLMUsageMiddleware, Properties, request_user
from ..storage.insights import Revenue
from . import api, dashboard

if TYPE_CHECKING:
    from .._tally import Tally

Authorize = Callable[[Request], bool | Awaitable[bool]]
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

    async def is_allowed(request: Request) -> bool:
        # A failing authorize() denies access (and is logged); it never answers 500.
        return await call_app_code_async(allowed, request, source="authorize") is True

    def protected(
        handler: Callable[[Request], dict[str, Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not await is_allowed(request):
                return JSONResponse({"error": api.FORBIDDEN_MESSAGE}, status_code=403)
            try:
                # Queries block: off the event loop.
                return JSONResponse(await run_in_threadpool(handler, request))
            except api.ApiError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)

        return endpoint

    def page(
        render: Callable[[Request], tuple[int, str]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not await is_allowed(request):
                return JSONResponse({"error": api.FORBIDDEN_MESSAGE}, status_code=403)
            # A page runs several queries: off the event loop.
            status, body = await run_in_threadpool(render, request)
            return HTMLResponse(body, status_code=status)

        return endpoint

    async def me(request: Request) -> Response:
        user_id = await request_user(request, identify, header)
        if user_id is None:
            return JSONResponse({"error": api.NO_USER_MESSAGE}, status_code=401)
        try:
            detail = await run_in_threadpool(api.user_detail, tally, user_id, request.query_params)
            return JSONResponse(detail)
        except api.ApiError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    routes = [
        Route(
            "/",
            page(lambda r: dashboard.users_page(tally, r.query_params)),
            methods=["GET"],
        ),
        Route(
            "/anomalies",
            page(lambda r: dashboard.anomalies_page(tally, r.query_params)),
            methods=["GET"],
        ),
        Route(
            "/users/{user_id:path}",
            page(lambda r: dashboard.user_page(tally, r.path_params["user_id"], r.query_params)),
            methods=["GET"],
        ),
        Route("/api/me", me, methods=["GET"]),
        Route(
            "/api/users",
            protected(lambda r: api.users_page(tally, r.query_params)),
            methods=["GET"],
        ),
        Route("/api/health", protected(lambda r: api.health_page(tally, r.query_params))),
        Route("/api/activity", protected(lambda r: api.activity_page(tally, r.query_params))),
        Route("/api/anomalies", protected(lambda r: api.anomalies_page(tally, r.query_params))),
        Route("/api/expensive", protected(lambda r: api.expensive_page(tally, r.query_params))),
        Route(
            "/api/profitability",
            protected(lambda r: api.profitability_page(tally, revenue, r.query_params)),
        ),
        Route(
            "/api/by/{dimension}",
            protected(
                lambda r: api.totals_by_page(tally, r.path_params["dimension"], r.query_params)
            ),
            methods=["GET"],
        ),
        Route(
            "/api/users/{user_id:path}",
            protected(lambda r: api.user_detail(tally, r.path_params["user_id"], r.query_params)),
            methods=["GET"],
        ),
    ]
    return Starlette(routes=routes)


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
    app.mount(mount_path, endpoint)
    app.state.llm_tally = tally

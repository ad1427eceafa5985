"""``init_app`` for Flask: the WSGI middleware, resolvers in the request context, the endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._context import current_scope
from .._scope import current_user_id
from .._validation import properties_from, user_id_from
from ..middleware._identify import (
    call_app_code,
    check_callable,
    check_header,
    is_loopback,
    user_from_environ_header,
    user_from_flask_login,
)
from ..middleware.wsgi import LLMUsageWSGIMiddleware
from ..storage.insights import Revenue
from . import api, dashboard

if TYPE_CHECKING:
    from flask import Flask, Response

    from .._tally import Tally

EXTENSION = "llm_tally"
_FORWARDED = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def init_flask(
    tally: Tally,
    app: Flask,
    *,
    identify: Callable[[], Any] | None,
    properties: Callable[[], dict[str, Any]] | None,
    authorize: Callable[[Any], bool] | None,
    mount_path: str,
    user_header: str | None,
    revenue: Revenue | None,
) -> None:
    from flask import Blueprint, jsonify, request

    if EXTENSION in app.extensions:
        raise RuntimeError(
            "llm-tally is already set up on this app: call tally.init_app(app) once per app."
        )
    check_callable(identify, "identify")
    check_callable(properties, "properties")
    check_callable(authorize, "authorize")
    mount_path = api.check_mount_path(app.config.get("LLM_TALLY_MOUNT_PATH", mount_path))
    header = check_header(app.config.get("LLM_TALLY_USER_HEADER", user_header))

    def resolve_user() -> str | None:
        # Runs when an LLM call starts, inside the request context: the app's own login has
        # run by then, whatever order its before_request hooks were registered in.
        if identify is not None:
            found = user_id_from(call_app_code(identify, source="identify"), "identify()")
            if found is not None:
                return found
        return user_from_flask_login()

    def resolve_properties() -> dict[str, str]:
        if properties is None:
            return {}
        return properties_from(call_app_code(properties, source="properties"), "properties()")

    middleware = LLMUsageWSGIMiddleware(app.wsgi_app, tally=tally, user_header=header)
    middleware.resolve_user = resolve_user
    middleware.resolve_properties = resolve_properties if properties is not None else None
    app.wsgi_app = middleware  # type: ignore[method-assign]

    @app.after_request
    def resolve_before_streaming(response: Response) -> Response:
        # A streamed body runs after Flask popped the request context (unless the app used
        # stream_with_context): ask who the user is now, while identify() and Flask-Login
        # still work.
        if response.is_streamed:
            usage = current_scope.get()
            if usage is not None and usage.tally is tally:
                usage.who()
        return response

    def allowed() -> bool:
        if authorize is not None:
            return call_app_code(authorize, request, source="authorize") is True
        return is_loopback(request.remote_addr) and not any(
            h in request.headers for h in _FORWARDED
        )

    def params() -> dict[str, str]:
        # The last value of a repeated parameter, as Starlette reads it on the ASGI side.
        return {key: values[-1] for key, values in request.args.lists()}

    def answer(build: Callable[[], dict[str, Any]], check: bool = True) -> tuple[Response, int]:
        if check and not allowed():
            return jsonify({"error": api.FORBIDDEN_MESSAGE}), 403
        try:
            return jsonify(build()), 200
        except api.ApiError as exc:
            return jsonify({"error": exc.message}), exc.status

    blueprint = Blueprint("llm_tally", __name__, url_prefix=mount_path.rstrip("/") or None)

    def page(render: Callable[[], tuple[int, str]]) -> Any:
        if not allowed():
            return jsonify({"error": api.FORBIDDEN_MESSAGE}), 403
        status, body = render()
        return body, status

    @blueprint.get("/")
    def index() -> Any:
        return page(lambda: dashboard.users_page(tally, params()))

    @blueprint.get("/anomalies")
    def anomalies_page() -> Any:
        return page(lambda: dashboard.anomalies_page(tally, params()))

    @blueprint.get("/users/<path:user_id>")
    def user_page(user_id: str) -> Any:
        return page(lambda: dashboard.user_page(tally, user_id, params()))

    @blueprint.get("/api/users")
    def users() -> Any:
        return answer(lambda: api.users_page(tally, params()))

    @blueprint.get("/api/users/<path:user_id>")
    def user_detail(user_id: str) -> Any:
        return answer(lambda: api.user_detail(tally, user_id, params()))

    @blueprint.get("/api/health")
    def health() -> Any:
        return answer(lambda: api.health_page(tally, params()))

    @blueprint.get("/api/activity")
    def activity() -> Any:
        return answer(lambda: api.activity_page(tally, params()))

    @blueprint.get("/api/anomalies")
    def anomalies() -> Any:
        return answer(lambda: api.anomalies_page(tally, params()))

    @blueprint.get("/api/expensive")
    def expensive() -> Any:
        return answer(lambda: api.expensive_page(tally, params()))

    @blueprint.get("/api/profitability")
    def profitability() -> Any:
        return answer(lambda: api.profitability_page(tally, revenue, params()))

    @blueprint.get("/api/by/<dimension>")
    def totals_by(dimension: str) -> Any:
        return answer(lambda: api.totals_by_page(tally, dimension, params()))

    @blueprint.get("/api/me")
    def me() -> Any:
        user_id = current_user_id() or user_from_environ_header(request.environ, header)
        if user_id is None:
            return jsonify({"error": api.NO_USER_MESSAGE}), 401
        return answer(lambda: api.user_detail(tally, user_id, params()), check=False)

    app.register_blueprint(blueprint)
    app.extensions[EXTENSION] = tally

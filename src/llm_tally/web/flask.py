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
from . import api, routes

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
    from flask import Blueprint, request

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

    endpoint = routes.Endpoint(tally, revenue)

    def view_of(route: routes.Route) -> Callable[..., Response]:
        def view(**path: str) -> Response:
            caller = None
            if route.access == "caller":
                caller = current_user_id() or user_from_environ_header(request.environ, header)
                if caller is None:
                    return _response(routes.no_user())
            elif not allowed():
                return _response(routes.forbidden())
            asked = routes.Asked(path, params(), caller, request.script_root + mount_path)
            return _response(route.handle(endpoint, asked))

        return view

    app.url_map.converters.setdefault(routes.ANY_PATH, _any_text_converter())
    blueprint = Blueprint("llm_tally", __name__, url_prefix=mount_path)
    for route in routes.ROUTES:
        blueprint.add_url_rule(
            route.template("flask"),
            route.name,
            view_of(route),
            methods=["GET"],
            # A user id may hold "//": never redirect to another id's page.
            merge_slashes=False,
        )
    app.register_blueprint(blueprint)
    app.extensions[EXTENSION] = tally


def _response(answer: routes.Answer) -> Response:
    from flask import Response

    return Response(answer.body, answer.status, answer.headers, content_type=answer.media_type)


def _any_text_converter() -> type:
    from werkzeug.routing import PathConverter

    class AnyText(PathConverter):
        """Any text, a leading "/" included (werkzeug's ``path`` refuses one)."""

        regex = "(?s:.*?)"
        part_isolating = False

    return AnyText

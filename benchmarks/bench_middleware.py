"""Time the per-request cost of llm-tally's web middleware against the bare app.

Calls the apps through their server interfaces directly (ASGI: ``await app(scope,
receive, send)``; WSGI: ``app(environ, start_response)``), in one process, so the
numbers are the middleware's own work with no network or server noise. Bare and
wrapped requests alternate in blocks to cancel drift.

    python benchmarks/bench_middleware.py [--requests 20000] [--block 500]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import print_machine_info
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from llm_tally import LLMUsageMiddleware, LLMUsageWSGIMiddleware, Tally


def starlette_app() -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/", hello)])


def http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-user-id", b"user-1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def time_asgi(app: Any, n: int) -> list[float]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    times = []
    for _ in range(n):
        scope = http_scope()
        start = time.perf_counter()
        await app(scope, receive, send)
        times.append(time.perf_counter() - start)
    return times


def time_wsgi(app: Callable[..., Any], n: int) -> list[float]:
    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        return None

    environ_base = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_X_USER_ID": "user-1",
    }
    times = []
    for _ in range(n):
        environ = dict(environ_base)
        environ["wsgi.input"] = io.BytesIO(b"")
        start = time.perf_counter()
        body = app(environ, start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
        times.append(time.perf_counter() - start)
    return times


def compare(
    name: str,
    bare: Callable[[int], list[float]],
    wrapped: Callable[[int], list[float]],
    total: int,
    block: int,
) -> None:
    bare(block)
    wrapped(block)  # warm-up
    bare_times: list[float] = []
    wrapped_times: list[float] = []
    for _ in range(total // block):
        bare_times += bare(block)
        wrapped_times += wrapped(block)
    b = statistics.median(bare_times) * 1e6
    w = statistics.median(wrapped_times) * 1e6
    print(f"{name:<42} bare {b:8.2f} µs   with llm-tally {w:8.2f} µs   added {w - b:6.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--block", type=int, default=500)
    args = parser.parse_args()
    print_machine_info()
    with tempfile.TemporaryDirectory() as tmp, Tally(f"sqlite:///{tmp}/bench.db") as tally:
        bare_asgi = starlette_app()
        wrapped_asgi = LLMUsageMiddleware(starlette_app(), tally=tally)

        async def identify(request: Request) -> str | None:
            return request.headers.get("x-user-id")

        identified_asgi = LLMUsageMiddleware(starlette_app(), tally=tally, identify=identify)
        loop = asyncio.new_event_loop()
        run = loop.run_until_complete
        compare(
            "Starlette, LLMUsageMiddleware",
            lambda n: run(time_asgi(bare_asgi, n)),
            lambda n: run(time_asgi(wrapped_asgi, n)),
            args.requests,
            args.block,
        )
        compare(
            "Starlette, LLMUsageMiddleware + async identify",
            lambda n: run(time_asgi(bare_asgi, n)),
            lambda n: run(time_asgi(identified_asgi, n)),
            args.requests,
            args.block,
        )
        loop.close()

        def flask_app() -> Flask:
            app = Flask("bench")
            app.get("/")(lambda: "hello")
            return app

        bare_flask = flask_app()
        wrapped_flask = flask_app()
        tally.init_app(wrapped_flask)
        compare(
            "Flask, tally.init_app (WSGI middleware)",
            lambda n: time_wsgi(bare_flask, n),
            lambda n: time_wsgi(wrapped_flask, n),
            args.requests,
            args.block,
        )
        bare_wsgi = flask_app().wsgi_app
        wrapped_wsgi = LLMUsageWSGIMiddleware(flask_app().wsgi_app, tally=tally)
        compare(
            "WSGI, LLMUsageWSGIMiddleware",
            lambda n: time_wsgi(bare_wsgi, n),
            lambda n: time_wsgi(wrapped_wsgi, n),
            args.requests,
            args.block,
        )


if __name__ == "__main__":
    main()

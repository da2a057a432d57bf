"""Chapter 01 with one mistake: an HTTP session opened at startup and never closed."""

import logging
import os

import aiohttp
from aiohttp import web

log = logging.getLogger("app")


@web.middleware
async def json_errors(request: web.Request, handler):
    """Turn every error into JSON, so a client never sees HTML or a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        return web.json_response(
            {"error": exc.reason, "status": exc.status},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k == "Allow"},
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": "Internal Server Error", "status": 500}, status=500)


async def index(request: web.Request) -> web.Response:
    return web.json_response({"message": "Hello from aiohttp"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


http = web.AppKey("http", aiohttp.ClientSession)


async def http_session(app: web.Application):
    app[http] = aiohttp.ClientSession()
    yield  # the mistake: no `await app[http].close()` here


def create_app() -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app.cleanup_ctx.append(http_session)
    app.add_routes([web.get("/", index), web.get("/health", health)])
    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    web.run_app(create_app(), host="0.0.0.0", port=int(os.environ.get("PORT", "8080")))

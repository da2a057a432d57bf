"""Chapter 01: the smallest useful aiohttp service, built by an app factory."""

import logging
import os

from aiohttp import web

log = logging.getLogger("app")


# --8<-- [start:errors]
@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error as JSON: a client never sees HTML or a traceback."""
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
        return web.json_response(
            {"error": "Internal Server Error", "status": 500}, status=500
        )


# --8<-- [end:errors]


# --8<-- [start:handlers]
async def index(request: web.Request) -> web.Response:
    return web.json_response({"message": "Hello from aiohttp"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# --8<-- [end:handlers]


# --8<-- [start:factory]
def create_app() -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app.add_routes([web.get("/", index), web.get("/health", health)])
    return app


# --8<-- [end:factory]


# --8<-- [start:main]
if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    port = int(os.environ.get("PORT", "8080"))
    web.run_app(create_app(), host="0.0.0.0", port=port)
# --8<-- [end:main]

"""Chapter 10: the service as chapter 09 left it, made observable: logs.py
(JSON lines with request ids) and metrics.py (Prometheus, summed across
workers) beside database.py, probes.py, migrate.py and this one (the app,
its routes and its errors)."""

import datetime
import decimal
import functools
import json
import logging
import logging.config
import os
import uuid
from http import HTTPStatus

import aiohttp
import logs
import metrics
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

# Gunicorn and `python app.py` run from this folder, so these import.
from database import (
    CONNECT_TIMEOUT,
    DB_UNAVAILABLE,
    POOL_MAX_SIZE,
    POOL_MIN_SIZE,
    db_pool,
    pg_pool,
    refuse,
)
from probes import READY_TIMEOUT, health, ready

# Names other files read from app.py (gunicorn.conf.py, the tests).
__all__ = [
    "CONNECT_TIMEOUT",
    "POOL_MAX_SIZE",
    "POOL_MIN_SIZE",
    "READY_TIMEOUT",
    "create_app",
]

log = logging.getLogger("app")

# --8<-- [start:keys]
# A typed key: a string key like app["pool"] warns (erratum 8).
# db_pool is database.py's.
http_session = web.AppKey("http_session", aiohttp.ClientSession)
# --8<-- [end:keys]

# --8<-- [start:config]
UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8081/")
# Shorter than the worker's drain (gunicorn.conf.py): a call in flight
# at SIGTERM ends before the worker cuts it.
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=5)
# --8<-- [end:config]


# --8<-- [start:json]
def to_json(value):
    """The types PostgreSQL hands back that json.dumps cannot encode."""
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)  # a string keeps every digit; a float would round
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


dumps = functools.partial(json.dumps, default=to_json)
# --8<-- [end:json]


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
    # --8<-- [start:unavailable]
    except DB_UNAVAILABLE as exc:
        log.warning(
            "database unavailable on %s %s: %r",
            request.method,
            request.path,
            exc,
        )
        return web.json_response(
            {"error": "Database Unavailable", "status": 503}, status=503
        )
    # --8<-- [end:unavailable]
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(
            {"error": "Internal Server Error", "status": 500}, status=500
        )


# --8<-- [start:rejected]
class QuietRejections(logging.LoggerAdapter):
    """aiohttp's server log, with one INFO line for a request HTTP rejects.

    aiohttp answers those before any middleware, and would log each as an
    ERROR with a traceback: any client could fill the log at will.
    """

    def exception(self, msg, *args, exc_info=True, **kwargs):
        if isinstance(exc_info, HttpProcessingError):
            self.info(
                "rejected a malformed request (%s)", type(exc_info).__name__
            )
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


async def plain_server_header(request, response) -> None:
    # Not "Python/3.x aiohttp/3.y": a version tells an attacker what to try.
    response.headers["Server"] = "aiohttp"


def handle_error_in_json(
    handler, aiohttp_handle_error, request, status=500, exc=None, message=None
):
    """aiohttp's own error answer, as JSON that does not quote the input."""
    aiohttp_handle_error(handler, request, status, exc, message)  # logs it
    answer = web.json_response(
        {"error": HTTPStatus(status).phrase, "status": status},
        status=status,
        headers={"Server": "aiohttp"},
    )
    answer.force_close()  # as aiohttp does: the connection may be garbled
    return answer


async def json_rejections(app: web.Application):
    # aiohttp builds this answer itself, before any middleware, and has no
    # hook for it (aio-libs/aiohttp#3287): wrap the method while we run.
    aiohttp_handle_error = web.RequestHandler.handle_error
    web.RequestHandler.handle_error = functools.partialmethod(
        handle_error_in_json, aiohttp_handle_error
    )
    yield
    web.RequestHandler.handle_error = aiohttp_handle_error


# --8<-- [end:rejected]


# --8<-- [start:http_client]
async def http_client(app: web.Application):
    # Made in the running loop: at module scope it raises (erratum 7).
    # After pg_pool: if the pool fails, no session is left open (erratum 9).
    session = aiohttp.ClientSession(
        timeout=UPSTREAM_TIMEOUT, raise_for_status=True
    )
    app[http_session] = session
    yield
    await session.close()
    log.info("http session closed (pid %d)", os.getpid())


async def announce_shutdown(app: web.Application) -> None:
    # on_shutdown: the socket is closed, in-flight requests not yet awaited.
    log.info(
        "shutdown started (pid %d): draining in-flight requests", os.getpid()
    )


# --8<-- [end:http_client]


async def index(request: web.Request) -> web.Response:
    return web.json_response({"message": "Hello from aiohttp"})


# --8<-- [start:get_user]
INT4_MAX = 2**31 - 1  # users.id is an integer column
# Named, never *: after an ADD COLUMN, a cached SELECT * changes shape
# under a running replica. Deploy 1 reads the new column and no longer
# the old one, so deploy 2 can drop name.
USER_COLUMNS = "id, public_id, display_name, email, balance, created_at"


async def get_user(request: web.Request) -> web.Response:
    # The route takes 1-10 ASCII digits, no leading zero; the range is ours.
    user_id = int(request.match_info["id"])
    if user_id > INT4_MAX:
        raise web.HTTPNotFound(reason="User Not Found")
    async with request.app[db_pool].acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id
        )
    if row is None:
        raise web.HTTPNotFound(reason="User Not Found")
    return web.json_response(dict(row), dumps=dumps)


# --8<-- [end:get_user]


# --8<-- [start:upstream]
async def upstream(request: web.Request) -> web.Response:
    """Call the upstream service with the shared session; pass on its JSON."""
    try:
        async with request.app[http_session].get(UPSTREAM_URL) as response:
            body = await response.json(content_type=None)
    except TimeoutError:
        raise web.HTTPGatewayTimeout(reason="Upstream Timeout") from None
    # refused, an error status, or a body that is not JSON
    except (aiohttp.ClientError, ValueError):
        raise web.HTTPBadGateway(reason="Upstream Unavailable") from None
    return web.json_response({"upstream": body})


# --8<-- [end:upstream]


# --8<-- [start:factory]
def create_app() -> web.Application:
    try:  # chapter 10: counted in memory, /metrics would show nothing
        metrics.check_mode()
    except RuntimeError as exc:
        refuse(str(exc))
    server_log = QuietRejections(logging.getLogger("aiohttp.server"), {})
    app = web.Application(
        middlewares=[metrics.observe, json_errors],  # observe: chapter 10
        handler_args={"logger": server_log},
    )
    app.on_response_prepare.append(plain_server_header)
    app.cleanup_ctx.append(json_rejections)
    app.cleanup_ctx.append(pg_pool)
    app.cleanup_ctx.append(metrics.pool_gauges(db_pool))  # chapter 10
    app.cleanup_ctx.append(http_client)
    app.on_shutdown.append(announce_shutdown)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/health", health),
            web.get("/ready", ready),
            web.get("/users/{id:[1-9][0-9]{0,9}}", get_user),
            web.get("/upstream", upstream),
            web.get("/metrics", metrics.metrics),  # chapter 10
        ]
    )
    return app


# --8<-- [end:factory]


# --8<-- [start:main]
if __name__ == "__main__":
    logging.config.dictConfig(logs.config())  # chapter 10: as Gunicorn's
    port = int(os.environ.get("PORT", "8080"))
    web.run_app(create_app(), host="0.0.0.0", port=port)
# --8<-- [end:main]

"""Chapter 02: an asyncpg pool in a cleanup context; a user looked up by id."""

import asyncio
import datetime
import decimal
import functools
import json
import logging
import os
import uuid

import asyncpg
from aiohttp import web

log = logging.getLogger("app")

# --8<-- [start:keys]
# A typed key: a string key like app["pool"] warns (erratum 8).
db_pool = web.AppKey("db_pool", asyncpg.Pool)
# --8<-- [end:keys]

# --8<-- [start:config]
DEFAULT_DATABASE_URL = "postgresql://postgres@localhost:5432/postgres"
POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 10
CONNECT_TIMEOUT = 5.0  # seconds; asyncpg waits 60 by default
# --8<-- [end:config]

# "The database is not there right now", as opposed to a bug in our code.
DB_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
)
# At startup a wrong password or database name is as fatal as no server.
DB_STARTUP_ERRORS = DB_UNAVAILABLE + (asyncpg.PostgresError, ValueError)

# Gunicorn's "worker failed to boot": the master stops, no endless respawn.
EXIT_NO_DATABASE = 3


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


# --8<-- [start:pool]
async def pg_pool(app: web.Application):
    try:
        pool = await asyncpg.create_pool(
            dsn=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            timeout=CONNECT_TIMEOUT,
        )
    except DB_STARTUP_ERRORS as exc:
        # One clear line, not a traceback, and a non-zero exit (erratum 11).
        log.critical(
            "cannot reach the database: %r; is DATABASE_URL right "
            "and the server up?",
            exc,
        )
        raise SystemExit(EXIT_NO_DATABASE) from None
    app[db_pool] = pool
    log.info(
        "pool ready (pid %d, min_size=%d, max_size=%d)",
        os.getpid(),
        POOL_MIN_SIZE,
        POOL_MAX_SIZE,
    )
    yield
    await pool.close()
    log.info("pool closed (pid %d)", os.getpid())


# --8<-- [end:pool]


async def index(request: web.Request) -> web.Response:
    return web.json_response({"message": "Hello from aiohttp"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# --8<-- [start:get_user]
INT4_MAX = 2**31 - 1  # users.id is an integer column
USER_COLUMNS = "id, public_id, name, email, balance, created_at"


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


# --8<-- [start:factory]
def create_app() -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app.cleanup_ctx.append(pg_pool)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/health", health),
            web.get("/users/{id:[1-9][0-9]{0,9}}", get_user),
        ]
    )
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

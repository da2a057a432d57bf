# A correct chapter 02 written another way: none of the reference chapter's names but
# create_app(), which `python app.py` and Gunicorn call. make check must pass it.
import datetime
import decimal
import json
import logging
import os
import re
import sys
import uuid

import asyncpg
from aiohttp import web

logger = logging.getLogger("users-service")

PG = web.AppKey("postgres", asyncpg.Pool)
MIN_CONNECTIONS, MAX_CONNECTIONS = 2, 10
GIVE_UP_AFTER = 5  # seconds to wait for a database that does not answer
CANONICAL_ID = re.compile(r"[1-9][0-9]{0,9}")


class RowEncoder(json.JSONEncoder):
    def default(self, o):
        if isinstance(o, (datetime.date, datetime.datetime)):
            return o.isoformat()
        if isinstance(o, (decimal.Decimal, uuid.UUID)):
            return str(o)
        return super().default(o)


def problem(status: int, reason: str, headers=None) -> web.Response:
    return web.json_response({"error": reason, "status": status}, status=status, headers=headers)


@web.middleware
async def errors_as_json(request, handler):
    try:
        return await handler(request)
    except web.HTTPError as error:
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return problem(error.status, error.reason, allow)
    except Exception:
        logger.exception("request failed: %s %s", request.method, request.path)
        return problem(500, "Internal Server Error")


async def database(app):
    url = os.environ.get("DATABASE_URL", "postgresql://postgres@localhost/postgres")
    try:
        app[PG] = await asyncpg.create_pool(
            url, min_size=MIN_CONNECTIONS, max_size=MAX_CONNECTIONS, timeout=GIVE_UP_AFTER
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        logger.critical("no database at DATABASE_URL (%s); giving up", error)
        sys.exit(1)
    yield
    await app[PG].close()


async def hello(request):
    return web.json_response({"message": "Hello from aiohttp"})


async def alive(request):
    return web.json_response({"status": "ok"})


async def user_by_id(request):
    raw = request.match_info["user"]
    if not CANONICAL_ID.fullmatch(raw) or int(raw) >= 2**31:
        raise web.HTTPNotFound(reason="User Not Found")
    record = await request.app[PG].fetchrow(
        "SELECT id, public_id, name, email, balance, created_at FROM users WHERE id = $1", int(raw)
    )
    if record is None:
        raise web.HTTPNotFound(reason="User Not Found")
    return web.json_response(dict(record), dumps=lambda v: json.dumps(v, cls=RowEncoder))


def create_app():
    app = web.Application(middlewares=[errors_as_json])
    app.cleanup_ctx.append(database)
    app.router.add_get("/", hello)
    app.router.add_get("/health", alive)
    app.router.add_get("/users/{user}", user_by_id)
    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    web.run_app(create_app(), port=int(os.environ.get("PORT", "8080")))

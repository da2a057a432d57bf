# The article's app as its Gunicorn section runs it: the same app.py as article-02.
import os

import asyncpg
from aiohttp import web


async def index(request):
    return web.json_response({"message": "Hello from aiohttp"})


async def health(request):
    return web.json_response({"status": "ok"})


async def pg_pool(app):
    # setup
    app["pool"] = await asyncpg.create_pool(
        dsn=os.environ["DATABASE_URL"],
        min_size=2,
        max_size=10,
    )
    yield
    # teardown
    await app["pool"].close()


async def get_user(request):
    user_id = int(request.match_info["id"])
    async with request.app["pool"].acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM users WHERE id=$1", user_id)
    if not row:
        raise web.HTTPNotFound()
    return web.json_response(dict(row))


def create_app():
    app = web.Application()
    app.cleanup_ctx.append(pg_pool)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/health", health),
            web.get("/users/{id}", get_user),
        ]
    )
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="0.0.0.0", port=8080)

"""The bare aiohttp yardstick: one route returning fixed bytes, no middleware, no JSON encoding.

Run under Gunicorn with the chapter's worker settings (servers.bare_argv), it is the framework's own
ceiling on this machine; the gap from it to the chapter is what the chapter's code costs.
"""

from aiohttp import web

BODY = b'{"message": "Hello from aiohttp"}'


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def create_app() -> web.Application:
    # async: aiohttp's Gunicorn worker awaits a factory, and a plain function would not do.
    app = web.Application()
    app.router.add_get("/", hello)
    return app

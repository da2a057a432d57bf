"""Gunicorn settings for chapter 05: gunicorn -c gunicorn.conf.py"""

import os

# --8<-- [start:app]
# The factory, called once per worker. A bare 'app:create_app' is rejected
# by aiohttp's worker unless it is async (erratum 1).
wsgi_app = "app:create_app()"
worker_class = "aiohttp.GunicornWebWorker"
# --8<-- [end:app]

# --8<-- [start:env]
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# --8<-- [end:env]

# --8<-- [start:container]
# Gunicorn 25+ opens a control socket under $HOME; a container user has no
# writable home, so it logs an ERROR at every boot (erratum 10).
control_socket_disable = True
# --8<-- [end:container]

# --8<-- [start:shutdown]
# On SIGTERM the workers drain; the master SIGKILLs what is left after
# graceful_timeout, which must end before the platform's kill: docker stop
# gives 10 s, so Gunicorn's default of 30 s does not fit (erratum 5).
graceful_timeout = 8


def post_worker_init(worker):
    """aiohttp's worker sees SIGTERM up to 1 s late and drains for 95% of
    graceful_timeout: wake it at once, end its drain 2 s before the kill."""
    import signal

    worker.loop.add_signal_handler(
        signal.SIGTERM, worker.handle_quit, signal.SIGTERM, None
    )
    worker.cfg.set("graceful_timeout", max(worker.cfg.graceful_timeout - 2, 0))


# --8<-- [end:shutdown]

# --8<-- [start:logging]
accesslog = "-"
# Gunicorn sets up only its own loggers; this sends the app's lines to stderr.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {
            "level": "INFO",
            "handlers": ["error_console"],
            "propagate": False,
        },
        "gunicorn.access": {
            "level": "INFO",
            "handlers": ["console"],
            "propagate": False,
        },
    },
}
# --8<-- [end:logging]


# --8<-- [start:budget]
def when_ready(server):
    """Say once, at boot, how many database connections this setup may hold."""
    from app import POOL_MAX_SIZE, POOL_MIN_SIZE

    n = server.cfg.workers
    server.log.info(
        "connection budget: %d workers x min_size %d = %d at boot, "
        "x max_size %d = up to %d",
        n,
        POOL_MIN_SIZE,
        n * POOL_MIN_SIZE,
        POOL_MAX_SIZE,
        n * POOL_MAX_SIZE,
    )


# --8<-- [end:budget]


# --8<-- [start:preflight]
def on_starting(server):
    """Try the database once in the master, before any worker forks.

    Otherwise each worker fails on its own, and a traceback for a second
    failure can bury our one clear line.
    """
    import asyncio

    import asyncpg
    from app import CONNECT_TIMEOUT, DEFAULT_DATABASE_URL, EXIT_NO_DATABASE

    async def probe():
        dsn = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # whatever the cause, the same line and exit
        server.log.critical(
            "cannot reach the database: %r; is DATABASE_URL "
            "right and the server up?",
            exc,
        )
        raise SystemExit(EXIT_NO_DATABASE) from None


# --8<-- [end:preflight]

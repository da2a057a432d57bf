"""Gunicorn settings for chapter 07. Run: gunicorn -c gunicorn.conf.py (the image's CMD runs the same)."""
import os

# --8<-- [start:app]
# 'app:create_app()' calls the factory once per worker. A bare 'app:create_app' would hand
# Gunicorn the function itself, which aiohttp's worker rejects unless it is async (erratum 1).
wsgi_app = "app:create_app()"
# aiohttp's worker on uvloop's event loop: 1.27x the requests per second on GET / and 1.13x on
# GET /users/{id} in bench/ (docs/performance.md). The app's code is the same on either loop.
worker_class = "aiohttp.GunicornUVLoopWebWorker"
# --8<-- [end:app]

# --8<-- [start:env]
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# A listening socket per worker, so the kernel spreads new connections evenly. With one shared socket,
# the worker that wakes first can take a whole burst while the other idles: in bench/, GET /users/{id}
# had its p99 cut from about 30 ms to 5 ms with this on. The master holds no socket then, so its
# "Listening at:" line is empty. The catch: a second server started on the same port by the same
# user binds without an error and shares the traffic.
reuse_port = True
# --8<-- [end:env]

# --8<-- [start:container]
# Gunicorn 25+ opens a control socket under $HOME (or $XDG_RUNTIME_DIR) for `gunicornc`. A container
# user has no writable home and may run on a read-only root, where that socket is an ERROR at every
# boot; nothing in a container talks to it, so it stays off (erratum 10).
control_socket_disable = True
# --8<-- [end:container]

# --8<-- [start:shutdown]
# On SIGTERM each worker stops accepting, lets in-flight requests finish, cancels what still runs
# when its drain ends and runs every cleanup context's teardown; the master SIGKILLs what is left at
# graceful_timeout. That must come before the platform's own kill (docker stop: 10 s, Kubernetes:
# 30 s), which is why Gunicorn's default of 30 s does not fit under `docker stop` (erratum 5).
graceful_timeout = 8


def post_worker_init(worker):
    """Let every worker finish its drain and its teardown before the master's kill.

    aiohttp's worker notices SIGTERM only at its next once-a-second check, and then drains for 95%
    of graceful_timeout: left alone, the master's SIGKILL at graceful_timeout can land mid-drain,
    and no cleanup context's teardown runs. So, in this worker only: SIGTERM wakes it at once, as
    SIGINT and SIGQUIT already do, and its drain ends 2 s before the master's kill (the master
    still waits the full graceful_timeout).
    """
    import signal

    worker.loop.add_signal_handler(signal.SIGTERM, worker.handle_quit, signal.SIGTERM, None)
    worker.cfg.set("graceful_timeout", max(worker.cfg.graceful_timeout - 2, 0))
# --8<-- [end:shutdown]

# --8<-- [start:logging]
# No access log from here on: the proxy or load balancer in front already logs every request, and
# writing a line per request cost this service 1.78x on GET / in bench/. For a debugging session:
#   GUNICORN_CMD_ARGS="--access-logfile -" gunicorn -c gunicorn.conf.py
accesslog = None
# Gunicorn configures only its own loggers; this sends the app's log lines (pool ready, pool
# closed) to stderr too, once each.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}
# --8<-- [end:logging]


# --8<-- [start:budget]
def when_ready(server):
    """Say once, at boot, how many database connections this setup may hold."""
    from app import POOL_MAX_SIZE, POOL_MIN_SIZE

    n = server.cfg.workers
    server.log.info(
        "connection budget: %d workers x min_size %d = %d at boot, x max_size %d = up to %d",
        n, POOL_MIN_SIZE, n * POOL_MIN_SIZE, POOL_MAX_SIZE, n * POOL_MAX_SIZE,
    )
# --8<-- [end:budget]

# No database preflight here any more: from this chapter on a missing database means "not ready"
# (see /ready in app.py), not a process that refuses to start.


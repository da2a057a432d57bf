"""Gunicorn settings for chapter 10: gunicorn -c gunicorn.conf.py"""

import os

import logs  # chapter 10; it imports no prometheus_client

# --8<-- [start:app]
# The factory, called once per worker. A bare 'app:create_app' is rejected
# by aiohttp's worker unless it is async (erratum 1).
wsgi_app = "app:create_app()"
# The same app on uvloop's faster event loop (measured in bench/).
worker_class = "aiohttp.GunicornUVLoopWebWorker"
# --8<-- [end:app]

# --8<-- [start:env]
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
# Chapter 10: a second listener, for /metrics only; clients never reach it.
bind = [bind, f"0.0.0.0:{os.environ.get('METRICS_PORT', '9464')}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# A listening socket per worker: the kernel spreads new connections evenly.
# The master then holds none, so post_fork says where each worker listens.
reuse_port = True


def post_fork(server, worker):
    """Give aiohttp the plain sockets, and log where this worker listens."""
    # uvloop closes the fd itself and detaches a plain socket, but calls
    # close() on Gunicorn's wrapper: "[Errno 9]" logged at every stop.
    worker.sockets = [listener.sock for listener in worker.sockets]
    for sock in worker.sockets:
        host, port = sock.getsockname()[:2]
        local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)
        worker.log.info(
            "worker %d listening on http://%s:%d (bound to %s)",
            worker.pid,
            local,
            port,
            host,
        )


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
# No access log: the proxy in front logs every request, and the app logs
# the failed and slow ones itself (REQUEST_LOG=all: every one).
accesslog = None
# Chapter 10: every process's lines as JSON, Gunicorn's own included;
# LOG_FORMAT=text for the lines a person reads (make run LOG_FORMAT=text).
try:
    logconfig_dict = logs.config()
except ValueError as exc:
    raise SystemExit(f"refusing to start: {exc}") from None
# --8<-- [end:logging]


# --8<-- [start:preflight]
def on_starting(server):
    """Judge the database settings once, before any worker: a URL that
    would connect without a checked certificate, a certificate that fails
    the check, or a secret file missing or empty stops the service with
    one line and exit code 3 (each worker would say it again otherwise)."""
    import asyncio

    import database

    try:
        database.check_settings()
        asyncio.run(database.check_tls())
    except (database.ConfigError, database.SecretUnreadable) as exc:
        server.log.critical("refusing to start: %s", exc)
        raise SystemExit(database.EXIT_NO_DATABASE) from None
    # Chapter 10: a metrics folder that is missing or read-only would lose
    # every count without a word.
    try:
        prepare_metrics_dir()
    except OSError as exc:
        server.log.critical("refusing to start: %s", exc)
        raise SystemExit(database.EXIT_NO_DATABASE) from None


# --8<-- [end:preflight]


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


# --8<-- [start:multiproc]
# Chapter 10: the metrics folder's life, in the master. on_starting runs
# before anything imports prometheus_client, which picks its multiprocess
# mode at that import; the workers, forked later, inherit the variable.
made_metrics_dir = []  # the folder this master made, if it made one


def prepare_metrics_dir() -> None:
    """Unset (or empty, which would mean this folder), a folder of this
    run's own. Named, it must exist and take files, and earlier runs'
    files go: an emptyDir outlives a container's restart, and a worker
    whose pid matches an old file would read that file's counts back."""
    import tempfile
    from pathlib import Path

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
            prefix="metrics-"
        )
        made_metrics_dir.append(path)
    folder = Path(path)
    probe = folder / f".probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except (FileNotFoundError, NotADirectoryError):
        raise OSError(
            f"PROMETHEUS_MULTIPROC_DIR={path}: no such directory; create "
            "it (an emptyDir in Kubernetes) or point the variable at one"
        ) from None
    except OSError as exc:
        raise OSError(
            f"PROMETHEUS_MULTIPROC_DIR={path}: cannot write there "
            f"({exc.strerror}); the workers' metrics would be lost"
        ) from None
    for stale in folder.glob("*.db"):
        stale.unlink()


def child_exit(server, worker):
    """A worker is gone: its live gauges go with it. Its counters and
    histograms stay in the folder and are still summed, as they must."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    import shutil

    for path in made_metrics_dir:  # ours alone; a named one is left as is
        shutil.rmtree(path, ignore_errors=True)


# --8<-- [end:multiproc]

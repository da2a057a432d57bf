"""Chapter 10: the metrics. RED per route template, the pool's gauges and
readiness failures, summed across Gunicorn's workers by prometheus_client's
multiprocess mode, served on a port the load balancer never sends to.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client: the mode is chosen once, at that first import."""

import asyncio
import contextlib
import functools
import logging
import os
import time

import logs
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.aiohttp import make_aiohttp_handler

log = logging.getLogger("app")

# --8<-- [start:settings]
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
# /metrics answers only here: the load balancer and the Service send
# clients to PORT, so they never see it.
METRICS_PORT = int(os.environ.get("METRICS_PORT", "9464"))
# REQUEST_LOG=all: a line for every request. The default logs what the
# metrics cannot say: which request failed (5xx) or was slow, and why.
REQUEST_LOG = os.environ.get("REQUEST_LOG", "errors")
SLOW = 1.0  # seconds; a healthy request here takes a few milliseconds
# --8<-- [end:settings]


# --8<-- [start:mode]
def check_mode() -> None:
    """In each worker: multiprocess mode is on, or nothing is counted.

    prometheus_client picks its value class at its first import; imported
    before the variable was set, it counts in memory, per process, and
    /metrics shows no app metrics at all, with no error."""
    if MULTIPROC_DIR and values.ValueClass.__name__ == "MutexValue":
        raise RuntimeError(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR"
            " was set: set it before anything imports prometheus_client"
        )


# --8<-- [end:mode]

# --8<-- [start:red]
# Buckets for this service: its requests take about a millisecond, /ready
# gives up at 2 s and an upstream call at 5 s, so nothing lasts longer.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# A label takes values from a list known in advance: the route's template
# (never the path, one series per user id), a method from this list.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
UNMATCHED = "unmatched"  # no route: a 404 or a 405

# A registry of this module's own: the tests import a chapter many times in
# one process, and prometheus_client's global one refuses a second metric
# of the same name. Under Gunicorn the folder's files are what counts.
OWN = CollectorRegistry()
REQUESTS = Counter(
    "http_requests_total",
    "Requests answered, by route template, method and status class.",
    ["route", "method", "status"],
    registry=OWN,
)
DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival at the app to its answer.",
    ["route"],
    buckets=BUCKETS,
    registry=OWN,
)
READINESS_FAILURES = Counter(
    "readiness_failures_total",
    "GET /ready answered 503: the database did not answer in time.",
    ["reason"],
    registry=OWN,
)
# --8<-- [end:red]

# --8<-- [start:pool]
# Per worker (each has its own pool): a pid label, live processes only.
# Both labelled: a gauge without labels would get a series for Gunicorn's
# master too, which imports app.py for its boot line and has no pool.
POOL_CONNECTIONS = Gauge(
    "db_pool_connections",
    "The worker's pool connections, by state (idle or in_use).",
    ["state"],
    multiprocess_mode="liveall",
    registry=OWN,
)
POOL_LIMIT = Gauge(
    "db_pool_connections_limit",
    "The fewest (min) and most (max) connections of the worker's pool.",
    ["bound"],
    multiprocess_mode="liveall",
    registry=OWN,
)
POOL_SAMPLE_EVERY = 1.0  # seconds; Prometheus scrapes every 15 s or so
# --8<-- [end:pool]


# --8<-- [start:middleware]
# Each label set's child, looked up once: labels() takes a lock and
# builds a key every time, a cost paid per request otherwise.
_counted: dict[tuple[str, str, str], Counter] = {}
_timed: dict[str, Histogram] = {}


def count(route: str, method: str, status: str, took: float) -> None:
    key = (route, method, status)
    counter = _counted.get(key) or _counted.setdefault(
        key, REQUESTS.labels(*key)
    )
    counter.inc()
    timer = _timed.get(route) or _timed.setdefault(
        route, DURATION.labels(route)
    )
    timer.observe(took)


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


@web.middleware
async def observe(request: web.Request, handler):
    """Each request's id, in its lines and its answer; its count and
    duration by route template. Outermost: json_errors has turned any
    error into the answer by the time it returns here."""
    rid = logs.id_for(request.headers.get("X-Request-ID"))
    token = logs.request_id.set(rid)
    start = time.perf_counter()
    status = 500  # if the handler is cancelled: the client left
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = rid
        return response
    except web.HTTPException as exc:  # a redirect: json_errors passes it
        status = exc.status
        exc.headers["X-Request-ID"] = rid
        raise
    finally:
        took = time.perf_counter() - start
        route = route_of(request)
        method = request.method if request.method in METHODS else "other"
        count(route, method, f"{status // 100}xx", took)
        if REQUEST_LOG == "all" or status >= 500 or took >= SLOW:
            log.info(
                "%s %s %d in %.1f ms",
                method,
                route,
                status,
                took * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_s": round(took, 6),
                },
            )
        logs.request_id.reset(token)


# --8<-- [end:middleware]


# --8<-- [start:readiness]
def readiness_failed(exc: Exception) -> None:
    reason = "timeout" if isinstance(exc, TimeoutError) else "unavailable"
    READINESS_FAILURES.labels(reason).inc()


# --8<-- [end:readiness]


# --8<-- [start:pool_gauges]
def sample_pool(pool) -> None:
    idle = pool.get_idle_size()
    POOL_CONNECTIONS.labels("idle").set(idle)
    POOL_CONNECTIONS.labels("in_use").set(pool.get_size() - idle)
    POOL_LIMIT.labels("min").set(pool.get_min_size())
    POOL_LIMIT.labels("max").set(pool.get_max_size())


def pool_gauges(key: web.AppKey):
    """A cleanup context sampling the pool under `key` every second:
    asyncpg has no hook on acquire and release, and a collector that reads
    the pool at scrape time cannot run in multiprocess mode."""

    async def sampling(app: web.Application):
        async def sample_forever():
            while True:
                sample_pool(app[key])
                await asyncio.sleep(POOL_SAMPLE_EVERY)

        task = asyncio.create_task(sample_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return sampling


# --8<-- [end:pool_gauges]


# --8<-- [start:exposition]
def registry() -> CollectorRegistry:
    """Under Gunicorn, every worker's files, the dead ones' counts too;
    under `python app.py`, the process's own metrics."""
    if not MULTIPROC_DIR:
        return OWN
    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed)
    return summed


@functools.cache
def exposition():
    # Made at the first scrape: the folder is checked by then (a collector
    # made on a missing folder raises, in whichever process imported it).
    return make_aiohttp_handler(registry())


async def metrics(request: web.Request) -> web.StreamResponse:
    """GET /metrics on METRICS_PORT only; elsewhere a 404 like any other."""
    sockname = request.transport.get_extra_info("sockname") or ()
    if len(sockname) < 2 or sockname[1] != METRICS_PORT:
        raise web.HTTPNotFound()
    return await exposition()(request)


# --8<-- [end:exposition]

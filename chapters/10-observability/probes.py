"""Chapter 10: the probes of chapter 08, their failures now counted.
/health says the process is alive, /ready that it can serve; only /ready
asks the database."""

import asyncio
import logging

import asyncpg
import metrics
from aiohttp import web
from database import db_pool

log = logging.getLogger("app")

# Seconds for /ready to answer, whatever the database does.
READY_TIMEOUT = 2.0


# --8<-- [start:probes]
async def health(request: web.Request) -> web.Response:
    """Liveness: never touches the database, so an outage of the database
    does not get every replica restarted; that is what /ready is for."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: a connection and a SELECT 1 within READY_TIMEOUT in all;
    a failure or a timeout is a JSON 503 from json_errors."""
    # shield: at the deadline /ready answers; the check ends in the
    # background (a silent connection can take another READY_TIMEOUT).
    check = asyncio.ensure_future(select_1(request.app[db_pool]))
    check.add_done_callback(check_ended)
    try:
        await asyncio.wait_for(asyncio.shield(check), READY_TIMEOUT)
    except Exception as exc:  # chapter 10: counted, then answered as before
        metrics.readiness_failed(exc)
        raise
    return web.json_response({"status": "ready"})


def check_ended(check: asyncio.Future) -> None:
    # Past the deadline nothing awaits the check: without this, asyncio
    # logs its error as an ERROR. json_errors already logged the outage.
    if not check.cancelled() and check.exception() is not None:
        log.debug("readiness check ended with %r", check.exception())


async def select_1(pool: asyncpg.Pool) -> None:
    # Each step has its own bound, so the check ends after /ready answered.
    async with pool.acquire(timeout=READY_TIMEOUT) as conn:
        await conn.fetchval("SELECT 1", timeout=READY_TIMEOUT)


# --8<-- [end:probes]

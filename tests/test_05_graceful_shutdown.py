"""Chapter 05: SIGTERM drains what is in flight and runs every teardown, within graceful_timeout; an
outbound aiohttp.ClientSession lives in its own cleanup context.

Each test runs against chapter 05 and every later chapter. Slow requests are slow for real: the test
holds a lock on the users table, so GET /users/1 waits inside PostgreSQL; or /upstream calls a slow
upstream server the test runs.
"""

import asyncio
import json
import os
import re
import signal
import time

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    UsersLock,
    as_text,
    read_until_closed,
    sample_user,
    send_request,
    wait_for_lines,
)

from tutorial.parts import waiting
from tutorial.parts.process import free_port, get, start

TEARDOWN = ("shutdown started", "http session closed", "pool closed")


# -- helpers ---------------------------------------------------------------------------------------
async def settled_connections(lock: UsersLock, timeout: float = 10.0) -> int:
    """The app's connections once backends have had a moment to exit; 0 as soon as it is 0."""
    try:
        return await waiting.until_async(
            lock.other_connections,
            timeout=timeout,
            every=0.1,
            done=lambda count: count == 0,
            waiting_for="the app's connections to close",
        )
    except TimeoutError:
        return await lock.other_connections()  # the test's assertion shows what is left


def log_lines(output: str, needle: str) -> dict[int, int]:
    """{worker pid: index of its first log line containing needle}."""
    found: dict[int, int] = {}
    for index, line in enumerate(as_text(output).splitlines()):
        match = re.search(r"\] \[(\d+)\] \[", line)
        if match and needle in line:
            found.setdefault(int(match.group(1)), index)
    return found


def assert_every_teardown_ran(output: str, workers: int) -> None:
    """Each worker logged shutdown started, http session closed, pool closed, in that order."""
    started, http, pool = (log_lines(output, needle) for needle in TEARDOWN)
    assert len(started) == len(http) == len(pool) == workers, output
    for pid in started:
        assert started[pid] < http[pid] < pool[pid], (
            output
        )  # cleanup contexts close in reverse order
    assert "Unclosed" not in output and "Traceback" not in output, output


# -- SIGTERM with a request in flight --------------------------------------------------------------
async def test_sigterm_lets_a_request_in_flight_finish(chapter, pg, db_name):
    """A lookup blocked in the database when SIGTERM arrives still answers 200 once it can; then
    every worker runs every teardown, the master exits 0 and no connection is left in
    pg_stat_activity."""
    async with UsersLock(pg.dsn(db_name)) as lock:
        # the access log (off by default from chapter 06) shows when the request was answered
        with start(
            chapter,
            database_url=pg.dsn(db_name),
            WEB_CONCURRENCY="2",
            GUNICORN_CMD_ARGS="--access-logfile -",
        ) as running:
            await asyncio.to_thread(running.wait_until, "/health")
            request = asyncio.create_task(asyncio.to_thread(get, running.url + "/users/1", 30))
            await lock.wait_for_waiters(1)

            os.kill(running.pid, signal.SIGTERM)
            await asyncio.to_thread(
                wait_for_lines, running, "shutdown started", 1
            )  # the drain has begun...
            assert not request.done()  # ...and the request is still waiting
            await lock.release()
            status, body = await request
            code = await asyncio.to_thread(running.proc.wait, 20)
            output = running.output()

        assert status == 200 and json.loads(body) == sample_user(chapter)
        assert code == 0, output
        [served_at] = [
            i
            for i, line in enumerate(as_text(output).splitlines())
            if '"GET /users/1 HTTP/1.1" 200' in line
        ]
        assert min(log_lines(output, "shutdown started").values()) < served_at
        assert_every_teardown_ran(output, workers=2)
        assert await settled_connections(lock) == 0


async def test_a_request_longer_than_graceful_timeout_is_cut(chapter, pg, db_name):
    """A request still blocked when the drain ends is cancelled: the client's connection is closed
    with not a single byte of response (no status line, no partial body). The teardown still runs,
    and the master exits 0 within graceful_timeout plus a margin."""
    graceful = 3
    async with UsersLock(pg.dsn(db_name)) as lock:
        with start(
            chapter,
            database_url=pg.dsn(db_name),
            WEB_CONCURRENCY="1",
            GUNICORN_CMD_ARGS=f"--graceful-timeout {graceful}",
        ) as running:
            await asyncio.to_thread(running.wait_until, "/health")
            sock = send_request(running.port, "/users/1")
            await lock.wait_for_waiters(1)

            began = time.monotonic()
            os.kill(running.pid, signal.SIGTERM)
            received = await asyncio.to_thread(read_until_closed, sock)
            cut_after = time.monotonic() - began
            code = await asyncio.to_thread(running.proc.wait, graceful + 15)
            exited_after = time.monotonic() - began
            output = running.output()

        assert received == b"", (
            received
        )  # a closed connection: the client's library reports a disconnect
        assert cut_after > 0.5 * graceful - 1, (
            f"cut after only {cut_after:.1f}s: it was never drained"
        )
        assert exited_after < graceful + 5, f"the master took {exited_after:.1f}s"
        assert code == 0, output
        assert '"GET /users/1' not in output  # no access-log line: no response was ever sent
        assert_every_teardown_ran(output, workers=1)
        assert await settled_connections(lock) == 0


# -- the outbound session --------------------------------------------------------------------------
class Upstream:
    """A local upstream service the chapter calls: JSON, slow JSON, HTML, or a 500, by path."""

    def __init__(self):
        self.calls = 0
        self.called = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.called.set()
        kind = request.match_info["kind"]
        if kind == "slow":
            await asyncio.sleep(float(request.query.get("seconds", "1")))
        if kind == "html":
            return web.Response(text="<html>upstream</html>", content_type="text/html")
        if kind == "error":
            return web.json_response({"oops": True}, status=500)
        return web.json_response({"hello": "from upstream", "n": self.calls})


@pytest.fixture
async def upstream(aiohttp_server):
    service = Upstream()
    app = web.Application()
    app.router.add_get("/{kind}", service.handle)
    server = await aiohttp_server(app)
    service.url = lambda path: str(server.make_url(path))
    return service


async def test_outbound_call_in_flight_finishes_and_the_session_closes_cleanly(
    chapter, pg, db_name, upstream
):
    """/upstream reaches the test's own upstream through the shared session; a call in flight at
    SIGTERM still answers 200, and each worker closes its session with no "Unclosed client session"
    warning."""
    with start(
        chapter,
        database_url=pg.dsn(db_name),
        WEB_CONCURRENCY="2",
        UPSTREAM_URL=upstream.url("/slow?seconds=1.5"),
    ) as running:
        await asyncio.to_thread(running.wait_until, "/health")
        request = asyncio.create_task(asyncio.to_thread(get, running.url + "/upstream", 30))
        await asyncio.wait_for(upstream.called.wait(), 20)
        os.kill(running.pid, signal.SIGTERM)
        status, body = await request
        code = await asyncio.to_thread(running.proc.wait, 20)
        output = running.output()
    assert (status, json.loads(body)) == (200, {"upstream": {"hello": "from upstream", "n": 1}})
    assert code == 0, output
    assert_every_teardown_ran(output, workers=2)


@pytest.fixture
async def app_with_upstream(aiohttp_client, app_module, db_url, monkeypatch):
    """The chapter in process, its upstream calls bounded by a short timeout; `point(url)` aims
    them."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setattr(app_module, "UPSTREAM_TIMEOUT", aiohttp.ClientTimeout(total=0.5))
    client = await aiohttp_client(app_module.create_app())
    client.point = lambda url: monkeypatch.setattr(app_module, "UPSTREAM_URL", url)
    return client


async def test_upstream_json_is_passed_on(app_with_upstream, upstream):
    """A JSON answer from the upstream comes back under "upstream"."""
    app_with_upstream.point(upstream.url("/json"))
    response = await app_with_upstream.get("/upstream")
    assert response.status == 200
    assert await response.json() == {"upstream": {"hello": "from upstream", "n": 1}}


@pytest.mark.parametrize(
    "case, status, reason",
    [
        ("refused", 502, "Upstream Unavailable"),
        ("html", 502, "Upstream Unavailable"),
        ("error", 502, "Upstream Unavailable"),
        ("slow", 504, "Upstream Timeout"),
    ],
)
async def test_upstream_failures_are_json_gateway_errors(
    app_with_upstream, upstream, case, status, reason
):
    """Nothing listening, a body that is not JSON, or an upstream 500: a JSON 502; no answer within
    the client timeout: a JSON 504. Never a 500, never a traceback."""
    url = (
        f"http://127.0.0.1:{free_port()}/"
        if case == "refused"
        else upstream.url(f"/{case}?seconds=5")
    )
    app_with_upstream.point(url)
    response = await app_with_upstream.get("/upstream")
    assert response.status == status
    assert await response.json() == {"error": reason, "status": status}


@pytest.mark.chapters(until="05")  # chapter 06 boots without its database: nothing fails at startup
async def test_the_session_has_its_own_cleanup_context_after_the_pool(app_module, monkeypatch):
    """The pool's context comes first: when the database is away at startup, no session is ever
    opened (erratum 9)."""
    # That the session closes before the pool shows in every shutdown's log:
    # assert_every_teardown_ran.
    import gc

    def sessions() -> set[int]:
        return {
            id(o) for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed
        }

    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    before = sessions()
    runner = web.AppRunner(app_module.create_app())
    try:
        await runner.setup()
    except (SystemExit, Exception):  # noqa: BLE001 - the startup must fail; how is test_02's concern
        opened = sessions() - before
    else:
        opened = None
    finally:
        await runner.cleanup()  # closes what a wrong order opened: left, it would leak
    assert opened is not None, "expected the startup to fail with the database away, it succeeded"
    assert not opened, (
        "expected no HTTP session opened when the database is away at startup (the pool's "
        f"cleanup context first), {len(opened)} was left open"
    )

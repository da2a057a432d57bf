"""Chapter 05: SIGTERM drains what is in flight and runs every teardown, within graceful_timeout; an
outbound aiohttp.ClientSession lives in its own cleanup context.

Each test runs against chapter 05 and every later chapter. Slow requests are slow for real: the test holds
a lock on the users table, so GET /users/1 waits inside PostgreSQL; or /upstream calls a slow upstream
server the test runs.
"""
import asyncio
import json
import os
import re
import signal
import socket
import time

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tutorial.process import free_port, get, start

from test_03_gunicorn import wait_for_lines

SAMPLE_USER = {"id": 1, "public_id": "a8098c1a-f86e-11da-bd1a-00112444be1e", "name": "Ada Lovelace",
               "email": "ada@example.com", "balance": "1815.12", "created_at": "2026-06-26T09:30:00+00:00"}
TEARDOWN = ("shutdown started", "http session closed", "pool closed")


# -- helpers ----------------------------------------------------------------------------------------------
class UsersLock:
    """A transaction of the test's own that holds an exclusive lock on users: every lookup waits for it.

    A second connection watches pg_stat_activity: inside a transaction PostgreSQL would show the same
    snapshot of it every time.
    """

    def __init__(self, dsn: str):
        self.dsn = dsn

    async def __aenter__(self) -> "UsersLock":
        self.conn = await asyncpg.connect(self.dsn)
        self.watch = await asyncpg.connect(self.dsn)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        self.ours = [self.conn.get_server_pid(), self.watch.get_server_pid()]
        return self

    async def wait_for_waiters(self, count: int = 1, timeout: float = 20.0) -> None:
        """Until `count` queries from other sessions are blocked on a lock in this database."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = await self.watch.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> ALL($1) AND wait_event_type = 'Lock'", self.ours)
            if waiting >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no query ever waited on the lock in {timeout}s")

    async def release(self) -> None:
        if self.conn.is_in_transaction():  # a second rollback would be an error
            await self.tx.rollback()

    async def other_connections(self) -> int:
        """Sessions in this database other than the test's own: the app's pool connections."""
        return await self.watch.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                         " AND pid <> ALL($1)", self.ours)

    async def __aexit__(self, *exc) -> None:
        await self.release()
        await self.conn.close()
        await self.watch.close()


async def settled_connections(lock: UsersLock, timeout: float = 10.0) -> int:
    """The app's connections once backends have had a moment to exit; 0 as soon as it is 0."""
    deadline = time.monotonic() + timeout
    while (count := await lock.other_connections()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return count


def log_lines(output: str, needle: str) -> dict[int, int]:
    """{worker pid: index of its first log line containing needle}."""
    found: dict[int, int] = {}
    for index, line in enumerate(output.splitlines()):
        match = re.search(r"\] \[(\d+)\] \[", line)
        if match and needle in line:
            found.setdefault(int(match.group(1)), index)
    return found


def assert_every_teardown_ran(output: str, workers: int) -> None:
    """Each worker logged shutdown started, http session closed, pool closed, in that order."""
    started, http, pool = (log_lines(output, needle) for needle in TEARDOWN)
    assert len(started) == len(http) == len(pool) == workers, output
    for pid in started:
        assert started[pid] < http[pid] < pool[pid], output  # cleanup contexts close in reverse order
    assert "Unclosed" not in output and "Traceback" not in output, output


def send_request(port: int, path: str) -> socket.socket:
    """A raw HTTP/1.1 request, so the test sees exactly what comes back, down to the last byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with sock:
        while chunk := sock.recv(65536):
            received += chunk
    return received


# -- SIGTERM with a request in flight ---------------------------------------------------------------------
async def test_sigterm_lets_a_request_in_flight_finish(chapter, pg, db_name):
    """A lookup blocked in the database when SIGTERM arrives still answers 200 once it can; then every
    worker runs every teardown, the master exits 0 and no connection is left in pg_stat_activity."""
    async with UsersLock(pg.dsn(db_name)) as lock:
        # the access log (off by default from chapter 06) shows when the request was answered
        with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="2",
                   GUNICORN_CMD_ARGS="--access-logfile -") as running:
            await asyncio.to_thread(running.wait_until, "/health")
            request = asyncio.create_task(asyncio.to_thread(get, running.url + "/users/1", 30))
            await lock.wait_for_waiters(1)

            os.kill(running.pid, signal.SIGTERM)
            await asyncio.to_thread(wait_for_lines, running, "shutdown started", 1)  # the drain has begun...
            assert not request.done()                          # ...and the request is still waiting
            await lock.release()
            status, body = await request
            code = await asyncio.to_thread(running.proc.wait, 20)
            output = running.output()

        assert status == 200 and json.loads(body) == SAMPLE_USER
        assert code == 0, output
        [served_at] = [i for i, line in enumerate(output.splitlines()) if '"GET /users/1 HTTP/1.1" 200' in line]
        assert min(log_lines(output, "shutdown started").values()) < served_at
        assert_every_teardown_ran(output, workers=2)
        assert await settled_connections(lock) == 0


async def test_a_request_longer_than_graceful_timeout_is_cut(chapter, pg, db_name):
    """A request still blocked when the drain ends is cancelled: the client's connection is closed with
    not a single byte of response (no status line, no partial body). The teardown still runs, and the
    master exits 0 within graceful_timeout plus a margin."""
    graceful = 3
    async with UsersLock(pg.dsn(db_name)) as lock:
        with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="1",
                   GUNICORN_CMD_ARGS=f"--graceful-timeout {graceful}") as running:
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

        assert received == b"", received  # a closed connection: the client's library reports a disconnect
        assert cut_after > 0.5 * graceful - 1, f"cut after only {cut_after:.1f}s: it was never drained"
        assert exited_after < graceful + 5, f"the master took {exited_after:.1f}s"
        assert code == 0, output
        assert '"GET /users/1' not in output  # no access-log line: no response was ever sent
        assert_every_teardown_ran(output, workers=1)
        assert await settled_connections(lock) == 0


# -- the outbound session ------------------------------------------------------------------------------------
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


async def test_outbound_call_in_flight_finishes_and_the_session_closes_cleanly(chapter, pg, db_name, upstream):
    """/upstream reaches the test's own upstream through the shared session; a call in flight at SIGTERM
    still answers 200, and each worker closes its session with no "Unclosed client session" warning."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="2",
               UPSTREAM_URL=upstream.url("/slow?seconds=1.5")) as running:
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
    """The chapter in process, its upstream calls bounded by a short timeout; `point(url)` aims them."""
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


@pytest.mark.parametrize("case, status, reason", [
    ("refused", 502, "Upstream Unavailable"),
    ("html", 502, "Upstream Unavailable"),
    ("error", 502, "Upstream Unavailable"),
    ("slow", 504, "Upstream Timeout"),
])
async def test_upstream_failures_are_json_gateway_errors(app_with_upstream, upstream, case, status, reason):
    """Nothing listening, a body that is not JSON, or an upstream 500: a JSON 502; no answer within the
    client timeout: a JSON 504. Never a 500, never a traceback."""
    url = f"http://127.0.0.1:{free_port()}/" if case == "refused" else upstream.url(f"/{case}?seconds=5")
    app_with_upstream.point(url)
    response = await app_with_upstream.get("/upstream")
    assert response.status == status
    assert await response.json() == {"error": reason, "status": status}


@pytest.mark.chapters(until="05")  # chapter 06 boots without its database: nothing fails at startup
async def test_the_session_has_its_own_cleanup_context_after_the_pool(app_module, monkeypatch):
    """The pool's context comes first: when the database is away at startup, no session is ever opened
    (erratum 9)."""
    # That the session closes before the pool shows in every shutdown's log: assert_every_teardown_ran.
    import gc

    def sessions() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed}

    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    before = sessions()
    runner = web.AppRunner(app_module.create_app())
    try:
        await runner.setup()
    except (SystemExit, Exception):  # noqa: BLE001 - the startup must fail; how is test_02's concern
        opened = sessions() - before
    else:
        await runner.cleanup()
        raise AssertionError("expected the startup to fail with the database away, it succeeded")
    assert not opened, ("expected no HTTP session opened when the database is away at startup (the pool's "
                        f"cleanup context first), {len(opened)} was left open")

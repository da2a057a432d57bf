"""Chapter 06: /health (liveness) never touches the database; /ready (readiness) says whether it answers.

Each test runs against chapter 06 and every later chapter. Taking the database away is done for real: a
PostgreSQL server of the test's own (the session's server is shared by every test) that the test stops
and starts again, a listener that accepts connections and never answers, and a TCP forwarder to the
database that the test can make go silent mid-connection.
"""
import asyncio
import itertools
import json
import select
import socket
import threading
import time

import psutil
import pytest

from tutorial.database import LocalPostgres, execute
from tutorial.expect import json_answer
from tutorial.process import get, start

from test_02_database_pool import silent_server
from test_03_gunicorn import wait_for_lines

UNAVAILABLE = {"error": "Database Unavailable", "status": 503}
MARGIN = 3.0  # seconds on top of a timeout the chapter promises; generous, the machine may be busy
READY_MARGIN = 1.5  # tighter for /ready: a check bounded step by step would take 2 x READY_TIMEOUT


def timed_get(url: str, timeout: float = 30.0) -> tuple[int, dict, float]:
    began = time.monotonic()
    status, body = get(url, timeout)
    return status, json.loads(body), time.monotonic() - began


def worker_pids(running) -> set[int]:
    return {child.pid for child in psutil.Process(running.pid).children()}


# -- in process ---------------------------------------------------------------------------------------------
async def test_ready_answers_200_when_the_database_answers(client):
    """With the database up, GET /ready answers 200 {"status": "ready"}."""
    response = await client.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


async def test_health_never_touches_the_database(client, reference, db_url):
    """With every pool connection taken, /health still answers 200 at once, while /ready waits at most
    READY_TIMEOUT for a connection and answers a JSON 503."""
    from test_05_graceful_shutdown import UsersLock

    size, limit = reference.POOL_MAX_SIZE, reference.READY_TIMEOUT
    # Taken from outside: max_size lookups, each holding its connection, wait on a lock the test holds.
    async with UsersLock(db_url) as lock:
        lookups = [asyncio.ensure_future(client.get("/users/1")) for _ in range(size)]
        await lock.wait_for_waiters(size)
        began = time.monotonic()
        await json_answer(await client.get("/health"), 200, {"status": "ok"})
        took = time.monotonic() - began
        assert took < limit, f"expected /health at once with every connection taken, it took {took:.1f} s"

        began = time.monotonic()
        await json_answer(await client.get("/ready"), 503, UNAVAILABLE)
        took = time.monotonic() - began
        assert limit * 0.9 < took < limit + READY_MARGIN, (
            f"expected /ready to wait READY_TIMEOUT={limit:g} s for a connection, it took {took:.1f} s")
    for response in await asyncio.gather(*lookups):
        response.release()
    await json_answer(await client.get("/ready"), 200, {"status": "ready"})


class SilencingProxy:
    """A real TCP forwarder to the database. silence(): connections stay open but nothing passes
    either way, and new ones are accepted and never answered. restore(): the open connections are
    dropped (as after a network failure) and new ones are forwarded again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        self.closing = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                self.sockets.append(client)
            if self.silent.is_set():
                continue  # held open, never answered
            server = socket.create_connection(self.target)
            with self.lock:
                self.sockets.append(server)
            thread = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self.closing.is_set():
                if self.silent.is_set():
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except (OSError, ValueError):  # restore() closed the sockets under us
            return
        finally:
            a.close()
            b.close()

    def silence(self) -> None:
        self.silent.set()

    def restore(self) -> None:
        with self.lock:
            for sock in self.sockets:
                sock.close()
            self.sockets.clear()
        self.silent.clear()

    def close(self) -> None:
        self.closing.set()
        self.restore()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def proxy(pg):
    if not hasattr(pg, "port"):
        pytest.skip("needs the embedded server's port (TEST_DATABASE_URL is set)")
    forwarder = SilencingProxy(pg.port)
    yield forwarder
    forwarder.close()


async def test_database_gone_silent_does_not_stall_ready(aiohttp_client, app_module, reference, proxy, db_name,
                                                         monkeypatch):
    """The database's connections go silent mid-use (no error, no answer): /ready still answers a JSON
    503 within READY_TIMEOUT and /health 200; once the network is back, /ready is 200 by itself."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{proxy.port}/{db_name}")
    client = await aiohttp_client(app_module.create_app())
    assert (await client.get("/ready")).status == 200

    proxy.silence()
    for _ in range(2):  # a pooled connection that went silent, then a new one that never opens
        began = time.monotonic()
        response = await client.get("/ready")
        took = time.monotonic() - began
        assert response.status == 503 and await response.json() == UNAVAILABLE
        assert took < reference.READY_TIMEOUT + READY_MARGIN, f"/ready took {took:.1f}s"
    assert (await client.get("/health")).status == 200

    proxy.restore()
    deadline = time.monotonic() + 20
    while (await client.get("/ready")).status != 200:
        assert time.monotonic() < deadline, "/ready never recovered"
    assert (await client.get("/users/1")).status == 200


# -- as a learner runs it, with a database of the test's own --------------------------------------------
@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A second PostgreSQL the tests may stop: the session's server is shared by every test."""
    server = LocalPostgres(tmp_path_factory.mktemp("own-pg") / "data", durable=False)
    server.start()
    yield server
    server.stop()


_numbers = itertools.count(1)


@pytest.fixture
def own_db(own_server, chapter):
    """A fresh database with the chapter's schema on the test's own server, which is running again
    when the test ends whatever the test did to it."""
    own_server.start()
    name = f"own_{next(_numbers)}"
    execute(own_server.dsn(), f"CREATE DATABASE {name}")
    execute(own_server.dsn(name), chapter.schema.read_text())
    yield own_server.dsn(name)
    own_server.start()


def test_database_stopped_while_running(chapter, reference, own_server, own_db):
    """The database stops under a running service: /health stays 200, /ready turns a JSON 503 within
    READY_TIMEOUT, /users/1 answers a JSON 503, nothing hangs; the database comes back: /ready and
    /users/1 answer 200 again, from the same worker processes."""
    with start(chapter, database_url=own_db, WEB_CONCURRENCY="2") as running:
        running.wait_until("/ready")
        wait_for_lines(running, "pool ready", 2)
        workers = worker_pids(running)

        own_server.stop()
        for _ in range(4):  # enough to reach both workers
            assert get(running.url + "/health")[0] == 200
            status, body, took = timed_get(running.url + "/ready")
            assert (status, body) == (503, UNAVAILABLE) and took < reference.READY_TIMEOUT + READY_MARGIN
            status, body, took = timed_get(running.url + "/users/1")
            assert (status, body) == (503, UNAVAILABLE) and took < reference.CONNECT_TIMEOUT + MARGIN

        own_server.start()
        running.wait_until("/ready", 200)
        for _ in range(4):
            assert get(running.url + "/ready")[0] == 200
            assert get(running.url + "/users/1")[0] == 200
        assert worker_pids(running) == workers  # nothing was restarted
        assert running.terminate() == 0


def test_no_database_at_boot_stays_live_and_turns_ready_by_itself(chapter, own_server, own_db):
    """Started with its database down, the service stays up: /health 200, /ready a JSON 503. Once the
    database starts, /ready turns 200 with no restart."""
    own_server.stop()
    with start(chapter, database_url=own_db, WEB_CONCURRENCY="2") as running:
        running.wait_until("/health")
        assert len(wait_for_lines(running, "database unavailable at boot", 2)) == 2
        workers = worker_pids(running)
        assert len(workers) == 2
        for _ in range(4):
            status, body, _ = timed_get(running.url + "/ready")
            assert (status, body) == (503, UNAVAILABLE)
        assert running.proc.poll() is None
        assert "Traceback" not in running.output()

        own_server.start()
        running.wait_until("/ready", 200)
        assert get(running.url + "/users/1")[0] == 200
        assert worker_pids(running) == workers
        assert running.terminate() == 0


def test_database_that_never_answers_at_boot_does_not_stall_ready(chapter, reference):
    """A database that accepts connections and never answers: boot waits CONNECT_TIMEOUT at most, the
    service stays live, and /ready answers a JSON 503 within READY_TIMEOUT every time."""
    with silent_server() as port, start(chapter, database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
                                        WEB_CONCURRENCY="1") as running:
        running.wait_until("/health", timeout=reference.CONNECT_TIMEOUT + 30)
        for _ in range(2):
            status, body, took = timed_get(running.url + "/ready")
            assert (status, body) == (503, UNAVAILABLE)
            assert took < reference.READY_TIMEOUT + READY_MARGIN, f"/ready took {took:.1f}s"
        assert running.terminate() == 0


# -- what the benchmark changed (docs/performance.md) ---------------------------------------------------------
def test_workers_run_on_uvloop(chapter, pg, db_name):
    """The workers are aiohttp's uvloop worker, and the app answers on uvloop's event loop as before."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="1") as running:
        running.wait_until("/ready")
        assert get(running.url + "/users/1")[0] == 200
        assert running.terminate() == 0
        assert "Using worker: aiohttp.GunicornUVLoopWebWorker" in running.output()


@pytest.mark.parametrize("cmd_args, lines", [("", 0), ("--access-logfile -", 1)])
def test_access_log_is_off_unless_asked_for(chapter, pg, db_name, cmd_args, lines):
    """No access-log line per request by default (the proxy in front logs them); GUNICORN_CMD_ARGS
    with --access-logfile - turns it back on for a debugging session."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="1", GUNICORN_CMD_ARGS=cmd_args) as running:
        running.wait_until("/health")
        assert get(running.url + "/users/1")[0] == 200
        assert running.terminate() == 0
        assert running.output().count('"GET /users/1 HTTP/1.1" 200') == lines, running.output()


def test_each_worker_listens_on_a_socket_of_its_own(chapter, pg, db_name):
    """With reuse_port every worker binds its own listening socket on PORT (the master holds none), so
    the kernel spreads new connections over the workers; both answer."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="2") as running:
        running.wait_until("/ready")
        wait_for_lines(running, "pool ready", 2)  # each worker binds its socket before its pool opens
        master = psutil.Process(running.pid)
        listening = {proc.pid: [c for c in proc.net_connections("tcp")
                                if c.status == psutil.CONN_LISTEN and c.laddr.port == running.port]
                     for proc in [master, *master.children()]}
        assert listening.pop(master.pid) == []
        assert sorted(len(socks) for socks in listening.values()) == [1, 1]
        answered = {json.loads(get(running.url + "/health")[1])["status"] for _ in range(20)}
        assert answered == {"ok"}
        assert running.terminate() == 0

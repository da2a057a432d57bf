"""PgBouncer between the replicas and PostgreSQL, in transaction mode, with the pool settings of
chapter 07's ConfigMap and our own port, runtime folder and (local) trust auth."""

from __future__ import annotations

import signal
from pathlib import Path

from tutorial.parts import process
from tutorial.parts.database import SERVICE_USER, as_root

from . import budget
from .processes import Part, tool, wait_port

# The ConfigMap's settings the rehearsal takes as they are; the rest are this machine's.
FROM_CONFIGMAP = (
    "pool_mode",
    "max_client_conn",
    "default_pool_size",
    "reserve_pool_size",
    "max_db_connections",
    "server_reset_query",
    "ignore_startup_parameters",
)


class PgBouncer:
    def __init__(self, runtime: Path, numbers: budget.Fleet, database: str, postgres_port: int):
        self.runtime, self.numbers, self.database = runtime, numbers, database
        self.postgres_port = postgres_port
        self.port = process.free_port()
        self.part: Part | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def alive(self) -> bool:
        return self.part is not None and self.part.alive

    def config(self) -> str:
        ours = {k: v for k, v in self.numbers.pgbouncer.items() if k in FROM_CONFIGMAP}
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
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
                f"{self.database} = host=127.0.0.1 port={self.postgres_port} "
                f"dbname={self.database} user=postgres"
            ),
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start it, or start it again after stop() on the same port: the replicas' DATABASE_URL
        holds."""
        users, ini = self.runtime / "pgbouncer-users.txt", self.runtime / "pgbouncer.ini"
        users.write_text('"postgres" ""\n')
        ini.write_text(self.config())
        for path in (ini, users):
            path.chmod(0o644)
        # PgBouncer refuses to run as root; the database's service user will do.
        self.part = Part(
            "pgbouncer",
            [tool("pgbouncer"), str(ini)],
            self.runtime / "pgbouncer.log",
            user=SERVICE_USER if as_root() else None,
        )
        wait_port(self.part, self.port)

    def stop(self) -> None:
        if self.part:
            self.part.stop(signal.SIGTERM, timeout=5)  # SIGTERM: PgBouncer's immediate shutdown

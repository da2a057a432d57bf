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
    def __init__(
        self,
        runtime: Path,
        numbers: budget.Fleet,
        database: str,
        postgres_port: int,
        tls: dict[str, str] | None = None,
    ):
        """`tls`: for chapter 08 on, the certificate, key and CA files and the user and password
        (keys cert, key, ca, user, password): TLS on both sides, with the ConfigMap's modes."""
        self.runtime, self.numbers, self.database = runtime, numbers, database
        self.postgres_port = postgres_port
        self.tls = tls
        self.port = process.free_port()
        self.part: Part | None = None

    @property
    def url(self) -> str:
        if self.tls:  # the password comes from its file (DATABASE_PASSWORD_FILE)
            return (
                f"postgresql://{self.tls['user']}@127.0.0.1:{self.port}/{self.database}"
                f"?sslmode=verify-full&sslrootcert={self.tls['ca']}"
            )
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def tls_settings(self) -> dict[str, str]:
        """The ConfigMap's client_tls_* and server_tls_* settings, its file paths made ours."""
        ours = {
            k: v
            for k, v in self.numbers.pgbouncer.items()
            if k.startswith(("client_tls", "server_tls"))
        }
        ours.update(
            client_tls_cert_file=self.tls["cert"],
            client_tls_key_file=self.tls["key"],
            server_tls_ca_file=self.tls["ca"],
        )
        return ours

    @property
    def alive(self) -> bool:
        return self.part is not None and self.part.alive

    def config(self) -> str:
        ours = {k: v for k, v in self.numbers.pgbouncer.items() if k in FROM_CONFIGMAP}
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256" if self.tls else "trust",
            "auth_file": str(self.runtime / "pgbouncer-users.txt"),
            "admin_users": "postgres",
            "pidfile": "",
            "logfile": "",
            **ours,
            **(self.tls_settings() if self.tls else {}),
        }
        # With TLS, each client's own user and password log in to PostgreSQL too.
        login = "" if self.tls else " user=postgres"
        lines = [
            "[databases]",
            (
                f"{self.database} = host=127.0.0.1 port={self.postgres_port} "
                f"dbname={self.database}{login}"
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
        if self.tls:
            users.write_text(f'"{self.tls["user"]}" "{self.tls["password"]}"\n')
        else:
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

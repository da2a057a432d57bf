"""The fleet's PostgreSQL and the service's database in it.

Chapter 07's is the embedded one (the wheel's PostgreSQL 18, trust, the superuser). From chapter
08 on it is Debian's PostgreSQL 15 with TLS (the wheel has no OpenSSL, tutorial/parts/
tls_postgres.py), serving a certificate from a CA made for the run, and the service logs in as a
role of its own with a password read from a file (Secrets). The two cannot read each other's data,
so each keeps its own folder.
"""

from __future__ import annotations

from pathlib import Path

from tutorial.parts import tls_postgres
from tutorial.parts.database import LocalPostgres, Server, execute, load_schema

DATABASE = "users"
SERVICE_ROLE = "users"  # the replicas' role once there is TLS (chapter 07: the superuser, trust)


class Secrets:
    """Chapter 08 on: the run's CA, a certificate for 127.0.0.1 that PostgreSQL and PgBouncer both
    serve (PgBouncer and the replicas check it against the CA: verify-full), and the service
    role's password, in the files a cluster would mount."""

    def __init__(self, runtime: Path):
        self.folder = runtime / "secrets"
        self.password_file = self.folder / "password"
        self.paths = {
            "ca": self.folder / "ca.pem",
            "cert": self.folder / "server.crt",
            "key": self.folder / "server.key",
        }

    def make(self) -> dict[str, str]:
        """New certificates each start; the password survives, as the data folder does."""
        import secrets

        import trustme

        self.folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.paths["ca"]))
        issued.cert_chain_pems[0].write_to_path(str(self.paths["cert"]))
        issued.private_key_pem.write_to_path(str(self.paths["key"]))
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(18) + "\n")
        for path in self.folder.iterdir():
            path.chmod(0o644)  # PgBouncer runs as the service user and reads them
        return self.files()

    def files(self) -> dict[str, str]:
        """What PgBouncer is given: the three files, the role and its password."""
        found = {name: str(path) for name, path in self.paths.items()}
        password = self.password_file.read_text().strip()
        return {**found, "user": SERVICE_ROLE, "password": password}


def folder(runtime: Path, tls: bool) -> Path:
    return runtime / ("postgres-tls" if tls else "postgres")


def server(runtime: Path, tls: dict[str, str] | None, port: int | None = None) -> Server:
    """The server, not started: a new one when `port` is None, else the one running there."""
    where = folder(runtime, tls is not None)
    if tls is None:
        if port is None:
            return LocalPostgres(where / "data", durable=False)
        return LocalPostgres(where / "data", port=port)
    if port is None:
        return tls_postgres.TLSPostgres(where, cert=Path(tls["cert"]), key=Path(tls["key"]))
    return tls_postgres.TLSPostgres(where, port=port)


def prepare(pg: Server, schema: Path, tls: dict[str, str] | None) -> None:
    """The service's database with the schema of the code the replicas run, and from chapter 08
    on the role they log in as, with the password of this run's secrets."""
    exists = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
    if not execute(pg.dsn(), exists).strip():
        execute(pg.dsn(), f"CREATE DATABASE {DATABASE}")
    load_schema(pg.dsn(DATABASE), schema)
    if tls:
        execute(
            pg.dsn(DATABASE),
            f"DO $$ BEGIN CREATE ROLE {SERVICE_ROLE} LOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$; "
            f"ALTER ROLE {SERVICE_ROLE} PASSWORD '{tls['password']}'; "
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {SERVICE_ROLE}",
        )


def connections(pg: Server) -> int:
    """Client connections the server holds for the service's database, ours not counted."""
    return int(
        execute(
            pg.dsn(),
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}' "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        ).strip()
    )

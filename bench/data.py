"""The database every variant reads: the chapter's own schema plus a few thousand sample users."""

from __future__ import annotations

import re
from pathlib import Path

from tutorial.parts.database import LocalPostgres, execute, load_schema

SAMPLE_USERS = 5000
DATABASE = "bench"
# Chapter 02 on selects an explicit column list; pgbench runs the very same statement.
DEFAULT_COLUMNS = "id, public_id, name, email, balance, created_at"

# Rows of the same shape as the chapter's sample row (uuid, numeric, timestamptz), so the JSON
# encoder does the same work for every id. Id 1 is the chapter's own sample user.
USERS_SQL = """
INSERT INTO users (id, public_id, name, email, balance, created_at, password_hash)
SELECT i, gen_random_uuid(), 'User ' || i, 'user' || i || '@example.com',
       (i * 7919 % 1000000) / 100.0,
       timestamptz '2026-01-01 00:00:00+00' + i * interval '37 minutes',
       'not-a-real-hash'
FROM generate_series(2, {n}) AS i
ON CONFLICT (id) DO NOTHING;
SELECT setval(pg_get_serial_sequence('users', 'id'), {n});
ANALYZE users;
"""


class Database:
    """A throwaway PostgreSQL under `folder`, no fsync: the bench measures reads, not durability."""

    def __init__(self, folder: Path, schema: Path, users: int = SAMPLE_USERS):
        self.server = LocalPostgres(folder / "pg", durable=False)
        self.schema = schema
        self.users = users

    def __enter__(self) -> Database:
        self.server.start()
        try:
            execute(self.server.dsn(), f"CREATE DATABASE {DATABASE}")
            load_schema(self.dsn, self.schema)  # schema.sql, then any migrations
            execute(self.dsn, USERS_SQL.format(n=self.users))
            count = int(execute(self.dsn, "SELECT count(*) FROM users").strip())
            if count < self.users:
                raise RuntimeError(f"expected {self.users} sample users, found {count}")
        except BaseException:
            self.server.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    @property
    def dsn(self) -> str:
        return self.server.dsn(DATABASE)

    @property
    def pid(self) -> int:
        return self.server.process.pid


def select_statement(app_py: Path) -> str:
    """The chapter's own SELECT for GET /users/{id}, with pgbench's `:id` for the parameter."""
    found = (
        re.search(r'USER_COLUMNS\s*=\s*"([^"]+)"', app_py.read_text()) if app_py.exists() else None
    )
    columns = found.group(1) if found else DEFAULT_COLUMNS
    return f"SELECT {columns} FROM users WHERE id = :id;"

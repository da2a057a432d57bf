"""Chapter 02: an asyncpg pool in a cleanup context, and GET /users/{id} that no input can break.

Each test runs against chapter 02 and every later chapter.
"""

import asyncio
import linecache
import re
import subprocess
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp import web
from helpers import connections_to, sample_user, silent_server, wait_for_connections

from tutorial.learner.expect import allows_get, as_json, json_answer, last_lines, said, why
from tutorial.parts.database import execute
from tutorial.parts.process import free_port, get, start


async def test_sample_user_as_json(client, chapter):
    """GET /users/1 answers the sample user, its timestamp, numeric and uuid columns encoded."""
    await json_answer(
        await client.get("/users/1"), 200, sample_user(chapter), named="the sample user"
    )


async def test_only_listed_columns_leave_the_database(
    aiohttp_client, app_module, pg, db_name, monkeypatch, caplog
):
    """The query names its columns: a column the API does not list (password_hash) never leaks."""
    # As a role that may read every column but password_hash, SELECT * is refused: seen from
    # outside.
    monkeypatch.setenv("DATABASE_URL", column_reader_dsn(pg, db_name))
    client = await aiohttp_client(app_module.create_app())
    response = await client.get("/users/1")
    body = await response.text()
    refused = [
        r
        for r in caplog.records
        if "permission denied" in r.getMessage() + str(r.exc_info and r.exc_info[1])
    ]
    assert not refused, (
        "expected the query to name its columns, it asked for password_hash too "
        "(PostgreSQL refused it to a role that may not read that column)"
    )
    assert "password_hash" not in body and "not-a-real-hash" not in body, (
        f"expected no password_hash in the answer, got "
        f"{said(response.status, response.content_type, body)}"
    )


async def test_missing_user_is_a_json_404(client):
    """A well-formed id with no row answers a JSON 404."""
    await json_answer(await client.get("/users/2"), 404, {"error": "User Not Found", "status": 404})


BAD_IDS = [
    "abc",
    "0",
    "-1",
    "+1",
    "01",
    "001",
    "1.0",
    "1e3",
    "0x1",
    " 1",
    "1 ",
    "%201",
    "1%20",
    "1,",
    "1/",
    "١",
    "１",
    "²",
    "1١",
    "2147483648",
    "4294967297",
    "9999999999",
    "99999999999",
    "1" * 40,
    "9" * 5000,
    "%00",
    "null",
    "true",
    "[1]",
    "1;DROP TABLE users",
    "1'",
]


@pytest.mark.parametrize("user_id", BAD_IDS)
async def test_every_other_form_of_id_is_a_json_404(client, user_id):
    """Letters, signs, spaces, leading zeros, non-ASCII digits, out-of-range and absurdly long ids:
    a JSON 404."""
    body = await json_answer(await client.get(f"/users/{user_id}"), 404)
    assert body.get("status") == 404 and "id" not in body, (
        f'expected a JSON 404 with "status": 404 that does not echo the id, got {as_json(body)}'
    )


async def test_biggest_id_the_column_holds_is_looked_up(client):
    """2147483647 fits an integer column: it is a lookup (no such user), not a range error."""
    await json_answer(
        await client.get("/users/2147483647"), 404, {"error": "User Not Found", "status": 404}
    )


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_on_a_user_is_a_json_405(client, method):
    """Only GET is routed; other methods answer a JSON 405 with an Allow header."""
    response = await client.request(method, "/users/1")
    await json_answer(response, 405, {"error": "Method Not Allowed", "status": 405})
    allows_get(response)


async def test_the_pool_sits_behind_a_typed_app_key(
    aiohttp_client, app_module, db_url, monkeypatch
):
    """The pool is stored under a web.AppKey, not a string (erratum 8)."""
    # Seen from outside: aiohttp flags a string key with NotAppKeyWarning, whatever the key is
    # named.
    monkeypatch.setenv("DATABASE_URL", db_url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", web.NotAppKeyWarning)
        client = await aiohttp_client(app_module.create_app())
        await client.get("/users/1")
        await client.close()
    flagged = [w for w in caught if issubclass(w.category, web.NotAppKeyWarning)]
    if flagged:
        where = f"{Path(flagged[0].filename).name}:{flagged[0].lineno}"
        line = linecache.getline(flagged[0].filename, flagged[0].lineno).strip()
        raise AssertionError(
            f"expected every key under a typed web.AppKey, got a string key at {where} "
            f"`{line}` (aiohttp's NotAppKeyWarning)"
        )


async def test_cleanup_context_opens_min_size_and_closes_the_pool(
    aiohttp_client, app_module, reference, db_url, monkeypatch, pg, db_name
):
    """At startup the pool holds min_size connections; at cleanup it is closed and they are gone."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    client = await aiohttp_client(app_module.create_app())
    wanted = reference.POOL_MIN_SIZE
    opened = await asyncio.to_thread(wait_for_connections, pg, db_name, wanted)
    assert opened == wanted, (
        f"expected {wanted} connections once started (the chapter's min_size={wanted}), "
        f"pg_stat_activity shows {opened}"
    )
    await client.close()
    left = await asyncio.to_thread(wait_for_connections, pg, db_name, 0)
    assert left == 0, (
        f"expected the pool closed at cleanup, {left} of its connections were left open"
    )


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
async def test_both_dsn_schemes_work(
    aiohttp_client, app_module, db_url, monkeypatch, pg, db_name, scheme
):
    """postgres:// (what many platforms inject) and postgresql:// both connect."""
    monkeypatch.setenv("DATABASE_URL", scheme + "://" + db_url.split("://", 1)[1])
    try:
        await aiohttp_client(app_module.create_app())
    except Exception as exc:  # noqa: BLE001 - whatever it raised is the reason
        raise AssertionError(
            f"expected the app to start with a {scheme}:// DATABASE_URL, it raised "
            f"{type(exc).__name__}: {exc}"
        ) from None
    assert connections_to(pg, db_name) > 0, (
        f"expected the app to connect with a {scheme}:// DATABASE_URL, "
        "no connection reached the database"
    )


def test_runs_as_documented_and_serves_the_sample_user(served, chapter):
    """The documented command serves /users/1, and exits 0 on SIGTERM after closing its pool."""
    import json

    status, body = get(served.url + "/users/1")
    try:
        user = json.loads(body)
    except ValueError:
        user = None
    assert (status, user) == (200, sample_user(chapter)), (
        f"expected GET /users/1 to answer 200 with the sample user, got {said(status, None, body)}"
    )
    status, body = get(served.url + "/users/abc")
    assert status == 404, f"expected GET /users/abc to answer 404, got {said(status, None, body)}"


# -- a database that is not there at boot: fail fast, with one clear line --------------------------
@pytest.mark.chapters(until="05")
def test_unreachable_database_at_boot_exits_nonzero_with_one_clear_line(chapter):
    """Nothing listens at DATABASE_URL: the process exits non-zero in seconds, saying why in one
    line."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with start(chapter, database_url=dead, WEB_CONCURRENCY="2") as running:
        code = exit_code_within(running, 20)
        output = running.output()
    says_the_database_is_away(code, output)


@pytest.mark.chapters(until="05")
def test_database_that_never_answers_does_not_stall_boot(chapter, reference):
    """A server that accepts connections and says nothing: boot gives up after the connect
    timeout."""
    # Bounded by the chapter's connect timeout (plus boot), nowhere near asyncpg's default of 60 s.
    limit = reference.CONNECT_TIMEOUT * 3
    with (
        silent_server() as port,
        start(
            chapter,
            database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
            WEB_CONCURRENCY="2",
        ) as running,
    ):
        code = exit_code_within(
            running,
            limit,
            why=f" (the chapter's connect timeout is "
            f"{reference.CONNECT_TIMEOUT:g} s; asyncpg's own is 60 s)",
        )
        output = running.output()
    says_the_database_is_away(code, output)


# -- helpers ---------------------------------------------------------------------------------------
def exit_code_within(running, seconds: float, why: str = "") -> int:
    try:
        return running.proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"expected boot to give up within {seconds:g} s{why}, it was still waiting; "
            f"it last printed: {last_lines(running.output())}"
        ) from None


def says_the_database_is_away(code: int, output: str) -> None:
    """A non-zero exit and one line that names the database, with no traceback (erratum 11)."""
    assert code != 0, (
        f"expected a non-zero exit without its database, it exited 0: {last_lines(output)}"
    )
    assert "Traceback" not in output, (
        f"expected one clear line and no traceback, got a traceback for `{why(output)}`"
    )
    assert re.search(r"database", output, re.IGNORECASE), (
        f"expected a line saying the database cannot be reached, it said: {last_lines(output, 3)}"
    )


def column_reader_dsn(pg, database: str) -> str:
    """A DSN for a role that may read every column of users but password_hash (whichever the
    chapter's schema has: chapter 09's migrations add display_name)."""
    columns = execute(
        pg.dsn(database),
        "SELECT string_agg(column_name, ', ') FROM information_schema.columns "
        "WHERE table_name = 'users' AND column_name <> 'password_hash'",
    ).strip()
    execute(
        pg.admin_dsn,
        "DO $$ BEGIN CREATE ROLE column_reader LOGIN PASSWORD 'column_reader'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    execute(pg.dsn(database), f"GRANT SELECT ({columns}) ON users TO column_reader")
    parts = urlsplit(pg.dsn(database))
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"column_reader:column_reader@{host}"))

"""Where the article is wrong (design.md, "Errata"): each test runs the article's pattern, shows it
failing the way the erratum says, and shows our chapter's way working.

Errata 2, 5, 9, 10 and 11 (containers, shutdown, startup) are in test_errata_deploy.py.
"""
import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import asyncpg
import pytest
from aiohttp import web

from tutorial import chapters
from tutorial.database import execute
from tutorial.process import Running, chapter_env, free_port, get

CH01 = chapters.get("01")
CH02 = chapters.get("02")
CH03 = chapters.get("03")


# -- Erratum 1: `gunicorn app:create_app` with a plain def never serves ---------------------------------------
def gunicorn(target: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gunicorn", target, "--bind", f"127.0.0.1:{port}",
            "--worker-class", "aiohttp.GunicornWebWorker", "--workers", "2"]


def test_erratum_01_factory_without_call_never_serves():
    """The article's command hands Gunicorn the function itself: every worker refuses it and the master exits."""
    port = free_port()
    with Running(gunicorn("app:create_app", port), CH01.folder, chapter_env(port), port) as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    assert code != 0
    assert "wsgi app should be either Application or async function returning Application" in output


def test_erratum_01_calling_the_factory_serves():
    """'app:create_app()' makes Gunicorn call the factory in each worker: it serves."""
    port = free_port()
    with Running(gunicorn("app:create_app()", port), CH01.folder, chapter_env(port), port) as running:
        running.wait_until("/")
        assert running.terminate() == 0


def test_erratum_01_our_config_calls_the_factory():
    """Chapter 03 on names the call in gunicorn.conf.py, so the documented command cannot hit erratum 1."""
    for chapter in chapters.load():
        conf = chapter.folder / "gunicorn.conf.py"
        if chapter.index >= 3:
            assert 'wsgi_app = "app:create_app()"' in conf.read_text(), chapter.name


# -- Erratum 3: int(match_info["id"]) turns bad input into 500s ---------------------------------------------
pool_key = web.AppKey("pool", asyncpg.Pool)


def article_app(dsn: str, handler) -> web.Application:
    """The article's route and pool, with its handler under test (typed key: see erratum 8)."""
    async def pg_pool(app):
        app[pool_key] = await asyncpg.create_pool(dsn=dsn, min_size=1, max_size=2)
        yield
        await app[pool_key].close()

    app = web.Application()
    app.cleanup_ctx.append(pg_pool)
    app.add_routes([web.get("/users/{id}", handler)])
    return app


async def article_get_user(request):
    user_id = int(request.match_info["id"])
    async with request.app[pool_key].acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM users WHERE id=$1", user_id)
    if not row:
        raise web.HTTPNotFound()
    return web.json_response(dict(row))


@pytest.fixture
def users_db(pg):
    from conftest import fresh_database

    return pg.dsn(fresh_database(pg, CH02.schema))


@pytest.mark.parametrize("user_id", ["abc", "2147483648"])
async def test_erratum_03_article_handler_answers_500(aiohttp_client, users_db, user_id, caplog):
    """'abc' fails int(); 2147483648 passes int() but not the integer column: both are 500s."""
    client = await aiohttp_client(article_app(users_db, article_get_user))
    response = await client.get(f"/users/{user_id}")
    assert response.status == 500
    expected = ValueError if user_id == "abc" else asyncpg.DataError
    assert any(r.exc_info and isinstance(r.exc_info[1], expected) for r in caplog.records)


@pytest.mark.parametrize("user_id", ["abc", "2147483648"])
async def test_erratum_03_our_route_answers_404(aiohttp_client, users_db, user_id, monkeypatch):
    """The chapter's strict route and range check turn the same input into a JSON 404."""
    from conftest import load_module

    monkeypatch.setenv("DATABASE_URL", users_db)
    client = await aiohttp_client(load_module(CH02.folder / "app.py").create_app())
    response = await client.get(f"/users/{user_id}")
    assert response.status == 404
    assert (await response.json())["status"] == 404


# -- Erratum 4: dict(row) is not JSON, and SELECT * shows every column ---------------------------------------
async def test_erratum_04_json_response_of_a_row_fails(users_db):
    """timestamptz, numeric and uuid values make json.dumps (and so web.json_response) raise."""
    conn = await asyncpg.connect(users_db)
    try:
        row = await conn.fetchrow("SELECT * FROM users WHERE id=$1", 1)
    finally:
        await conn.close()
    for column in ("created_at", "balance", "public_id"):
        with pytest.raises(TypeError, match="not JSON serializable"):
            web.json_response({column: row[column]})
    assert "password_hash" in dict(row)  # SELECT * hands over the secret column too


async def test_erratum_04_article_handler_answers_500(aiohttp_client, users_db):
    """For the one user that exists, the article's handler answers 500."""
    client = await aiohttp_client(article_app(users_db, article_get_user))
    assert (await client.get("/users/1")).status == 500


async def test_erratum_04_our_encoder_and_column_list(aiohttp_client, users_db, monkeypatch):
    """Our dumps encodes all three types, and the column list leaves password_hash out."""
    from conftest import load_module

    monkeypatch.setenv("DATABASE_URL", users_db)
    module = load_module(CH02.folder / "app.py")
    client = await aiohttp_client(module.create_app())
    body = await (await client.get("/users/1")).json()
    assert body["created_at"] == "2026-06-26T09:30:00+00:00"
    assert body["balance"] == "1815.12" and body["public_id"].count("-") == 4
    assert "password_hash" not in body
    assert json.loads(module.dumps({"d": datetime.date(2026, 1, 2)})) == {"d": "2026-01-02"}


# -- Erratum 6: workers x min_size at boot, up to workers x max_size, more during a reload --------------------
def count_connections(pg, database: str) -> int:
    return int(execute(pg.admin_dsn, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'"))


def test_erratum_06_connections_grow_under_load_and_during_reload(pg):
    """2 workers: 4 connections at boot; blocked queries grow pools past that (never past 2 x 10);
    a reload (SIGHUP) briefly holds old and new workers' pools at once."""
    from conftest import fresh_database, load_module
    from test_03_gunicorn import wait_for_lines

    database = fresh_database(pg, CH03.schema)
    sizes = load_module(CH03.folder / "app.py")
    port = free_port()
    env = chapter_env(port, pg.dsn(database), WEB_CONCURRENCY="2")
    with Running(CH03.argv, CH03.folder, env, port) as running:
        running.wait_until("/health")
        wait_for_lines(running, "pool ready", 2)
        assert count_connections(pg, database) == 2 * sizes.POOL_MIN_SIZE

        # Hold a lock on users so every lookup waits inside the pool, holding a connection.
        locker = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import asyncio, asyncpg, sys
                async def main():
                    conn = await asyncpg.connect({pg.dsn(database)!r})
                    async with conn.transaction():
                        await conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                        print("locked", flush=True)
                        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                asyncio.run(main())
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        threads = [threading.Thread(target=get, args=(running.url + "/users/1", 30)) for _ in range(40)]
        for t in threads:
            t.start()
        peak = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            peak = max(peak, count_connections(pg, database) - 1)  # minus the locker
            time.sleep(0.1)
        locker.stdin.write("\n")
        locker.stdin.close()
        locker.wait(10)
        locker.stdout.close()
        for t in threads:
            t.join()
        assert 2 * sizes.POOL_MIN_SIZE < peak <= 2 * sizes.POOL_MAX_SIZE

        # A reload starts new workers (new pools) before the old ones finish closing theirs.
        assert get(running.url + "/users/1")[0] == 200
        os.kill(running.pid, signal.SIGHUP)
        peak = 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, count_connections(pg, database))
            time.sleep(0.02)
        assert peak > 2 * sizes.POOL_MIN_SIZE
        assert running.terminate() == 0


# -- Erratum 7: a module-scope ClientSession is a hard error --------------------------------------------------
def test_erratum_07_module_scope_client_session_raises():
    """Creating a ClientSession with no running event loop fails at import time."""
    result = subprocess.run([sys.executable, "-c", "import aiohttp\nhttp = aiohttp.ClientSession()"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "RuntimeError: no running event loop" in result.stderr


async def test_erratum_07_session_in_a_cleanup_context_works(aiohttp_client):
    """Created inside a cleanup context it binds to the running loop, and is closed at cleanup."""
    import aiohttp

    http_key = web.AppKey("http", aiohttp.ClientSession)

    async def http_client(app):
        app[http_key] = aiohttp.ClientSession()
        yield
        await app[http_key].close()

    app = web.Application()
    app.cleanup_ctx.append(http_client)
    client = await aiohttp_client(app)
    session = app[http_key]
    assert not session.closed
    await client.close()
    assert session.closed


# -- Erratum 8: string app keys warn, silently by default -----------------------------------------------------
def test_erratum_08_string_keys_warn_but_the_warning_is_hidden_by_default():
    """app["pool"] raises NotAppKeyWarning; with default warning filters nothing is printed."""
    with pytest.warns(web.NotAppKeyWarning):
        web.Application()["pool"] = object()
    result = subprocess.run(
        [sys.executable, "-c", "from aiohttp import web\nweb.Application()['pool'] = 1\nprint('stored')"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert result.stdout.strip() == "stored" and "NotAppKeyWarning" not in result.stderr


def test_erratum_08_chapters_use_typed_keys():
    """No chapter indexes an Application (app[...], request.app[...]) with a string."""
    import ast

    for chapter in chapters.load():
        tree = ast.parse((chapter.folder / "app.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("app"):
                assert not isinstance(node.slice, ast.Constant), f"{chapter.name}: {ast.unparse(node)}"

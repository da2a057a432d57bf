"""Chapter 02: an asyncpg pool in a cleanup context, and GET /users/{id} that no input can break.

Each test runs against chapter 02 and every later chapter.
"""
import time

import pytest
from aiohttp import web
from helpers import SAMPLE_USER, connections_to, silent_server

from tutorial.process import free_port, get, start


async def test_sample_user_as_json(client):
    """GET /users/1 answers the sample user, its timestamp, numeric and uuid columns encoded."""
    response = await client.get("/users/1")
    assert response.status == 200
    assert await response.json() == SAMPLE_USER


async def test_only_listed_columns_leave_the_database(client):
    """The query names its columns: a column the API does not list (password_hash) never leaks."""
    body = await (await client.get("/users/1")).text()
    assert "password_hash" not in body and "not-a-real-hash" not in body


async def test_missing_user_is_a_json_404(client):
    """A well-formed id with no row answers a JSON 404."""
    response = await client.get("/users/2")
    assert response.status == 404
    assert await response.json() == {"error": "User Not Found", "status": 404}


BAD_IDS = [
    "abc", "0", "-1", "+1", "01", "001", "1.0", "1e3", "0x1", " 1", "1 ", "%201", "1%20", "1,", "1/",
    "١", "１", "²", "1١", "2147483648", "4294967297", "9999999999", "99999999999",
    "1" * 40, "9" * 5000, "%00", "null", "true", "[1]", "1;DROP TABLE users", "1'",
]


@pytest.mark.parametrize("user_id", BAD_IDS)
async def test_every_other_form_of_id_is_a_json_404(client, user_id):
    """Letters, signs, spaces, leading zeros, non-ASCII digits, out-of-range and absurdly long ids: a JSON 404."""
    response = await client.get(f"/users/{user_id}")
    assert response.status == 404, await response.text()
    body = await response.json()
    assert body["status"] == 404 and "id" not in body


async def test_biggest_id_the_column_holds_is_looked_up(client):
    """2147483647 fits an integer column: it is a lookup (no such user), not a range error."""
    response = await client.get("/users/2147483647")
    assert response.status == 404
    assert await response.json() == {"error": "User Not Found", "status": 404}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_on_a_user_is_a_json_405(client, method):
    """Only GET is routed; other methods answer a JSON 405 with an Allow header."""
    response = await client.request(method, "/users/1")
    assert response.status == 405
    assert await response.json() == {"error": "Method Not Allowed", "status": 405}
    assert "GET" in response.headers["Allow"]


def test_the_pool_sits_behind_a_typed_app_key(app_module):
    """The pool is stored under a web.AppKey, not a string (erratum 8)."""
    assert isinstance(app_module.db_pool, web.AppKey)
    assert app_module.pg_pool in app_module.create_app().cleanup_ctx


async def test_cleanup_context_opens_min_size_and_closes_the_pool(aiohttp_client, app_module, db_url,
                                                                  monkeypatch, pg, db_name):
    """At startup the pool holds min_size connections; at cleanup it is closed and they are gone."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    app = app_module.create_app()
    client = await aiohttp_client(app)
    pool = app[app_module.db_pool]
    assert connections_to(pg, db_name) == app_module.POOL_MIN_SIZE
    await client.close()
    assert pool.is_closing()
    assert connections_to(pg, db_name) == 0


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
async def test_both_dsn_schemes_work(aiohttp_client, app_module, db_url, monkeypatch, scheme):
    """postgres:// (what many platforms inject) and postgresql:// both connect."""
    monkeypatch.setenv("DATABASE_URL", scheme + "://" + db_url.split("://", 1)[1])
    client = await aiohttp_client(app_module.create_app())
    assert (await client.get("/users/1")).status == 200


def test_runs_as_documented_and_serves_the_sample_user(served):
    """The documented command serves /users/1, and exits 0 on SIGTERM after closing its pool."""
    import json

    status, body = get(served.url + "/users/1")
    assert status == 200 and json.loads(body) == SAMPLE_USER
    assert get(served.url + "/users/abc")[0] == 404


# -- a database that is not there at boot: fail fast, with one clear line ---------------------------------
@pytest.mark.chapters(until="05")
def test_unreachable_database_at_boot_exits_nonzero_with_one_clear_line(chapter):
    """Nothing listens at DATABASE_URL: the process exits non-zero in seconds, saying why in one line."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with start(chapter, database_url=dead, WEB_CONCURRENCY="2") as running:
        code = running.proc.wait(timeout=20)
        output = running.output()
    assert code != 0, output
    lines = [line for line in output.splitlines() if "cannot reach the database" in line]
    assert len(lines) >= 1 and "Traceback" not in output, output


@pytest.mark.chapters(until="05")
def test_database_that_never_answers_does_not_stall_boot(chapter, app_module):
    """A server that accepts connections and says nothing: boot gives up after the connect timeout."""
    with silent_server() as port, start(chapter, database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
                                        WEB_CONCURRENCY="2") as running:
        began = time.monotonic()
        code = running.proc.wait(timeout=app_module.CONNECT_TIMEOUT + 20)
        waited = time.monotonic() - began
        output = running.output()
    assert code != 0 and "cannot reach the database" in output, output
    # Bounded by our timeout, nowhere near asyncpg's default of 60 s.
    assert waited < app_module.CONNECT_TIMEOUT * 3, f"took {waited:.1f}s"


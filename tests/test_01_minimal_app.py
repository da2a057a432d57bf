"""Chapter 01: an app factory with two JSON routes, and JSON errors for everything else.

Each test runs against chapter 01 and every later chapter.
"""
import pytest


async def test_index_says_hello(client):
    """GET / answers 200 with a JSON greeting."""
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"message": "Hello from aiohttp"}


async def test_health_is_ok(client):
    """GET /health answers 200 {"status": "ok"}."""
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/nope", "/health/", "/HEALTH", "/%00", "/" + "a" * 2000])
async def test_unknown_path_is_a_json_404(client, path):
    """An unknown path answers a JSON 404, not aiohttp's plain-text page."""
    response = await client.get(path)
    assert response.status == 404
    assert response.content_type == "application/json"
    assert await response.json() == {"error": "Not Found", "status": 404}


async def test_wrong_method_is_a_json_405_with_allow(client):
    """POST / answers a JSON 405 and still says which methods are allowed."""
    response = await client.post("/", data=b"x")
    assert response.status == 405
    assert await response.json() == {"error": "Method Not Allowed", "status": 405}
    assert "GET" in response.headers["Allow"]


def test_create_app_builds_a_new_app_each_call(app_module):
    """create_app() is a factory: every call (every Gunicorn worker) gets its own Application."""
    first, second = app_module.create_app(), app_module.create_app()
    assert first is not second
    assert first.router is not second.router


def test_runs_as_documented_and_stops_cleanly_on_sigterm(served):
    """The chapter's own command serves / and /health, and exits 0 on SIGTERM."""
    from tutorial.process import get

    assert get(served.url + "/") == (200, b'{"message": "Hello from aiohttp"}')
    status, body = get(served.url + "/nope")
    assert status == 404 and b'"status": 404' in body


async def test_a_bug_in_a_handler_is_a_json_500_with_one_logged_traceback(aiohttp_client, app_module, chapter,
                                                                         monkeypatch, request, caplog):
    """A handler that raises a real bug answers JSON {"error": "Internal Server Error", "status": 500}
    with no traceback in the body, and the traceback is logged once, on the server's side."""
    import json

    if chapter.schema:
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("db_url"))
    app = app_module.create_app()

    async def buggy(request):
        return {}["missing"]

    app.router.add_get("/bug", buggy)
    client = await aiohttp_client(app)
    response = await client.get("/bug")
    body = await response.text()
    assert response.status == 500 and response.content_type == "application/json", body
    assert json.loads(body) == {"error": "Internal Server Error", "status": 500}
    assert "Traceback" not in body and "KeyError" not in body
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], KeyError)]
    assert len(logged) == 1

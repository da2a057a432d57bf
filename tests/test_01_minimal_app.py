"""Chapter 01: an app factory with two JSON routes, and JSON errors for everything else.

Each test runs against chapter 01 and every later chapter.
"""

import pytest

from tutorial.learner.expect import allows_get, json_answer, said
from tutorial.parts.process import get, listening_ports


async def test_index_says_hello(client):
    """GET / answers 200 with a JSON greeting."""
    await json_answer(await client.get("/"), 200, {"message": "Hello from aiohttp"})


async def test_health_is_ok(client):
    """GET /health answers 200 {"status": "ok"}."""
    await json_answer(await client.get("/health"), 200, {"status": "ok"})


@pytest.mark.parametrize("path", ["/nope", "/health/", "/HEALTH", "/%00", "/" + "a" * 2000])
async def test_unknown_path_is_a_json_404(client, path):
    """An unknown path answers a JSON 404, not aiohttp's plain-text page."""
    await json_answer(await client.get(path), 404, {"error": "Not Found", "status": 404})


async def test_wrong_method_is_a_json_405_with_allow(client):
    """POST / answers a JSON 405 and still says which methods are allowed."""
    response = await client.post("/", data=b"x")
    await json_answer(response, 405, {"error": "Method Not Allowed", "status": 405})
    allows_get(response)


def test_create_app_builds_a_new_app_each_call(app_module):
    """create_app() is a factory: every call (every Gunicorn worker) gets its own Application."""
    first, second = app_module.create_app(), app_module.create_app()
    assert first is not second and first.router is not second.router, (
        "expected two calls of create_app() to build two applications, got the same one twice"
    )


def test_runs_as_documented_and_stops_cleanly_on_sigterm(served):
    """The chapter's own command serves / and /health, and exits 0 on SIGTERM."""
    for path, body in (
        ("/", b'{"message": "Hello from aiohttp"}'),
        ("/health", b'{"status": "ok"}'),
    ):
        status, got = get(served.url + path)
        assert (status, got) == (200, body), (
            f"expected GET {path} to answer 200 `{body.decode()}`, got {said(status, None, got)}"
        )


async def test_a_bug_in_a_handler_is_a_json_500_with_one_logged_traceback(
    aiohttp_client, app_module, chapter, monkeypatch, request, caplog
):
    """A handler that raises a real bug answers JSON {"error": "Internal Server Error", "status":
    500} with no traceback in the body, and the traceback is logged once, on the server's side."""
    if chapter.schema:
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("db_url"))
    app = app_module.create_app()

    async def buggy(request):
        return {}["missing"]

    app.router.add_get("/bug", buggy)
    client = await aiohttp_client(app)
    # An exact JSON body: no traceback or exception name can be in it.
    await json_answer(
        await client.get("/bug"), 500, {"error": "Internal Server Error", "status": 500}
    )
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], KeyError)]
    assert len(logged) == 1, (
        f"expected the bug's traceback logged once on the server's side, "
        f"it was logged {len(logged)} times"
    )


@pytest.mark.chapters(until="02")  # from chapter 03 on Gunicorn binds it: test_03_gunicorn.py
def test_listens_on_the_port_that_port_names(served):
    """`python app.py` listens on the port the PORT variable names, as platforms inject it."""
    ports = listening_ports(served.pid)
    assert ports == {served.port}, (
        f"expected it to listen on PORT={served.port} from its environment, "
        f"it listens on {', '.join(map(str, sorted(ports))) or 'nothing'} instead"
    )

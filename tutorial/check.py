"""`make check CHAPTER=NN DIR=path`: run chapter NN's tests against a learner's own folder.

It runs the same tests CI runs on the reference chapter (every behaviour chapters 01..NN introduce),
and prints one line per behaviour, in the words of each test's docstring, with the reason for a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

from . import chapters

TESTS = chapters.ROOT / "tests"


class BehaviourReport:
    """A pytest plugin: collects outcomes per test function and prints them as behaviours."""

    def __init__(self):
        self.results: OrderedDict[str, dict] = OrderedDict()
        self.chapter_id = chapters.get(os.environ["TUTORIAL_CHECK_CHAPTER"]).name

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            key = report.nodeid.split("[")[0]
            entry = self.results.setdefault(key, {"failed": [], "skipped": [], "passed": 0})
            if report.failed:
                entry["failed"].append((report.nodeid, _reason(report)))
            elif report.skipped:
                entry["skipped"].append((report.nodeid, _reason(report)))
            elif report.when == "call":
                entry["passed"] += 1

    def pytest_collection_modifyitems(self, items):
        self.docs = {item.nodeid.split("[")[0]: _first_line(item.function.__doc__) or item.name for item in items}

    def pytest_sessionfinish(self, session):
        ok = 0
        for key, entry in self.results.items():
            text = self.docs.get(key, key)
            if entry["failed"]:
                print(f"  FAIL  {text}")
                for nodeid, reason in entry["failed"][:3]:
                    # The chapter's own id is the same on every line; keep only the case that differs.
                    case = nodeid.partition("[")[2].rstrip("]").replace(self.chapter_id, "").strip("-")
                    print(f"          {('[' + case + '] ') if case else ''}{reason}")
                if len(entry["failed"]) > 3:
                    print(f"          ... and {len(entry['failed']) - 3} more cases")
            elif entry["skipped"] and not entry["passed"]:
                print(f"  SKIP  {text}\n          {entry['skipped'][0][1]}")
            else:
                ok += 1
                print(f"  ok    {text}")
        total = len(self.results)
        print(f"\n{ok} of {total} behaviours pass.")


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def _reason(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0][:200]
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])
    return str(report.longrepr).splitlines()[-1][:200]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0] or not argv[1]:
        print("usage: make check CHAPTER=NN DIR=path/to/your/folder")
        return 2
    chapter = chapters.get(argv[0])
    folder = Path(argv[1]).expanduser().resolve()
    if not (folder / "app.py").is_file():
        print(f"{folder} has no app.py: point DIR at the folder that holds your chapter {chapter.number} app.py")
        return 2
    modules = [str(c.test_module) for c in chapters.load() if c.index <= chapter.index and c.test_module.exists()]
    print(f"Checking {folder} as chapter {chapter.number} ({chapter.title}),")
    print(f"with the tests of chapters 01 to {chapter.number}: `{chapter.run}` is the command they run.\n")
    env = dict(os.environ, TUTORIAL_CHECK_CHAPTER=chapter.number, TUTORIAL_CHECK_DIR=str(folder))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=--strict-markers", "-o", "verbosity_assertions=2", "-p", "tutorial.check",
         "-p", "no:terminal", "-p", "no:cacheprovider",
         *modules],
        cwd=chapters.ROOT, env=env,
    )
    return result.returncode


def pytest_configure(config):
    """Loaded with -p tutorial.check: register the report."""
    config.pluginmanager.register(BehaviourReport(), "behaviour-report")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`make check CHAPTER=NN DIR=path`: run chapter NN's tests against a learner's own folder.

It runs the same tests CI runs on the reference chapter (every behaviour chapters 01..NN introduce),
and prints one line per behaviour, in the words of each test's docstring, with the reason for a
failure, then what to do next, and nothing after that.

Each behaviour is judged on its own. A warning that one behaviour is about (NotAppKeyWarning: the
typed key) fails that behaviour only; elsewhere it is let through. Something the app leaves open
(a connection, a session, a socket) fails one behaviour of its own instead of a wall of tracebacks.
`make test` keeps every warning an error: this plugin is loaded by `make check` alone.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import pytest

from . import chapters

# Warnings that one behaviour judges by itself, and that behaviour (its test function's node id).
JUDGED_APART = {
    "aiohttp.web_exceptions.NotAppKeyWarning": (
        "tests/test_02_database_pool.py::test_the_pool_sits_behind_a_typed_app_key"
    ),
}
LEAK_BEHAVIOUR = (
    "Nothing the app opens is left open once it stops: no connection, session or socket."
)


class BehaviourReport:
    """A pytest plugin: collects outcomes per test function and prints them as behaviours."""

    def __init__(self):
        self.results: OrderedDict[str, dict] = OrderedDict()
        self.chapter = chapters.get(os.environ["TUTORIAL_CHECK_CHAPTER"])
        self.folder = os.environ.get("TUTORIAL_CHECK_DIR", "path/to/your/folder")
        self.current: str | None = None
        self.leaked: dict[
            str, list[str]
        ] = {}  # test function -> what the garbage collector found open
        self.previous_hook = None
        self.leak_failed = False

    # -- what each test judges ---------------------------------------------------------------------
    def pytest_collection_modifyitems(self, items):
        self.docs = {
            key(item.nodeid): _first_paragraph(item.function.__doc__) or item.name for item in items
        }
        for item in items:
            for warning, judge in JUDGED_APART.items():
                if key(item.nodeid) != judge:
                    item.add_marker(pytest.mark.filterwarnings(f"ignore::{warning}"))

    # -- leaks: an unraisable ResourceWarning, found by a garbage collection after each test -------
    def pytest_configure(self, config):
        self.previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def pytest_unconfigure(self, config):
        sys.unraisablehook = self.previous_hook

    def _unraisable(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, ResourceWarning):
            self.leaked.setdefault(self.current or "", []).append(
                _what_leaked(str(unraisable.exc_value))
            )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = key(item.nodeid)
        try:
            return (yield)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "error", ResourceWarning
                )  # a finalizer's warning reaches the hook
                gc.collect()
            self.current = None

    # -- outcomes ----------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            entry = self.results.setdefault(
                key(report.nodeid), {"failed": [], "skipped": [], "passed": 0}
            )
            if report.failed:
                entry["failed"].append((report.nodeid, _reason(report)))
            elif report.skipped:
                entry["skipped"].append((report.nodeid, _reason(report)))
            elif report.when == "call":
                entry["passed"] += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            gc.collect()
        verdicts = [
            self._print(self.docs.get(name, name), entry) for name, entry in self.results.items()
        ]
        verdicts.append(self._print_leaks())
        print(f"\n{verdicts.count('ok')} of {len(verdicts)} behaviours pass.")
        print(self._next_steps("FAIL" in verdicts, "SKIP" in verdicts))
        if self.leak_failed and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = (
                pytest.ExitCode.TESTS_FAILED
            )  # a leak fails the check, as a test would

    def _print(self, text: str, entry: dict) -> str:
        if entry["failed"]:
            print(f"  FAIL  {text}")
            for nodeid, reason in entry["failed"][:3]:
                # The chapter's own id is the same on every line; keep only the case that differs.
                case = (
                    nodeid.partition("[")[2].rstrip("]").replace(self.chapter.name, "").strip("-")
                )
                print(f"          {('[' + case + '] ') if case else ''}{reason}")
            if len(entry["failed"]) > 3:
                print(f"          ... and {len(entry['failed']) - 3} more cases")
            return "FAIL"
        if entry["skipped"] and not entry["passed"]:
            print(f"  SKIP  {text}\n          {entry['skipped'][0][1]}")
            return "SKIP"
        print(f"  ok    {text}")
        return "ok"

    def _print_leaks(self) -> str:
        # A test that failed explains itself; what it left open is most likely a result of that
        # failure.
        failed = {name for name, entry in self.results.items() if entry["failed"]}
        found = {name: what for name, what in self.leaked.items() if name not in failed}
        if not found:
            print(f"  ok    {LEAK_BEHAVIOUR}")
            return "ok"
        counts = Counter(thing for things in found.values() for thing in things)
        where = [self.docs.get(name, "the end of the run") for name in found]
        more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
        self.leak_failed = True
        print(f"  FAIL  {LEAK_BEHAVIOUR}")
        print(
            f"          expected nothing left open, got {_listed(counts)} "
            "left for the garbage collector, "
            f'after "{where[0]}"{more}'
        )
        return "FAIL"

    def _next_steps(self, failed: bool, skipped: bool) -> str:
        number = self.chapter.number
        again = f"make check CHAPTER={number} DIR={self.folder}"
        if skipped and not failed:
            return (
                f"Next: install what each SKIP names, then run {again} again "
                "to check those behaviours too."
            )
        if not failed:
            later = [c for c in chapters.load() if c.index > self.chapter.index]
            if later:
                return (
                    f"Next: chapter {later[0].number}, {later[0].title}: "
                    f"make check CHAPTER={later[0].number} DIR={self.folder}"
                )
            return "Every behaviour of every chapter passes."
        return (
            f"Next: start with the first FAIL; docs/chapters/{self.chapter.name}.md explains each "
            f"behaviour. Then run {again} again."
        )


def key(nodeid: str) -> str:
    """A test function's id, without its parameters: one behaviour."""
    return nodeid.split("[")[0]


def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line: the behaviour, in the test's own words."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _what_leaked(message: str) -> str:
    lowered = message.lower()
    for needle, name in (
        ("asyncpg", "asyncpg connection"),
        ("client session", "aiohttp ClientSession"),
        ("connector", "aiohttp connector"),
        ("transport", "transport"),
        ("socket", "socket"),
        ("event loop", "event loop"),
        ("file", "file"),
    ):
        if needle in lowered:
            return name
    return message.split(" <")[0]


def _listed(counts: Counter) -> str:
    parts = [f"{n} {thing}{'s' if n > 1 else ''}" for thing, n in counts.most_common()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _reason(report) -> str:
    """One sentence: a failed expectation's own words, or what the app raised."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        message = crash.message
        kind, _, text = message.partition(": ")
        if kind in ("AssertionError", "Failed"):
            return text.splitlines()[0][:300] if text else "a check failed without saying why"
        if kind.endswith("Warning") and text:
            return (
                f"expected no warning, got {kind.rpartition('.')[2]}: {text.splitlines()[0][:200]}"
            )
        return (
            f"the app raised {kind.rpartition('.')[2]}: "
            f"{text.splitlines()[0][:200] if text else '(no message)'}"
        )
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr).strip().splitlines()[-1][:300]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0] or not argv[1]:
        print("usage: make check CHAPTER=NN DIR=path/to/your/folder")
        return 2
    chapter = chapters.get(argv[0])
    folder = Path(argv[1]).expanduser().resolve()
    if not (folder / "app.py").is_file():
        print(
            f"{folder} has no app.py: "
            f"point DIR at the folder that holds your chapter {chapter.number} app.py"
        )
        return 2
    modules = [
        str(c.test_module)
        for c in chapters.load()
        if c.index <= chapter.index and c.test_module.exists()
    ]
    print(f"Checking {folder} as chapter {chapter.number} ({chapter.title}),")
    print(
        f"with the tests of chapters 01 to {chapter.number}: "
        f"`{chapter.run}` is the command they run.\n"
    )
    env = dict(os.environ, TUTORIAL_CHECK_CHAPTER=chapter.number, TUTORIAL_CHECK_DIR=str(folder))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=--strict-markers",
            "-p",
            "tutorial.check",
            # The report itself says everything: no pytest summary, and leaks are one behaviour
            # (above).
            "-p",
            "no:terminal",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:unraisableexception",
            # The report lists a behaviour's cases in the order they are written, even in a venv
            # that has pytest-randomly (which would shuffle them).
            "-p",
            "no:randomly",
            *modules,
        ],
        cwd=chapters.ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode >= pytest.ExitCode.INTERNAL_ERROR:  # pytest itself could not run the tests
        print(
            result.stderr.strip().splitlines()[-1]
            if result.stderr.strip()
            else "pytest could not start"
        )
    return result.returncode


def pytest_configure(config):
    """Loaded with -p tutorial.check: register the report."""
    config.pluginmanager.register(BehaviourReport(), "behaviour-report")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

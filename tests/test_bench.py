"""`make bench` cannot rot: one short variant end to end, checked for well-formed results.

Speed is measured by the bench and discussed in docs/performance.md; no test here asserts a timing.
"""
import json
import shutil
import subprocess
import sys

from helpers import missing

from tutorial import chapters

ROOT = chapters.ROOT


def test_bench_smoke_writes_well_formed_results(tmp_path):
    """`python -m bench --smoke` runs one variant for 1 s per path and writes results.json, table.md and a PNG."""
    if shutil.which("wrk") is None:
        missing("wrk", "apt-get install wrk (Debian/Ubuntu) or brew install wrk (macOS); see bench/README.md")
    docs_chart = ROOT / "docs" / "img" / "bench.png"
    before = docs_chart.stat().st_mtime_ns if docs_chart.exists() else None

    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[ 1/1]" in done.stdout, "no progress line:\n" + done.stdout

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["smoke"] is True
    assert results["settings"]["chapter"] == chapters.latest().name
    assert results["settings"]["sample_users"] >= 1000
    assert results["versions"]["aiohttp"] != "missing" and results["versions"]["wrk"] != "missing"
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
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A smoke run leaves the committed results and the docs' copy of the chart alone.
    after = docs_chart.stat().st_mtime_ns if docs_chart.exists() else None
    assert after == before

"""The load generators: wrk for HTTP, pgbench for the database on its own.

Both run for a fixed number of seconds against 127.0.0.1 only, with a hard subprocess timeout on
top, and report the same fields: requests, req/s, p50/p99 in ms, errors, and their own CPU.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from tutorial.parts.database import POSTGRES_BIN_PATH

HERE = Path(__file__).resolve().parent
REPORT_LUA = HERE / "wrk" / "report.lua"
USERS_LUA = HERE / "wrk" / "users.lua"
THREADS = 1
CONNECTIONS = 32
PGBENCH_CLIENTS = 20  # the pool budget of two workers: 2 x max_size 10


class LoadError(RuntimeError):
    pass


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str], seconds: int, cwd: Path | None = None) -> tuple[str, float, float]:
    """Run a load generator to completion; returns its output, its CPU seconds and the wall time."""
    cpu0, t0 = _children_cpu(), time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, cwd=cwd)
    wall, cpu = time.monotonic() - t0, _children_cpu() - cpu0
    if result.returncode != 0:
        raise LoadError(
            f"{argv[0]} exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-500:]}"
        )
    return result.stdout, cpu, wall


def wrk(url: str, seconds: int, users: int = 0) -> dict:
    """GET `url` for `seconds`; with `users`, GET /users/{random id in 1..users} instead."""
    argv = [
        wrk_binary() or "wrk",
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "--timeout",
        "2s",
    ]
    argv += ["-s", str(USERS_LUA), url, "--", str(users)] if users else ["-s", str(REPORT_LUA), url]
    out, cpu, wall = _run(argv, seconds)
    line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise LoadError(f"wrk printed no BENCH line:\n{out}")
    raw = json.loads(line[len("BENCH ") :])
    return {
        "requests": raw["requests"],
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": sum(raw["errors"].values()),
        "error_detail": raw["errors"],
        "client_cpu_pct": round(100 * cpu / wall, 1),
    }


def pgbench(dsn_parts: dict, select: str, seconds: int, users: int, workdir: Path) -> dict:
    """The chapter's SELECT for a random id, prepared (as asyncpg does), from PGBENCH_CLIENTS
    sessions."""
    script = workdir / "select.sql"
    script.write_text(f"\\set id random(1, {users})\n{select}\n")
    for old in workdir.glob("pgbench_log*"):
        old.unlink()
    argv = [
        str(POSTGRES_BIN_PATH / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(PGBENCH_CLIENTS),
        "-j",
        "1",
        "-T",
        str(seconds),
        "-f",
        str(script),
        "-l",
        f"--log-prefix={workdir / 'pgbench_log'}",
        "-h",
        dsn_parts["host"],
        "-p",
        str(dsn_parts["port"]),
        "-U",
        dsn_parts["user"],
        dsn_parts["database"],
    ]
    out, cpu, wall = _run(argv, seconds, cwd=workdir)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    # Per-transaction log: client, transaction no., latency in µs, ... (pgbench docs,
    # "Per-Transaction Logging").
    latencies = sorted(
        int(line.split()[2]) for f in workdir.glob("pgbench_log*") for line in f.open()
    )
    if not tps or not latencies:
        raise LoadError(f"pgbench output not understood:\n{out}")
    cut = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "rps": round(float(tps.group(1)), 1),
        "p50_ms": cut[49] / 1000,
        "p99_ms": cut[98] / 1000,
        "max_ms": latencies[-1] / 1000,
        "errors": int(failed.group(1)) if failed else 0,
        "client_cpu_pct": round(100 * cpu / wall, 1),
    }

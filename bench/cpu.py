"""CPU per process over a measurement window, as a percentage of one core.

Processes are found as process trees (a Gunicorn master and its workers, the postmaster and its
backends) at both ends of the window: one that appears during it counts from zero, so the backends
pgbench opens are included. The load generator is our own child; its CPU comes from
getrusage(RUSAGE_CHILDREN) around its run (see load.py).
"""

from __future__ import annotations

import time

import psutil


def _tree(pid: int) -> dict[int, float]:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    seen = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
            seen[proc.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return seen


class Meter:
    """`groups` maps a name ("server", "postgres") to the root pid of a process tree."""

    def __init__(self, **groups: int | None):
        self.groups = {name: pid for name, pid in groups.items() if pid}
        self._start: dict[str, dict[int, float]] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._start = {name: _tree(pid) for name, pid in self.groups.items()}
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, list[float]]:
        """Each group's processes, busiest first, in % of one core; idle ones (<0.5%) left out."""
        wall = time.monotonic() - self._t0
        result = {}
        for name, pid in self.groups.items():
            before = self._start.get(name, {})
            used = [cpu - before.get(p, 0.0) for p, cpu in _tree(pid).items()]
            result[name] = sorted(
                (round(100 * u / wall, 1) for u in used if u / wall >= 0.005), reverse=True
            )
        return result

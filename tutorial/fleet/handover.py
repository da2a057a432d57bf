"""A second terminal's `make rollout` takes over the `make fleet` running in the same runtime
folder.

make fleet rewrites fleet.json whenever its replicas change. make rollout reads it to reach the
shared parts (PostgreSQL, PgBouncer, HAProxy, Prometheus: to ask and to update, never to start or
stop) and writes back the replicas it adds and removes; make fleet stops whatever is listed at
its end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from tutorial import chapters

from . import postgres
from .pgbouncer import PgBouncer
from .processes import Adopted

if TYPE_CHECKING:
    from .fleet import Fleet


class StateFile:
    def __init__(self, runtime: Path):
        self.path = runtime / "fleet.json"

    def write(self, state: dict) -> None:
        scratch = self.path.with_suffix(".tmp")  # a reader never sees half a file
        scratch.write_text(json.dumps(state))
        scratch.replace(self.path)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def replicas(self, state: dict | None = None) -> dict[int, tuple[str, int]]:
        """The replicas `state` (else the file) lists, by slot: (name, pid)."""
        listed = (state or self.read() or {}).get("replicas", {})
        return {int(slot): (name, pid) for slot, (name, pid) in listed.items()}


def state_of(fleet: Fleet) -> dict:
    """What make rollout needs to take the fleet over, and make fleet to stop what it added."""
    state = {
        "pid": os.getpid() if fleet.owner is None else fleet.owner,
        "port": fleet.port,
        "app_port": fleet.app_port,
        "pgbouncer_port": fleet.pgbouncer.port,
        "postgres_port": fleet.postgres.port,
        "postgres_socket": str(getattr(fleet.postgres, "socket_dir", "")),
        "chapter": fleet.chapter.number,
        "names": fleet.names,
        "graceful_timeout": fleet.graceful_timeout,
        "replicas": {str(slot): [r.name, r.proc.pid] for slot, r in fleet.replicas.items()},
    }
    if fleet.metrics:
        state["metrics_ports"] = [
            fleet.metrics_port,
            fleet.haproxy_metrics_port,
            fleet.prometheus_port,
        ]
    return state


def take_over(fleet: Fleet) -> bool:
    """Make `fleet` the make fleet running in its runtime folder, if one runs on its port."""
    state = fleet.state_file.read()
    if not state or state["port"] != fleet.port or not psutil.pid_exists(state["pid"]):
        return False
    fleet.owner = state["pid"]
    fleet.app_port = state["app_port"]
    fleet.graceful_timeout, fleet.names = state["graceful_timeout"], state["names"]
    # The chapter make fleet runs, whatever this run was asked for.
    fleet.set_chapter(chapters.get(state["chapter"]))
    tls = fleet.secrets.files() if fleet.tls else None
    fleet.postgres = postgres.server(fleet.runtime, tls, port=state["postgres_port"])
    if tls:
        fleet.postgres.socket_dir = Path(state["postgres_socket"])
    fleet.pgbouncer = PgBouncer(
        fleet.runtime, fleet.numbers, postgres.DATABASE, fleet.postgres.port, tls=tls
    )
    fleet.pgbouncer.port = state["pgbouncer_port"]
    fleet.database_url = fleet.pgbouncer.url
    if fleet.metrics:
        ports = state["metrics_ports"]
        fleet.metrics_port, fleet.haproxy_metrics_port, fleet.prometheus_port = ports
        fleet.prometheus = fleet.make_prometheus()
    fleet.haproxy = fleet.make_haproxy()
    refresh(fleet)
    return True


def refresh(fleet: Fleet) -> None:
    """The fleet's replicas as the state file lists them (a rollout may have replaced some)."""
    state = fleet.state_file.read() or {}
    listed = fleet.state_file.replicas(state)
    for slot in list(fleet.replicas):
        if slot not in listed or fleet.replicas[slot].proc.pid != listed[slot][1]:
            fleet.replicas.pop(slot)
    for slot, (name, pid) in listed.items():
        if slot not in fleet.replicas:
            fleet.replicas[slot] = Adopted(fleet, slot, name, pid)
    fleet.names = max(fleet.names, state.get("names", 0))


def not_ours(fleet: Fleet) -> list[Adopted]:
    """Replicas the state file lists that this run did not start (a make rollout's)."""
    known = {r.proc.pid for r in fleet.replicas.values()}
    return [
        Adopted(fleet, slot, name, pid)
        for slot, (name, pid) in fleet.state_file.replicas().items()
        if pid not in known
    ]

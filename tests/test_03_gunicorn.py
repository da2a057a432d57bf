"""Chapter 03: Gunicorn with aiohttp's worker; one pool per worker, and the connection budget.

Each test runs against chapter 03 and every later chapter.
"""

import re

import psutil
import pytest
from helpers import wait_for_connections, wait_for_lines

from tutorial.learner.expect import last_lines, serving
from tutorial.parts.process import get, listening_ports, start


@pytest.mark.parametrize("workers", [2, 3])
def test_connections_at_boot_are_workers_times_min_size(chapter, reference, pg, db_name, workers):
    """With WEB_CONCURRENCY=N, pg_stat_activity shows exactly N x min_size connections once
    booted."""
    wanted = workers * reference.POOL_MIN_SIZE
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY=str(workers)) as running:
        serving(running, chapter.run)
        seen = wait_for_connections(pg, db_name, wanted)
        assert seen == wanted, (
            f"expected {workers} workers x min_size={reference.POOL_MIN_SIZE} = {wanted} "
            f"connections once booted, pg_stat_activity shows {seen}"
        )
        code = running.terminate()
        assert code == 0, (
            f"expected exit 0 on SIGTERM, got {code}; "
            f"it last printed: {last_lines(running.output())}"
        )
    left = wait_for_connections(pg, db_name, 0)
    assert left == 0, f"expected every pool closed at shutdown, {left} connections were left open"


def test_each_worker_is_a_process_with_its_own_pool(chapter, pg, db_name):
    """WEB_CONCURRENCY=3 runs three worker processes under one master, each logging its pool's sizes
    once."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="3") as running:
        serving(running, chapter.run)
        # The chapter's log line names each pool: "pool ready (pid N, min_size=2, max_size=10)".
        lines = wait_for_lines(
            running, "pool ready", 3, why=" (the chapter's line as each worker's pool opens)"
        )
        workers = psutil.Process(running.pid).children()
        assert len(workers) == 3, (
            f"expected 3 worker processes under the master, found {len(workers)}"
        )
        pids = {int(found.group(1)) for line in lines if (found := re.search(r"pid (\d+)", line))}
        assert pids == {w.pid for w in workers}, (
            f"expected each 'pool ready' line to name its worker's pid "
            f"{sorted(w.pid for w in workers)}, "
            f"got {last_lines(chr(10).join(lines), 3)}"
        )
        sizes = [line for line in lines if "min_size=2" in line and "max_size=10" in line]
        assert len(sizes) == 3, (
            f"expected each 'pool ready' line to say min_size=2 and max_size=10, got {lines[0]}"
        )
        code = running.terminate()
        assert code == 0, (
            f"expected exit 0 on SIGTERM, got {code}; "
            f"it last printed: {last_lines(running.output())}"
        )
        wait_for_lines(running, "pool closed", 3)


def test_boot_logs_the_connection_budget(chapter, pg, db_name):
    """The master states the budget once: workers x min_size at boot, workers x max_size at most."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="4") as running:
        serving(running, chapter.run)
        lines = wait_for_lines(
            running, "connection budget", 1, why=" (the chapter's line from the master at boot)"
        )
        assert len(lines) == 1, (
            f"expected the budget once, from the master; it was logged {len(lines)} times"
        )
        assert "4 workers" in lines[0] and "= 8 at boot" in lines[0] and "up to 40" in lines[0], (
            f"expected '4 workers', '= 8 at boot' and 'up to 40' with WEB_CONCURRENCY=4, "
            f"got `{lines[0].strip()}`"
        )
        running.terminate()


@pytest.mark.chapters(until="05")  # chapter 06 leaves the access log to the proxy (test_06)
def test_access_log_has_a_line_per_request(served):
    """Every request leaves one access-log line with its path and status."""
    get(served.url + "/users/1")
    get(served.url + "/users/abc")
    wait_for_lines(served, '"GET /users/1 HTTP/1.1" 200', 1)
    wait_for_lines(served, '"GET /users/abc HTTP/1.1" 404', 1)


def test_port_comes_from_the_environment(served):
    """PORT picks the port Gunicorn listens on (the served fixture sets a free one)."""
    # From chapter 10 on it also listens on METRICS_PORT (also set free), for
    # Prometheus alone; the docstring is the behaviour a learner's report names.
    ports = listening_ports(served.pid) - {int(served.env["METRICS_PORT"])}
    assert ports == {served.port}, (
        f"expected Gunicorn to listen on PORT={served.port} from its environment, "
        f"it listens on {', '.join(map(str, sorted(ports))) or 'nothing'} instead"
    )


ERROR_LOOKING = re.compile(r"Error|ERROR|Errno|Traceback")


def test_a_normal_start_and_stop_logs_nothing_that_looks_like_an_error(chapter, pg, db_name):
    """Boot, a few ordinary requests, SIGTERM: from the first line to the exit, no line says Error,
    ERROR or Errno and no traceback is printed (chapter 06's uvloop worker once logged an Errno
    9)."""
    with start(chapter, database_url=pg.dsn(db_name), WEB_CONCURRENCY="2") as running:
        serving(running, chapter.run)
        wait_for_lines(
            running, "pool ready", 2, why=" (the chapter's line as each worker's pool opens)"
        )
        for path in ("/", "/health", "/users/1"):
            status = get(running.url + path)[0]
            assert status == 200, f"expected GET {path} to answer 200, got {status}"
        code = running.terminate()
        output = running.output()
    assert code == 0, (
        f"expected exit 0 on SIGTERM, got {code}; it last printed: {last_lines(output)}"
    )
    assert "Shutting down: Master" in output, (
        f"expected Gunicorn's master to say it shut down, it last printed: {last_lines(output)}"
    )
    bad = [line for line in output.splitlines() if ERROR_LOOKING.search(line)]
    assert bad == [], (
        f"expected no line that looks like an error on a normal start and stop, got "
        f"{len(bad)}, the first: {bad[0] if bad else ''}"
    )


def test_the_boot_log_says_where_it_listens(served):
    """The log names the address as a URL with the port Gunicorn bound; pasted into curl, it
    answers."""
    urls = set(re.findall(rf"\bhttps?://[\w.:\[\]-]+:{served.port}\b", served.output()))
    assert urls, (
        f"expected a log line naming a URL with port {served.port}, it last printed: "
        f"{last_lines(served.output(), 3)}"
    )
    for url in sorted(urls):
        status = get(url + "/health")[0]
        assert status == 200, (
            f"expected {url}/health, as the log names it, to answer 200, got {status}"
        )

"""`make rollout [SETUP=article]`: a rolling deploy, rehearsed in Kubernetes' order under steady
load.

It starts a fleet of its own (fleet.py), sends a steady rate of requests through HAProxy,
and replaces every replica with the numbers of chapter 07's manifests (replicas, maxSurge, preStop,
grace period, probe periods). For each old replica:

1. a surge replica starts; the rollout waits until its startupProbe, then its readinessProbe pass
   (or stops, as progressDeadlineSeconds would, when it never does), and adds it to HAProxy;
2. the old replica is marked terminating; from then on, as the kubelet and the endpoints controller
   do, two things run at once:
3. its removal from HAProxy, after PROPAGATION seconds (an endpoints update is not instant), and
4. its preStop sleep, then SIGTERM, then SIGKILL once the grace period has passed.

SETUP=article: no preStop, Gunicorn's default graceful_timeout (30 s) and Kubernetes' default grace
period (30 s), so SIGTERM races the endpoint removal and the drain races the kill.

It writes a JSON report and a chart, and its last line is the one the chapter page quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tutorial import chapters

from .fleet import Fleet, FleetError, missing_tools, runtime_dir, say
from .processes import CHAPTER
from .prometheus import SCRAPE_INTERVAL as SCRAPE

# How long an endpoint removal takes to reach the load balancer. Assumed, not measured: kube-proxy
# on every node has to see the EndpointSlice change; a second is quick for a real cluster.
PROPAGATION = 1.0
BASELINE = 4.0  # seconds of steady load before the first replica is touched
AFTER = 1.0  # and after the last one has gone
RATE = 200  # requests per second, each on a new connection, as clients arriving
REQUEST_TIMEOUT = 5.0
PATH = "/users/1"
# The article's setup: what Gunicorn and Kubernetes do when nothing is set.
ARTICLE = {"prestop": 0, "graceful_timeout": 30, "grace": 30}
KINDS = ("refused", "reset", "5xx", "timeout", "other")


class Load:
    """A steady rate of GETs through the load balancer, and PostgreSQL's connection count, sampled,
    in a thread with an event loop of its own."""

    def __init__(self, url: str, admin_dsn: str, rate: int = RATE):
        self.url, self.admin_dsn, self.rate = url + PATH, admin_dsn, rate
        self.started = time.monotonic()
        self.results: list[
            tuple[float, float, str]
        ] = []  # (start, seconds, "ok" or a failure kind)
        self.pg: list[tuple[float, int]] = []
        self.statuses: collections.Counter = collections.Counter()  # HTTP statuses that came back
        self.fields: list[tuple[float, str]] = []  # (start, "name" or "display_name") of each 200
        self._stop = threading.Event()
        self._running = threading.Event()  # the loop and session burst() sends on are up
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 5)

    async def _main(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            # aiohttp sends a GET again, once, when the connection closes before an answer (its own
            # test client turns that off too): a request here is one attempt, as HAProxy saw it.
            session._retry_connection = False
            self._loop, self._session = asyncio.get_running_loop(), session
            self._running.set()
            sampler = asyncio.create_task(self._sample())
            tasks = set()
            tick = time.monotonic()
            while not self._stop.is_set():
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # A busy machine makes the loop late: carry on at the rate, no burst to catch up.
                tick = max(tick + 1 / self.rate, time.monotonic() - 0.1)
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if tasks:
                await asyncio.wait(tasks)
            sampler.cancel()

    def burst(self, count: int) -> list[str]:
        """`count` requests at once, from another thread, counted with the others; their kinds."""
        self._running.wait(REQUEST_TIMEOUT)

        async def at_once() -> list[str]:
            return await asyncio.gather(*(self._one(self._session) for _ in range(count)))

        sent = asyncio.run_coroutine_threadsafe(at_once(), self._loop)
        return sent.result(REQUEST_TIMEOUT + 5)

    async def _one(self, session) -> str:
        import aiohttp

        began = time.monotonic()
        try:
            async with session.get(self.url) as response:
                body = await response.read()
                self.statuses[response.status] += 1
                if response.status == 200:  # old code serves name, chapter 09's display_name
                    field = "display_name" if b'"display_name"' in body else "name"
                    self.fields.append((began - self.started, field))
                kind = (
                    "ok" if response.status == 200 else "5xx" if response.status >= 500 else "other"
                )
        except aiohttp.ClientConnectorError:
            kind = "refused"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
            kind = "reset"  # accepted, then closed without an answer
        except TimeoutError:
            kind = "timeout"
        except aiohttp.ClientError:
            kind = "other"
        self.results.append((round(began - self.started, 4), time.monotonic() - began, kind))
        return kind

    async def _sample(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            while True:
                count = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                self.pg.append((self.now(), count))
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


class Rollout:
    def __init__(
        self,
        fleet: Fleet,
        load: Load,
        setup: str = "chapter",
        *,
        progress_deadline: float | None = None,
        surge_env: dict | None = None,
        say=say,
        on_event=None,
    ):
        n = fleet.numbers
        self.fleet, self.load, self.setup, self.say = fleet, load, setup, say
        self.on_event = on_event  # called with (replica name, event) as each one happens
        self.prestop = n.prestop if setup == "chapter" else ARTICLE["prestop"]
        self.grace = n.grace if setup == "chapter" else ARTICLE["grace"]
        self.progress_deadline = progress_deadline or n.progress_deadline
        self.surge_env = surge_env or {}
        self.events: list[dict] = []
        self.stopped: str | None = None
        self.migration: dict | None = None  # what migrate.py did, when the rollout ran it
        self.pending, self.terminating = (
            [],
            [],
        )  # surges not ready yet, old replicas on their way out
        self._lock = threading.Lock()

    def mark(self, name: str, event: str) -> None:
        at = self.load.now()
        with self._lock:
            self.events.append({"t": at, "replica": name, "event": event})
        self.say(f"{at:6.1f}s  {name}: {event}")
        if self.on_event:
            self.on_event(name, event)

    def migrate(self) -> bool:
        """A team's order: the new chapter's migrations once, on a direct connection, while the
        old replicas serve; only then the new code. False (and nothing replaced) if it failed."""
        self.mark("migrate.py", f"chapter {self.fleet.chapter.number}'s migrations started")
        began = time.monotonic()
        code, output = self.fleet.migrate()
        took = round(time.monotonic() - began, 2)
        for line in output.splitlines():
            self.mark("migrate.py", line.removeprefix("migrate: "))
        self.migration = {"exit": code, "s": took, "output": output}
        if code != 0:
            self.stopped = "migration failed: no replica was replaced"
            return False
        self.fleet.code = self.fleet.chapter  # the surges run the new code
        return True

    def run(self) -> None:
        threads = []
        for old in list(self.fleet.replicas.values()):
            with self._lock:
                surge = self.fleet.add_replica(**self.surge_env)
                self.pending.append(surge)
            self.mark(surge.name, f"created on {surge.address} (surge)")
            why = self.fleet.wait_ready(surge, timeout=self.progress_deadline)
            if why:
                self.stopped = f"rollout stopped: {why}; the old replicas keep serving"
                self.mark(surge.name, "never ready: rollout stopped")
                surge.stop(timeout=self.grace)
                with self._lock:
                    self.pending.remove(surge)
                    self.fleet.remove(surge.slot)
                break
            self.fleet.haproxy.enable(surge.slot)
            with self._lock:
                self.pending.remove(surge)
            self.mark(surge.name, "ready: in the load balancer")
            thread = threading.Thread(target=self.terminate, args=(old,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def terminate(self, replica) -> None:
        """The kubelet and the endpoints controller, each on its own clock."""
        with self._lock:
            self.terminating.append(replica)
        self.mark(replica.name, "terminating")

        def remove():
            self.fleet.haproxy.disable(replica.slot)
            self.mark(replica.name, "out of the load balancer")

        removal = threading.Timer(PROPAGATION, remove)
        removal.start()
        if self.prestop:
            time.sleep(self.prestop)
            self.mark(replica.name, f"preStop sleep {self.prestop} s done")
        replica.send(signal.SIGTERM)
        self.mark(replica.name, "SIGTERM")
        try:
            code = replica.proc.wait(max(self.grace - self.prestop, 0))
            self.mark(replica.name, f"exited ({code})")
        except subprocess.TimeoutExpired:  # the grace period is over
            replica.kill()
            self.mark(replica.name, "SIGKILL at the end of the grace period")
        removal.join()
        with self._lock:
            self.terminating.remove(replica)
            self.fleet.remove(replica.slot)

    def abandon(self) -> None:
        """Interrupted on a fleet that make fleet owns: leave it whole, serving, with nothing
        half-done. A surge not ready yet goes; an old replica on its way out leaves the load
        balancer and gets its SIGTERM now."""
        with self._lock:
            for surge in self.pending:
                surge.kill()
                self.fleet.remove(surge.slot)
            for old in self.terminating:
                self.fleet.haproxy.disable(old.slot)
                old.send(signal.SIGTERM)
                self.fleet.remove(old.slot)
            self.pending, self.terminating = [], []


# -- the report ------------------------------------------------------------------------------------
def p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)] * 1000


def report(rollout: Rollout, load: Load, began: float, ended: float) -> dict:
    results = load.results
    failed = [r for r in results if r[2] != "ok"]
    before = [r[1] for r in results if r[0] < began and r[2] == "ok"]
    during = [r[1] for r in results if began <= r[0] <= ended and r[2] == "ok"]
    seconds = int(max((r[0] for r in results), default=0)) + 1
    timeline = []
    for s in range(seconds):
        here = [r for r in results if s <= r[0] < s + 1]
        timeline.append(
            {
                "t": s,
                "requests": len(here),
                **{kind: sum(1 for r in here if r[2] == kind) for kind in KINDS},
            }
        )
    n = rollout.fleet.numbers
    return {
        "setup": rollout.setup,
        "numbers": {
            "replicas": rollout.fleet.replica_count,
            "max_surge": n.max_surge,
            "prestop_s": rollout.prestop,
            "grace_s": rollout.grace,
            "graceful_timeout_s": rollout.fleet.graceful_timeout or n.graceful_timeout,
            "workers": n.workers,
            "pool_max_size": n.pool_max,
            "propagation_s": PROPAGATION,
            "rate_per_s": load.rate,
            "readiness_period_s": n.readiness.period,
        },
        "requests": len(results),
        "failed": len(failed),
        "failed_by_kind": {kind: sum(1 for r in failed if r[2] == kind) for kind in KINDS},
        "p99_ms_before": round(p99(before) or 0, 1),
        "p99_ms_during": round(p99(during) or 0, 1),
        "rollout_s": [round(began, 2), round(ended, 2)],
        "postgres_connections_max": max((c for _, c in load.pg), default=0),
        "postgres_connections_budget": n.server_pool,
        "stopped": rollout.stopped,
        "migration": rollout.migration,
        "served": {
            field: {
                "count": len(at),
                # to the ms, as the events are: they are compared
                "first_s": round(min(at), 3) if at else None,
                "last_s": round(max(at), 3) if at else None,
            }
            for field in ("name", "display_name")
            for at in [[t for t, f in load.fields if f == field]]
        },
        "events": rollout.events,
        "timeline": timeline,
    }


def last_line(r: dict) -> str:
    return (
        f"rollout: {r['requests']} requests, {r['failed']} failed, "
        f"p99 {r['p99_ms_before']:.1f} ms before, "
        f"{r['p99_ms_during']:.1f} ms during; "
        f"{r['postgres_connections_max']} PostgreSQL connections at most "
        f"(budget {r['postgres_connections_budget']})"
    )


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG
    import matplotlib.pyplot as plt

    t = [row["t"] + 0.5 for row in r["timeline"]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.plot(t, [row["requests"] for row in r["timeline"]], color="#3f51b5", label="requests/s")
    failures = ax.twinx()
    failed = [sum(row[k] for k in KINDS) for row in r["timeline"]]
    failures.bar(
        [row["t"] for row in r["timeline"]],
        failed,
        width=0.9,
        align="edge",
        color="#d32f2f",
        alpha=0.7,
        label="failed/s",
    )
    failures.set_ylabel("failed/s", color="#d32f2f")
    failures.set_ylim(0, max(10, max(failed, default=0) * 1.2))
    marks = {
        "ready": ("#2e7d32", "surge ready"),
        "terminating": ("#ef6c00", "terminating"),
        "out of": ("#616161", "out of the load balancer"),
        "SIGTERM": ("#6a1b9a", "SIGTERM"),
    }
    for event in r["events"]:
        for word, (colour, _) in marks.items():
            if event["event"].startswith(word):
                ax.axvline(event["t"], color=colour, linewidth=0.9, linestyle="--")
    for colour, label in marks.values():
        ax.plot([], [], color=colour, linestyle="--", linewidth=0.9, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"make rollout SETUP={r['setup']}: {r['requests']} requests, {r['failed']} failed")
    handles = ax.get_legend_handles_labels()[0] + failures.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower center", fontsize=7, ncol=6, bbox_to_anchor=(0.5, -0.42))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- make rollout ----------------------------------------------------------------------------------
def rehearse(
    fleet: Fleet,
    setup: str,
    *,
    rate: int = RATE,
    progress_deadline: float | None = None,
    surge_env: dict | None = None,
    baseline: float = BASELINE,
    migrate: bool = False,
    say=say,
    on_event=None,
) -> dict:
    """One rollout on a running fleet, under load; returns the report. `on_event(name, event)` is
    called as each replica event happens, in the thread it happens in."""
    load = Load(fleet.url, fleet.admin_dsn, rate).start()
    rollout = Rollout(
        fleet,
        load,
        setup,
        progress_deadline=progress_deadline,
        surge_env=surge_env,
        say=say,
        on_event=on_event,
    )
    fleet.rollout = rollout  # for an interrupted run to find
    load_began = datetime.datetime.now(datetime.UTC)
    try:
        progress = threading.Thread(target=show_progress, args=(load, say), daemon=True)
        progress.start()
        time.sleep(baseline)
        began = load.now()
        if not migrate or rollout.migrate():
            rollout.run()
        ended = load.now()
        time.sleep(AFTER)
    finally:
        load.stop()
    result = report(rollout, load, began, ended)
    if fleet.prometheus is not None:  # chapter 10 on: what the fleet's own Prometheus counted
        result["prometheus"] = prometheus_saw(fleet, load_began)
    return result


ROUTE = "/users/{id}"  # PATH's route template, as chapter 10 labels it


def prometheus_saw(fleet: Fleet, since: datetime.datetime) -> dict:
    """Requests to ROUTE that Prometheus counted since `since`, once every replica still up has been
    scraped after the load ended. A replica replaced meanwhile is a series that ends: its count is
    its highest value, less what it had counted at `since`. What a replica served after its last
    scrape is in no series, so this can be short of the load's own count, never above it."""
    prometheus = fleet.prometheus
    ended = datetime.datetime.now(datetime.UTC)
    try:
        prometheus.wait_scraped_after(ended)
    except (TimeoutError, FleetError, OSError) as exc:
        return {"error": str(exc)}
    window = max(1, math.ceil((ended - since).total_seconds()))
    series = f'http_requests_total{{job="users",route="{ROUTE}"{{status}}}}'
    at_end, at_start = f"@ {ended.timestamp():.3f}", f"@ {since.timestamp():.3f}"

    def counted(status: str = "") -> int:
        selector = series.replace("{status}", status)
        top = prometheus.value(f"sum(max_over_time({selector}[{window}s] {at_end}))") or 0
        before = prometheus.value(f"sum({selector} {at_start})") or 0
        return round(top - before)

    try:
        return {"requests": counted(), "5xx": counted(',status="5xx"'), "scraped_every_s": SCRAPE}
    except (FleetError, OSError) as exc:
        return {"error": str(exc)}


def prometheus_line(r: dict, load_count: int) -> str:
    seen = r["prometheus"]
    if "error" in seen:
        return f"Prometheus: {seen['error']}"
    missed = load_count - seen["requests"]
    return (
        f"Prometheus counted {seen['requests']} requests to {ROUTE} ({seen['5xx']} 5xx) of the "
        f"{load_count} the load sent"
        + (
            f"; {missed} were served after their replica's last scrape (every "
            f"{seen['scraped_every_s']} s) and are in no series"
            if missed > 0
            else ""
        )
    )


def show_progress(load: Load, say) -> None:
    shown = 0.0
    while not load._stop.is_set():
        time.sleep(2)
        done = list(load.results)
        failed = sum(1 for r in done if r[2] != "ok")
        if load.now() - shown >= 2:
            shown = load.now()
            say(f"{shown:6.1f}s  {len(done)} requests so far, {failed} failed")


def parse(argv: list[str]) -> argparse.Namespace:
    # The docstring's first paragraph, wrapped to 100 columns, joined back into one line.
    description = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="make rollout", description=description)
    parser.add_argument(
        "--setup", choices=("chapter", "article"), default=os.environ.get("SETUP") or "chapter"
    )
    parser.add_argument(
        "--rate", type=int, default=RATE, help="requests per second (default %(default)s)"
    )
    parser.add_argument(
        "--chapter",
        default=os.environ.get("CHAPTER") or CHAPTER,
        help="the chapter to roll out, 07 or later (default %(default)s); a running make fleet's "
        "own chapter wins",
    )
    parser.add_argument(
        "--migrate",
        action="store_true",
        default=os.environ.get("MIGRATE") == "1",
        help="a deploy with its migration: a fleet of the chapter before, the chapter's "
        "migrate.py, then the rollout to the chapter (09 or later)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for <setup>.json and <setup>.png (default .data/rollout/)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    port = int(os.environ.get("PORT", "8080"))
    if int(args.chapter) < int(CHAPTER):
        say(f"make rollout starts at chapter {CHAPTER}: chapter {args.chapter} has no fleet")
        return 1
    why = missing_tools(args.chapter)
    if why:  # before anything starts: one line, nothing to stop
        say(why)
        return 1
    out = args.out or runtime_dir().parent / "rollout"
    graceful = ARTICLE["graceful_timeout"] if args.setup == "article" else None
    fleet = Fleet(runtime_dir(), port=port, chapter=args.chapter, say=say)
    if args.migrate and not (fleet.chapter.folder / "migrate.py").exists():
        say(f"chapter {fleet.chapter.number} has no migrations: MIGRATE=1 starts at 09")
        return 1
    attached = not args.migrate and fleet.adopt()
    if attached:
        say(f"taking over the make fleet running on localhost:{port} (pid {fleet.owner})")
        fleet.graceful_timeout = graceful or fleet.graceful_timeout  # for the replicas it starts
    else:
        fleet = Fleet(
            runtime_dir().parent / f"rollout-fleet-{args.setup}",
            port=port,
            graceful_timeout=graceful,
            chapter=args.chapter,
            migrating=args.migrate,
            say=say,
        )

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if not attached:
            fleet.start()
        n = fleet.numbers
        say(
            f"rollout, setup {args.setup}: {n.replicas} replicas, maxSurge {n.max_surge}, "
            f"preStop {n.prestop if args.setup == 'chapter' else 0} s, "
            f"{args.rate} requests/s through "
            f"localhost:{port}"
        )
        result = rehearse(fleet, args.setup, rate=args.rate, migrate=args.migrate)
    except KeyboardInterrupt:
        if attached and getattr(fleet, "rollout", None):
            fleet.rollout.abandon()
            say("interrupted; the fleet keeps serving, make fleet still owns it")
        else:
            say("interrupted; stopping the fleet")
        return 130
    except FleetError as exc:
        say(str(exc))
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        fleet.stop()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.setup}-migrate" if args.migrate else args.setup
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    chart(result, out / f"{stem}.png")
    if result["failed"]:
        say(
            "failed by kind: "
            + ", ".join(f"{k} {v}" for k, v in result["failed_by_kind"].items() if v)
        )
    if result["stopped"]:
        say(result["stopped"])
    if "prometheus" in result:
        say(prometheus_line(result, result["requests"]))
    say(f"report: {out / (stem + '.json')}, chart: {out / (stem + '.png')}")
    print(last_line(result), flush=True)
    return 1 if result["failed"] or result["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- the chapter page's side-by-side table, from the committed runs --------------------------------
RUNS = chapters.ROOT / "docs" / "rollout"


def side_by_side(folder: Path = RUNS) -> str:
    runs = [json.loads((folder / f"{setup}.json").read_text()) for setup in ("chapter", "article")]
    rows = [
        ("preStop sleep", lambda r: f"{r['numbers']['prestop_s']} s"),
        (
            "graceful_timeout / grace period",
            lambda r: f"{r['numbers']['graceful_timeout_s']} s / {r['numbers']['grace_s']} s",
        ),
        ("requests", lambda r: str(r["requests"])),
        ("failed", lambda r: f"**{r['failed']}**"),
        (
            "failed, by kind",
            lambda r: ", ".join(f"{k} {v}" for k, v in r["failed_by_kind"].items() if v) or "none",
        ),
        ("p99 before the rollout", lambda r: f"{r['p99_ms_before']:.1f} ms"),
        ("p99 during the rollout", lambda r: f"{r['p99_ms_during']:.1f} ms"),
        ("rollout took", lambda r: f"{r['rollout_s'][1] - r['rollout_s'][0]:.1f} s"),
        (
            "PostgreSQL connections at most",
            lambda r: (
                f"{r['postgres_connections_max']} (budget {r['postgres_connections_budget']})"
            ),
        ),
    ]
    lines = ["| | `make rollout` | `make rollout SETUP=article` |", "|---|---|---|"]
    lines += [f"| {name} | {show(runs[0])} | {show(runs[1])} |" for name, show in rows]
    lines += [
        "",
        '```console title="the last line of each run"',
        "$ make rollout",
        last_line(runs[0]),
        "$ make rollout SETUP=article",
        last_line(runs[1]),
        "```",
    ]
    return "\n".join(lines)

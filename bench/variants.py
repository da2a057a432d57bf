"""What is measured: the chapter under Gunicorn, one knob turned at a time, and reference points.

Every Gunicorn variant runs the chapter's own gunicorn.conf.py and names each of the four knobs
explicitly (worker class, access log, JSON encoder, reuse_port), so a variant means the same thing
whatever the chapter currently ships; servers.py says how each knob is applied without editing the
chapter. The variant whose knobs equal the chapter's own is marked "as written" at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

ROOT_PATH = "/"
USERS_PATH = "/users"  # short for GET /users/{random id}


class Knobs(NamedTuple):
    """The four settings a variant turns, as the chapter resolves them (None: not known)."""

    worker: str | None  # "aiohttp" (GunicornWebWorker) or "uvloop" (GunicornUVLoopWebWorker)
    access_log: bool | None
    json: str | None  # "stdlib" or "orjson", where the chapter offers the switch (servers.py)
    reuse_port: bool | None  # Gunicorn's reuse_port: a listening socket per worker


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    # "gunicorn": the chapter; "bare": bench/bare_app.py with the chapter's knobs; "app": chapter
    # 01 under python app.py; "nginx"; "pgbench"
    kind: str
    workers: int = 1
    worker: str | None = None  # "aiohttp" (GunicornWebWorker) or "uvloop" (GunicornUVLoopWebWorker)
    access_log: bool | None = None
    json: str | None = (
        None  # "stdlib" or "orjson", where the chapter offers the switch (servers.py)
    )
    reuse_port: bool | None = None  # Gunicorn's reuse_port: a listening socket per worker
    fast_stop: bool | None = None  # SIGTERM wakes aiohttp's worker at once (servers.SIGTERM_HOOK)
    paths: tuple[str, ...] = (ROOT_PATH, USERS_PATH)
    as_written: bool = False  # its settings are the chapter's own
    # "previous": the chapter before the measured one, with the same settings: what the measured
    # chapter's own additions cost (chapter 10's logs and metrics against chapter 08, say)
    chapter: str | None = None

    @property
    def settings(self) -> dict:
        return {
            "workers": self.workers,
            "worker": self.worker,
            "access_log": self.access_log,
            "json": self.json,
            "reuse_port": self.reuse_port,
            "fast_stop": self.fast_stop,
        }

    @property
    def knobs(self) -> Knobs:
        return Knobs(self.worker, self.access_log, self.json, self.reuse_port)


# The article's setup (aiohttp's own worker, an access log, the stdlib encoder, one listening socket
# shared by every worker, SIGTERM noticed at the worker's once-a-second check) and the recommended
# setup, which is what the last chapter adopted from earlier runs of this benchmark: the uvloop
# worker, no access log, a listening socket per worker, SIGTERM waking the worker at once. Each
# adopted knob is measured by leaving it out of the recommended setup, and each knob the chapter did
# not adopt by adding it: what a knob is worth where it would be used. fast_stop changes nothing but
# the idle stop, so it has no variant of its own.
DEFAULT = dict(worker="aiohttp", access_log=True, json="stdlib", reuse_port=False, fast_stop=False)
TUNED = dict(worker="uvloop", access_log=False, json="stdlib", reuse_port=True, fast_stop=True)

SINGLE = "w1-default"  # one worker, default setup: the single-process figure the targets divide by
DEFAULT_W2 = "w2-default"
TUNED_W2 = "w2-tuned"
TUNED_W1 = "w1-tuned"
CHAPTER_W2 = "w2-chapter"  # only run when the chapter's settings match no other variant
APP = "ch01-run-app"
BARE = "bare-aiohttp"  # the framework's own ceiling with the chapter's worker settings
NGINX_W2 = "nginx-w2"
PREVIOUS_W2 = "w2-previous"  # the chapter before, recommended setup (its own, as written)
# The recommended setup with one knob changed: (key, label, the change)
CHANGES = [
    ("w2-no-uvloop", "recommended, aiohttp's default worker", dict(worker="aiohttp")),
    ("w2-with-log", "recommended, access log on", dict(access_log=True)),
    ("w2-orjson", "recommended plus orjson", dict(json="orjson")),
    ("w2-no-reuseport", "recommended, one shared socket", dict(reuse_port=False)),
]


def full_plan() -> list[Variant]:
    return [
        Variant(SINGLE, "1 worker, default setup", "gunicorn", workers=1, **DEFAULT),
        Variant(DEFAULT_W2, "2 workers, default setup", "gunicorn", workers=2, **DEFAULT),
        Variant(TUNED_W2, "2 workers, recommended setup", "gunicorn", workers=2, **TUNED),
        Variant(TUNED_W1, "1 worker, recommended setup", "gunicorn", workers=1, **TUNED),
        *(
            Variant(key, f"2 workers, {label}", "gunicorn", workers=2, **{**TUNED, **change})
            for key, label, change in CHANGES
        ),
        Variant(
            PREVIOUS_W2,
            "2 workers, the chapter before, recommended setup",
            "gunicorn",
            workers=2,
            **TUNED,
            chapter="previous",
        ),
        Variant(APP, "chapter 01, python app.py", "app", paths=(ROOT_PATH,)),
        # Its workers and knobs are filled in from the chapter by with_chapter_knobs().
        Variant(BARE, "bare aiohttp, fixed bytes", "bare", paths=(ROOT_PATH,)),
        Variant("nginx-w1", "nginx fixed JSON, 1 worker", "nginx", workers=1, paths=(ROOT_PATH,)),
        Variant(NGINX_W2, "nginx fixed JSON, 2 workers", "nginx", workers=2, paths=(ROOT_PATH,)),
        Variant("pgbench", "pgbench, the same SELECT", "pgbench", paths=(USERS_PATH,)),
    ]


def smoke_plan() -> list[Variant]:
    """One short variant for the smoke test: the chapter's own settings, one worker, both paths."""
    return [Variant("w1-smoke", "1 worker, chapter's own settings", "gunicorn", workers=1)]


def with_chapter_knobs(plan: list[Variant], knobs: Knobs, workers: int) -> list[Variant]:
    """Give the bare aiohttp yardstick the chapter's worker count, worker class, access log and
    reuse_port, so the gap to the chapter is the chapter's own code (JSON encoder: none)."""
    return [
        replace(
            v,
            workers=workers,
            worker=knobs.worker,
            access_log=knobs.access_log,
            reuse_port=knobs.reuse_port,
            label=f"{v.label}, {workers} workers as the chapter",
        )
        if v.kind == "bare"
        else v
        for v in plan
    ]


def mark_as_written(plan: list[Variant], knobs: Knobs, workers: int) -> list[Variant]:
    """Mark the variant that runs the chapter exactly as written (its knobs, its default worker
    count); add one when none does, so the chapter as it stands is always measured."""
    found = False
    marked = []
    for v in plan:
        if v.kind == "gunicorn" and v.chapter is None and v.workers == workers and v.knobs == knobs:
            v = replace(v, as_written=True, label=v.label + " = chapter as written")
            found = True
        marked.append(v)
    if not found and None not in knobs:
        marked.insert(
            0,
            Variant(
                CHAPTER_W2,
                f"{workers} workers, chapter as written",
                "gunicorn",
                workers=workers,
                **knobs._asdict(),
                as_written=True,
            ),
        )
    return marked

"""Start what a variant measures, time its start and its idle stop, and never leave it running.

Chapters are never edited. A variant's worker class goes on Gunicorn's command line (-k), and so do
an access log (--access-logfile -) and a socket per worker (--reuse-port). Turning the access
log or reuse_port back off has no flag, so a generated config file runs the chapter's own
gunicorn.conf.py and then overrides the setting. Switching the JSON encoder needs a patched copy
of the chapter in a temporary folder (json_variant below): the copy differs from the chapter by
exactly the lines a reader would change.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import psutil

from tutorial.chapters import Chapter
from tutorial.parts import process

from .variants import Knobs

WORKER_CLASSES = {
    "aiohttp": "aiohttp.GunicornWebWorker",
    "uvloop": "aiohttp.GunicornUVLoopWebWorker",
}

# The encoder for GET /users/{id} in two interchangeable spellings. A chapter "offers" the switch
# when its app.py holds every line of one of them; the other is then made by replacing those lines.
JSON_FORMS = {
    "stdlib": (
        "import json\n",
        "dumps = functools.partial(json.dumps, default=to_json)",
        "web.json_response(dict(row), dumps=dumps)",
    ),
    "orjson": (
        "import json\nimport orjson\n",
        "dumps = functools.partial(orjson.dumps, default=to_json)",
        "web.json_bytes_response(dict(row), dumps=dumps)",
    ),
}


def json_form(app_py: Path) -> str | None:
    text = app_py.read_text()
    found = (name for name, lines in JSON_FORMS.items() if all(line in text for line in lines))
    return next(found, None)


def json_variant(folder: Path, want: str, scratch: Path) -> Path | None:
    """The chapter folder itself if it already uses `want`, a patched copy if it offers the switch,
    None if it does not."""
    have = json_form(folder / "app.py")
    if have is None:
        return None
    if have == want:
        return folder
    copy = scratch / f"{folder.name}-{want}"
    if not copy.exists():
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__"))
        text = (copy / "app.py").read_text()
        for old, new in zip(JSON_FORMS[have], JSON_FORMS[want], strict=True):
            text = text.replace(old, new, 1)
        (copy / "app.py").write_text(text)
    return copy


class ChapterSettings(NamedTuple):
    knobs: Knobs
    workers: int  # the default worker count, without WEB_CONCURRENCY from our environment


def chapter_knobs(chapter: Chapter, env: dict[str, str]) -> ChapterSettings:
    """The chapter's four knobs and its default worker count, as Gunicorn resolves them from its
    gunicorn.conf.py (--print-config)."""
    env = {k: v for k, v in env.items() if k not in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS")}
    done = subprocess.run(
        [*chapter.argv, "--print-config"],
        cwd=chapter.folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    conf = dict(re.findall(r"^(\w+)\s+= ?(.*)$", done.stdout, re.M))
    worker = next(
        (name for name, cls in WORKER_CLASSES.items() if conf.get("worker_class") == cls), None
    )
    access_log = None if "accesslog" not in conf else conf["accesslog"].strip() not in ("", "None")
    reuse_port = None if "reuse_port" not in conf else conf["reuse_port"].strip() == "True"
    knobs = Knobs(worker, access_log, json_form(chapter.folder / "app.py"), reuse_port)
    return ChapterSettings(knobs, int(conf.get("workers", "1")))


# aiohttp's worker takes SIGTERM through Gunicorn's handle_exit, which only clears `alive`: the
# worker sees it at its next once-a-second tick. handle_quit (its SIGINT and SIGQUIT handler) also
# wakes it. The recommended variants route SIGTERM to handle_quit; the default ones put handle_exit
# back, undoing any hook of the chapter's, so their idle stop is the stock one. Either runs the
# chapter's hook first.
SIGTERM_HOOK = """\
_chapter_post_worker_init = globals().get("post_worker_init")


def post_worker_init(worker):
    import signal

    if _chapter_post_worker_init:
        _chapter_post_worker_init(worker)
    worker.loop.add_signal_handler(signal.SIGTERM, worker.{handler}, signal.SIGTERM, None)"""


def gunicorn_argv(folder: Path, chapter: Chapter, variant, scratch: Path) -> list[str]:
    argv = chapter.argv
    if argv[0] != "gunicorn":
        raise SystemExit(
            f"chapter {chapter.name} does not run under Gunicorn (`{chapter.run}`); "
            "pick one that does"
        )
    overrides = []
    if variant.access_log is False:
        overrides.append("accesslog = None  # aiohttp's worker then builds no access logger at all")
    if variant.reuse_port is False:
        overrides.append("reuse_port = False")
    if variant.fast_stop is not None:
        overrides.append(
            SIGTERM_HOOK.format(handler="handle_quit" if variant.fast_stop else "handle_exit")
        )
    if overrides:
        at = argv.index("-c") + 1 if "-c" in argv else None
        conf = folder / (argv[at] if at else "gunicorn.conf.py")
        overlay = scratch / f"{folder.name}-{variant.key}.conf.py"
        overlay.write_text(
            "# Written by bench/servers.py: the chapter's own settings, then the variant's.\n"
            f"_chapter_conf = {str(conf)!r}\n"
            "exec(compile(open(_chapter_conf).read(), _chapter_conf, 'exec'))\n"
            + "".join(line + "\n" for line in overrides)
        )
        argv = (
            [*argv[:at], str(overlay), *argv[at + 1 :]]
            if at
            else [argv[0], "-c", str(overlay), *argv[1:]]
        )
    if variant.worker:
        argv = [*argv, "-k", WORKER_CLASSES[variant.worker]]
    if variant.access_log:
        argv = [*argv, "--access-logfile", "-"]
    if variant.reuse_port:
        argv = [*argv, "--reuse-port"]
    return argv


BARE_APP = Path(__file__).resolve().parent / "bare_app.py"


def bare_argv(variant, port: int) -> tuple[list[str], Path]:
    """bench/bare_app.py under Gunicorn with the variant's workers, worker class, access log and
    reuse_port (the chapter's own, see variants.with_chapter_knobs); no config file at all."""
    argv = [
        "gunicorn",
        "bare_app:create_app",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(variant.workers),
        "-k",
        WORKER_CLASSES[variant.worker or "aiohttp"],
    ]
    if variant.access_log:
        argv += ["--access-logfile", "-"]
    if variant.reuse_port:
        argv += ["--reuse-port"]
    return argv, BARE_APP.parent


NGINX_CONF = """\
# Written by bench/servers.py: a fixed JSON reply, the most an HTTP server does on this machine.
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    # aiohttp never closes a keep-alive connection after N requests either
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{{"message": "Hello from aiohttp"}}';
        }}
    }}
}}
"""


def nginx_argv(workers: int, port: int, scratch: Path) -> tuple[list[str], Path]:
    prefix = scratch / f"nginx-w{workers}"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, prefix=prefix, port=port))
    return [
        shutil.which("nginx") or "nginx",
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
    ], prefix


class Server:
    """A started server: `start_s` is spawn to first 200; `worker_boot_s` is the first Gunicorn
    worker's fork to that answer (None for a single process)."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], port: int):
        self.t0 = time.monotonic()
        self.running = process.Running(argv, cwd, env, port)
        self.url = self.running.url
        self.start_s: float | None = None
        self.worker_boot_s: float | None = None
        self.stop_s: float | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.running.pid

    def wait_healthy(self, path: str, timeout: float = 30.0) -> None:
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if self.running.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.running.proc.args[0]} exited with {self.running.proc.returncode}:\n"
                    f"{self.running.output()[-3000:]}"
                )
            try:
                if process.get(self.url + path, timeout=1)[0] == 200:
                    self.start_s = time.monotonic() - self.t0
                    self.worker_boot_s = self._worker_boot()
                    return
            except OSError:
                pass
            time.sleep(0.005)  # fine enough to time a start against a 0.3 s target
        raise TimeoutError(
            f"{path} did not answer 200 in {timeout}s:\n{self.running.output()[-3000:]}"
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """A chapter with /ready (06 on) may answer /health before its pool is up: wait for
        /ready too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = process.get(self.url + "/ready", timeout=2)[0]
            if code in (200, 404):
                return
            time.sleep(0.02)
        raise TimeoutError(f"/ready did not answer 200 in {timeout}s")

    def _worker_boot(self) -> float | None:
        """From the first worker's fork to the first 200. psutil's create_time() counts from the
        kernel's boot time, which it knows only to the second, so it is never compared with our
        clock: the fork comes as an offset from the master's own create_time() (same base, 10 ms
        ticks), and the master was spawned at self.t0."""
        try:
            master = psutil.Process(self.pid)
            children = master.children()
            if not children:
                return None
            forked = min(c.create_time() for c in children) - master.create_time()
            return round(max(self.start_s - forked, 0.0), 3)
        except (psutil.NoSuchProcess, ValueError):
            return None

    def stop(self) -> None:
        """SIGTERM while idle, timed to the master's exit; then make sure the group is gone."""
        self._closed = True
        try:
            self.running.workers_listening_for_signals()  # not part of the stop being timed
            t0 = time.monotonic()
            self.exit_code = self.running.terminate(timeout=20)
            self.stop_s = time.monotonic() - t0
        finally:
            self.running.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if not getattr(self, "_closed", False):
            self.running.close()

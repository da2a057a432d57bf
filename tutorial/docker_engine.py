"""A Docker engine of our own for the container tests, on a machine with no registry and no bridge.

dockerd runs with its own data and exec roots and no networking of its own (--bridge=none, no
iptables), so nothing it starts can leave loopback: builds use --network=host, containers run with
--network=none and are probed with `docker exec`. The data root lives in a cache folder, so images
(the stand-in base of tutorial/standin.py among them) and the dependency layer survive between runs.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import waiting
from .chapters import ROOT

CACHE = Path(
    os.environ.get("TUTORIAL_DOCKER_ROOT", Path.home() / ".cache" / "aiohttp-tutorial" / "docker")
)


class EngineError(RuntimeError):
    """The engine or an image could not be made ready; the message says why."""


def available() -> str | None:
    """Why this machine cannot run the engine, or None when it can."""
    for tool in ("dockerd", "docker"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (Debian: apt-get install docker.io)"
    if os.geteuid() != 0:
        return "dockerd needs root here (run the tests as root, or in CI)"
    return None


class Engine:
    def __init__(self, data_root: Path = CACHE):
        self.data_root = Path(data_root)
        self.exec_root = Path(
            tempfile.mkdtemp(prefix="dk-")
        )  # short: socket paths have a length limit
        self.socket = self.exec_root / "docker.sock"
        self.log_path = self.exec_root / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self._lock = None
        self._throwaway = False  # a data root of our own, removed at stop(), when the cache is busy

    @property
    def env(self) -> dict[str, str]:
        # The legacy builder: it ships with the engine, where BuildKit needs a buildx plugin.
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}

    def start(self, timeout: float = 60.0) -> Engine:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_root.parent / f"{self.data_root.name}.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another run holds the cache: work in a throw-away root instead
            self.data_root = Path(tempfile.mkdtemp(prefix="docker-root-"))
            self._throwaway = True
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(self.data_root),
                    "--exec-root",
                    str(self.exec_root),
                    "--pidfile",
                    str(self.exec_root / "dockerd.pid"),
                    "--host",
                    f"unix://{self.socket}",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-forward=false",
                    "--ip-masq=false",
                    "--ip6tables=false",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

        def answers() -> bool:
            if self.process.poll() is not None:
                raise EngineError(
                    f"dockerd exited with {self.process.returncode}: {self.log_tail()}"
                )
            return self.socket.exists() and self.run("version", check=False).returncode == 0

        try:
            waiting.until(
                answers,
                timeout=timeout,
                every=0.2,
                waiting_for="dockerd to answer",
                seen=lambda _: self.log_tail(),
            )
        except TimeoutError as exc:
            self.stop()
            raise EngineError(str(exc)) from None
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            ours = self.run(
                "ps", "-aq", "--filter", "label=aiohttp-tutorial", check=False
            ).stdout.split()
            if ours:
                self.run("rm", "-f", *ours, check=False)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        # dockerd can leave its default network namespace bind-mounted under the exec root
        for root in (self.exec_root, *([self.data_root] if self._throwaway else [])):
            _unmount_under(root)
            shutil.rmtree(root, ignore_errors=True)
        if self._lock:
            self._lock.close()
            self._lock = None

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, **kw
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args[:3])} ... failed: {result.stderr.strip()[-2000:]}"
            )
        return result

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- images ----------------------------------------------------------------------------------
    def pull(self, name: str) -> bool:
        """Whether `name` is here, or could be pulled now."""
        if self.has_image(name):
            return True
        try:
            return self.run("pull", "-q", name, check=False, timeout=300).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def build(self, tag: str, context: Path = ROOT, **build_args: str) -> str:
        """Build `context` (host network: the daemon has none of its own) and return the tag."""
        args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
        self.run("build", "--network=host", "-q", "-t", tag, *args, str(context), timeout=900)
        return tag


def dockerfile_arg(name: str, dockerfile: Path = ROOT / "Dockerfile") -> str:
    """The default of `ARG name=...` in the Dockerfile."""
    found = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.M)
    if not found:
        raise EngineError(f"{dockerfile} has no ARG {name} with a default")
    return found.group(1)


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever is still mounted at or below `root`, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    try:
        with open("/proc/self/mounts") as mounts:
            targets = [line.split()[1] for line in mounts]
    except OSError:
        return
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


# -- containers ------------------------------------------------------------------------------------
# Probes run inside the container (it has no network but loopback): status on one line, body after.
_PROBE = """import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""
# Every process in the container: pid, real uid and command line, read from /proc.
_PROCESSES = """import json, os
out = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        uid = next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("Uid:"))
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
    except OSError:
        continue
    out.append([int(pid), int(uid), cmd])
print(json.dumps(out))
"""


_names = itertools.count(1)


class Container:
    def __init__(self, engine: Engine, name: str, port: int):
        self.engine, self.name, self.port = engine, name, port

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        result = self.engine.run(
            "exec",
            self.name,
            "python",
            "-c",
            _PROBE,
            f"http://127.0.0.1:{self.port}{path}",
            str(timeout),
            check=False,
            timeout=timeout + 20,
        )
        if result.returncode != 0:
            raise ConnectionError(
                result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "exec failed"
            )
        status, _, body = result.stdout.partition("\n")
        return int(status), body.strip()

    def wait_until(self, path: str = "/health", status: int = 200, timeout: float = 60.0) -> None:
        def answer() -> tuple[int, str]:
            if self.state()["Status"] != "running":
                raise EngineError(f"{self.name} stopped: {self.state()}\n{self.logs()}")
            return self.get(path, timeout=2)

        waiting.until(
            answer,
            timeout=timeout,
            every=0.2,
            waiting_for=f"{path} to answer {status}",
            done=lambda answered: answered[0] == status,
            retry_on=(ConnectionError,),
            seen=lambda last: f"{last}\n{self.logs()}",
        )

    def processes(self) -> list[tuple[int, int, str]]:
        """Every process but the probe itself: (pid, uid, command line), by pid. Nor `runc init`,
        an exec's bootstrap, root for a moment before it becomes the command: the HEALTHCHECK's
        every 10 s, which a listing at that moment caught."""
        found = json.loads(self.engine.run("exec", self.name, "python", "-c", _PROCESSES).stdout)
        return sorted(
            tuple(p) for p in found if "import json, os" not in p[2] and p[2] != "runc init"
        )

    def logs(self) -> str:
        result = self.engine.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict:
        return json.loads(self.engine.run("inspect", "-f", "{{json .State}}", self.name).stdout)

    def stop(self, timeout: int | None = None) -> tuple[float, int]:
        """`docker stop` as a platform does it; returns (seconds it took, exit code)."""
        began = time.monotonic()
        self.engine.run(
            "stop", *([f"--time={timeout}"] if timeout is not None else []), self.name, timeout=120
        )
        return time.monotonic() - began, self.state()["ExitCode"]

    def remove(self) -> None:
        self.engine.run("rm", "-f", self.name, check=False)


def run_container(
    engine: Engine,
    image: str,
    *command: str,
    port: int = 8080,
    env: dict | None = None,
    mounts: dict | None = None,
    read_only: bool = False,
    entrypoint: str | None = None,
) -> Container:
    """Detached, with no network at all (probes go through `docker exec`), labelled so stop() finds
    it. `read_only` adds --read-only and a tmpfs for /tmp, as a hardened platform runs it."""
    name = f"tutorial-{os.getpid()}-{next(_names)}"
    args = [
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "aiohttp-tutorial",
        "--network=none",
        "-e",
        f"PORT={port}",
    ]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    for source, target in (mounts or {}).items():
        args += ["-v", f"{source}:{target}"]
    if read_only:
        args += ["--read-only", "--tmpfs", "/tmp"]
    engine.run(*args, image, *command)
    return Container(engine, name, port)


def in_parallel(function, items) -> list:
    """function(item) for each item at once (containers start and stop in about a second each, but
    a shell-form one takes the whole stop timeout); results in the items' order."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(function, items))

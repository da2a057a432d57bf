"""The base image the container tests build on: the Dockerfile's own, or a stand-in made here.

The Dockerfile's `ARG BASE_IMAGE` (python:3.12-slim-<release>) is used whenever the engine has it
or can pull it. A CI machine with no registry in reach gets a stand-in instead: Debian minbase of
the same release plus a CPython 3.12, `docker import`ed under a local name and passed to the build
as BASE_IMAGE. To build it, the machine needs:

- root, and `mmdebstrap` (Debian: apt-get install mmdebstrap);
- an apt source for that release: the machine's own `/etc/apt/sources.list.d/debian.sources` or
  `/etc/apt/sources.list` is used as it is, with any `/etc/apt/apt.conf.d/99*` settings (a proxy,
  a mirror) passed along;
- a CPython 3.12 built by pyenv, found under `$PYENV_ROOT/versions/3.12.*` (or `pyenv root`);
- a CA bundle at `/etc/ssl/certs/ca-certificates.crt`, copied in so pip in the image trusts the
  package index the machine trusts.

TUTORIAL_REAL_BASE=1 forbids the stand-in, as on GitHub's runners, which can pull the real one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .docker_engine import Engine, EngineError

STANDIN_REPO = "tutorial-standin/python"
# What the stand-in leaves out of pyenv's tree: the test suite, the static library, GUI modules, and
# .pth files (the build machine's own site hooks have no place in an image).
PYTHON_EXCLUDES = [
    "./lib/python3.*/test",
    "./lib/python3.*/idlelib",
    "./lib/python3.*/tkinter",
    "./lib/python3.*/config-3.*",
    "./lib/python3.*/site-packages/*.pth",
    "*/__pycache__",
]
# Shared libraries pyenv's CPython links against, which minbase does not carry.
STANDIN_PACKAGES = [
    "passwd",
    "libssl3",
    "libffi8",
    "zlib1g",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libreadline8",
    "libncursesw6",
    "libuuid1",
    "netbase",
    "tzdata",
]


def base_image(engine: Engine, wanted: str, allow_standin: bool = True) -> str:
    """`wanted` when it is here or can be pulled; otherwise the stand-in (built once, then
    cached)."""
    if engine.pull(wanted):
        return wanted
    if not allow_standin:
        raise EngineError(f"{wanted} could not be pulled, and a stand-in was not allowed")
    return standin(engine, wanted)


def standin(engine: Engine, wanted: str) -> str:
    """The stand-in for `wanted`, named after what it is made of, so a change makes a new one."""
    python = _pyenv_python()
    key = hashlib.sha1(f"{wanted} {python} {' '.join(STANDIN_PACKAGES)}".encode()).hexdigest()[:10]
    name = f"{STANDIN_REPO}:{wanted.rpartition(':')[2]}-{key}"
    if not engine.has_image(name):
        build_standin(engine, name, python, suite=_suite(wanted))
    return name


def _suite(image: str) -> str:
    for suite in ("trixie", "bookworm"):
        if image.endswith(suite):
            return suite
    return "bookworm"


def _pyenv_python() -> Path:
    root = os.environ.get("PYENV_ROOT") or (
        subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        if shutil.which("pyenv")
        else "~/.pyenv"
    )
    found = sorted(glob.glob(os.path.join(os.path.expanduser(root), "versions", "3.12.*")))
    if not found:
        raise EngineError("no CPython 3.12 under pyenv to build a stand-in base image with")
    return Path(found[-1])


def build_standin(engine: Engine, name: str, python: Path, suite: str) -> None:
    """minbase Debian from the machine's apt sources, pyenv's CPython in /usr/local, the host's
    CAs."""
    if not shutil.which("mmdebstrap"):
        raise EngineError(
            "the base image cannot be pulled and mmdebstrap is missing (apt-get install mmdebstrap)"
        )
    sources = next(
        (
            p
            for p in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]
            if os.path.exists(p)
        ),
        None,
    )
    excludes = " ".join(f"--exclude='{e}'" for e in PYTHON_EXCLUDES)
    hooks = [
        f'tar -C {python} {excludes} -cf - . | tar -C "$1/usr/local" -xf -',
        'cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"',
        # pyenv's RUNPATH points at its own tree; /usr/local/lib is found this way
        'chroot "$1" ldconfig',
        'rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/*',
    ]
    with tempfile.TemporaryDirectory(prefix="standin-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        os.makedirs(Path(tmp), exist_ok=True)
        argv = [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            "--mode=root",
            "--format=tar",
            f"--include={','.join(STANDIN_PACKAGES)}",
            '--setup-hook=mkdir -p "$1/etc/ssl/certs"',
            *[f"--customize-hook={h}" for h in hooks],
        ]
        for conf in sorted(glob.glob("/etc/apt/apt.conf.d/99*")):
            argv.append(f"--aptopt={conf}")
        argv += [suite, str(tarball)] + ([sources] if sources else [])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise EngineError(f"mmdebstrap failed: {result.stderr.strip()[-2000:]}")
        changes = [
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            # pip trusts certifi's list, not the system's; point it at the host's bundle
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            'CMD ["python3"]',
        ]
        engine.run("import", *[f"--change={c}" for c in changes], str(tarball), name, timeout=600)

"""`make lint`'s migration linter: squawk over every chapter's migrations, as CI runs it.

A file migrate.py runs in a transaction is linted with --assume-in-transaction; one marked
`-- migrate: no-transaction` without it, so squawk asks it to be safe to run again. The exit code
is squawk's: an index built without CONCURRENTLY or a missing timeout fails the build, each
finding one line with its rule's name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tutorial import chapters

NO_TRANSACTION = "-- migrate: no-transaction"
SQUAWK = Path(sys.executable).parent / "squawk"


def migrations(root: Path = chapters.ROOT) -> list[Path]:
    """Every migration of every chapter: chapters/*/migrations and chapters/*/contract."""
    return sorted(root.glob("chapters/*/migrations/*.sql")) + sorted(
        root.glob("chapters/*/contract/*.sql")
    )


def lint(files: list[Path]) -> subprocess.CompletedProcess:
    """squawk over `files`, in two runs (in a transaction or not); one result, outputs joined."""
    outputs, code = [], 0
    for in_transaction in (True, False):
        batch = [
            str(f) for f in files if f.read_text().startswith(NO_TRANSACTION) != in_transaction
        ]
        if not batch:
            continue
        flags = ["--assume-in-transaction"] if in_transaction else []
        result = subprocess.run(
            [str(SQUAWK), "--reporter", "gcc", *flags, *batch],
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs.append(result.stdout + result.stderr)
        code = code or result.returncode
    return subprocess.CompletedProcess(["squawk"], code, "".join(outputs), "")


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or migrations()
    result = lint(files)
    sys.stdout.write(result.stdout)
    if result.returncode == 0:
        print(f"squawk: {len(files)} migrations, no findings")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

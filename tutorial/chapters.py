"""The chapter manifest, chapters.toml: the one list every other tool reads."""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "chapters.toml"


@dataclass(frozen=True)
class Chapter:
    number: str
    slug: str
    title: str
    summary: str
    run: str
    adds: tuple[str, ...] = field(default_factory=tuple)
    try_paths: tuple[str, ...] = field(default_factory=tuple)
    location: Path | None = None  # a learner's own folder, for `make check`

    @property
    def name(self) -> str:
        return f"{self.number}-{self.slug}"

    @property
    def folder(self) -> Path:
        return self.location or ROOT / "chapters" / self.name

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.run)

    @property
    def schema(self) -> Path | None:
        """The chapter's schema.sql; a learner's folder without one borrows the reference chapter's."""
        for folder in (self.folder, ROOT / "chapters" / self.name):
            if (folder / "schema.sql").exists():
                return folder / "schema.sql"
        return None

    @property
    def index(self) -> int:
        return int(self.number)


def load() -> list[Chapter]:
    data = tomllib.loads(MANIFEST.read_text(encoding="utf-8"))
    chapters = [
        Chapter(**{**entry, "adds": tuple(entry.get("adds", ())), "try_paths": tuple(entry.get("try_paths", ()))})
        for entry in data["chapter"]
    ]
    return sorted(chapters, key=lambda c: c.index)


def get(number: str | int) -> Chapter:
    """A chapter by number: 2, "2" and "02" all name chapter 02."""
    wanted = int(number)
    for chapter in load():
        if chapter.index == wanted:
            return chapter
    choices = ", ".join(c.number for c in load())
    raise SystemExit(f"There is no chapter {number!r}; choose one of {choices}.")


def latest() -> Chapter:
    return load()[-1]

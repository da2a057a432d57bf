"""The chapter manifest, chapters.toml: the one list every other tool reads."""

from __future__ import annotations

import ast
import json
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

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
        """The chapter's schema.sql; a learner's folder without one borrows the reference
        chapter's."""
        for folder in (self.folder, ROOT / "chapters" / self.name):
            if (folder / "schema.sql").exists():
                return folder / "schema.sql"
        return None

    @property
    def index(self) -> int:
        return int(self.number)

    # -- the naming rules: every tool asks the chapter, none works them out itself --------------
    @property
    def test_module(self) -> Path:
        """tests/test_NN_<slug, with underscores>.py: the tests of what this chapter introduces."""
        return ROOT / "tests" / f"test_{self.number}_{self.slug.replace('-', '_')}.py"

    @property
    def previous(self) -> Chapter | None:
        """The chapter before this one in chapters.toml; None for the first."""
        earlier = [c for c in load() if c.index < self.index]
        return earlier[-1] if earlier else None

    @property
    def next(self) -> Chapter | None:
        """The chapter after this one in chapters.toml; None for the last."""
        later = [c for c in load() if c.index > self.index]
        return later[0] if later else None

    @property
    def before_migrations(self) -> Chapter | None:
        """The last chapter before this one whose schema is schema.sql alone (08): the code and
        schema a deploy that brings the migrations starts from. None from a chapter before it."""
        earlier = [
            c for c in load() if c.index < self.index and not (c.folder / "migrations").is_dir()
        ]
        return earlier[-1] if earlier and (self.folder / "migrations").is_dir() else None

    def code(self, name: str) -> str | None:
        """What one of this chapter's files does, or its run command (name "run"): a Python
        file's syntax tree without docstrings (comments never reach it), another file's text;
        None when the chapter has no such file. Prose that changes leaves the code alone."""
        if name == "run":
            return self.run
        path = self.folder / name
        if not path.exists():
            return None
        if path.suffix != ".py":
            return path.read_text(encoding="utf-8")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and _is_docstring(body[0]):
                node.body = body[1:] or [ast.Pass()]
        return ast.dump(tree)

    def changes(self, names: tuple[str, ...], before: Chapter | None = None) -> bool:
        """Whether this chapter's code for any of `names` differs from `before`'s (the previous
        chapter's by default). A name may be a glob ("*.py", "migrations/*"), matched in both
        folders; "!name" leaves a file out of the globs before it."""
        before = before or self.previous
        if before is None:
            return True
        chosen: set[str] = set()
        for name in names:
            if name.startswith("!"):
                chosen.discard(name[1:])
            elif any(sign in name for sign in "*?["):
                chosen |= {
                    path.relative_to(chapter.folder).as_posix()
                    for chapter in (self, before)
                    for path in chapter.folder.glob(name)
                    if path.is_file()
                }
            else:
                chosen.add(name)
        return any(self.code(n) != before.code(n) for n in sorted(chosen))


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


_loaded: tuple[int, tuple[Chapter, ...]] | None = None


def load() -> list[Chapter]:
    """Every chapter, in order. The file is read once, and again only after it changes (`make docs`
    rebuilds the site while chapters.toml is being edited)."""
    global _loaded
    stamp = MANIFEST.stat().st_mtime_ns
    if _loaded is None or _loaded[0] != stamp:
        data = tomllib.loads(MANIFEST.read_text(encoding="utf-8"))
        chapters = [
            Chapter(
                **{
                    **entry,
                    "adds": tuple(entry.get("adds", ())),
                    "try_paths": tuple(entry.get("try_paths", ())),
                }
            )
            for entry in data["chapter"]
        ]
        _loaded = stamp, tuple(sorted(chapters, key=lambda c: c.index))
    return list(_loaded[1])


def for_test_module(name: str) -> Chapter | None:
    """The chapter whose test module is `name` ("test_02_database_pool"), if any."""
    return next((c for c in load() if c.test_module.stem == name), None)


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


def matrix() -> dict:
    """The GitHub workflow's job matrix: one entry per chapter, with its folder and test module."""
    return {
        "include": [
            {"chapter": c.name, "number": c.number, "tests": str(c.test_module.relative_to(ROOT))}
            for c in load()
        ]
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--matrix"]:
        raise SystemExit("usage: python -m tutorial.chapters --matrix")
    print(json.dumps(matrix()))

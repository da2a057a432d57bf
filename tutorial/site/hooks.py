"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the site that are generated, never typed.

chapters.toml gives the navigation, each chapter's command, what it adds and its neighbours; the
chapter folders give the diff between consecutive chapters; tests/ gives the tests that check
each chapter and each erratum, and a generated page per test module that those links point to. A
page asks for one of these with a marker on a line of its own, such as `<!-- tutorial:diff -->`
(it may be indented, inside an admonition); everything else on a page is prose.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

# MkDocs loads this file by its path, outside any package: make `tutorial` importable from
# whichever folder mkdocs was started in.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tutorial import chapters as manifest  # noqa: E402

# A logger under "mkdocs." so that a warning here fails `mkdocs build --strict`.
log = logging.getLogger("mkdocs.hooks.tutorial")

# A marker may be indented (inside an admonition); what it expands to gets the same indentation.
MARKER = re.compile(
    r"^(?P<indent>[ \t]*)<!-- tutorial:(?P<name>[a-z]+)(?P<args>(?: [^\s>]+)*) -->$", re.MULTILINE
)
CHAPTER_PAGE = re.compile(r"^chapters/(?P<number>\d\d)-[a-z0-9-]+\.md$")
# A snippet section marker in a diff would be taken by pymdownx.snippets as its own syntax and
# dropped; a `;` in front makes it literal text (the extension removes the `;`).
SECTION_MARKER = re.compile(r"(?<!;)(-+8<-+[ \t]+\[)")
SKIPPED = {"__pycache__", ".pytest_cache"}
TESTS = ROOT / "tests"
# Written by another part of the project (bench/); listed only once it exists.
OPTIONAL_PAGES = [("How fast is it", "performance.md")]

DOCS = ROOT / "docs"  # replaced by the configured docs_dir in on_config


def page_path(chapter: manifest.Chapter) -> str:
    return f"chapters/{chapter.name}.md"


def has_page(chapter: manifest.Chapter) -> bool:
    """Links go only to pages that exist, so `make docs` keeps working while a page is being
    written."""
    return (DOCS / page_path(chapter)).exists()


def up(src: str) -> str:
    """The relative prefix from a page back to the top of docs/."""
    return "../" * src.count("/")


# -- navigation ------------------------------------------------------------------------------------
def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    """The navigation comes from chapters.toml, so a chapter is listed exactly when it exists."""
    global DOCS
    DOCS = docs = Path(config["docs_dir"])
    listed = []
    for chapter in manifest.load():
        if has_page(chapter):
            listed.append({f"{chapter.number} · {chapter.title}": page_path(chapter)})
        else:
            log.warning(
                "chapters.toml lists chapter %s but docs/%s does not exist; write that page "
                "(docs/chapters/01-minimal-app.md shows the shape)",
                chapter.number,
                page_path(chapter),
            )
    known = {page_path(c) for c in manifest.load()}
    for page in sorted((docs / "chapters").glob("*.md")):
        if f"chapters/{page.name}" not in known:
            log.warning("docs/chapters/%s names no chapter in chapters.toml", page.name)
    # pymdownx.snippets reads base_path from the current folder; anchor it to mkdocs.yml instead, so
    # `mkdocs build -f path/to/mkdocs.yml` works from anywhere.
    snippets = config["mdx_configs"].get("pymdownx.snippets", {})
    here = Path(config["config_file_path"]).parent
    snippets["base_path"] = [str(here / p) for p in snippets.get("base_path", ["."])]
    nav = [
        {"Introduction": "index.md"},
        {"Chapters": listed},
        {"Where the article is wrong": "errata.md"},
    ]
    nav += [{title: path} for title, path in OPTIONAL_PAGES if (docs / path).exists()]
    nav.append({"Reference": "reference.md"})
    config["nav"] = nav
    return config


# -- one generated page per test module, so every "proof" link lands on the test's own code --------
def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    from mkdocs.structure.files import File, InclusionLevel

    for module in sorted(TESTS.glob("test_*.py")):
        # Reached through the links on chapter pages and the errata page, not from the navigation.
        files.append(
            File.generated(
                config,
                test_page(module.name),
                content=render_test_module(module),
                inclusion=InclusionLevel.NOT_IN_NAV,
            )
        )
    return files


def test_page(module: str) -> str:
    return f"tests/{module.removesuffix('.py')}.md"


def render_test_module(module: Path) -> str:
    source = module.read_text(encoding="utf-8")
    tree = ast.parse(source)
    parts = [
        f"# `tests/{module.name}`",
        "",
        "This page is generated from the test module when the site is built, "
        "so it always shows the "
        "code that `make test` runs.",
        "",
    ]
    doc = ast.get_docstring(tree)
    if doc:
        parts += [doc, ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
            "test_"
        ):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            code = "\n".join(source.splitlines()[first - 1 : node.end_lineno])
            parts += [f"## `{node.name}` {{ #{node.name} }}", "", fenced(code, "python"), ""]
    return "\n".join(parts)


def test_link(module: str, name: str, src: str) -> str:
    return f"[`{name}`]({up(src)}{test_page(module)}#{name})"


# -- markers ---------------------------------------------------------------------------------------
def on_page_markdown(
    markdown: str, page: Page, config: MkDocsConfig, files: Files, **kwargs: Any
) -> str:
    src = page.file.src_uri
    found = CHAPTER_PAGE.match(src)
    chapter = manifest.get(found.group("number")) if found else None

    def expand(match: re.Match) -> str:
        name, args, indent = match.group("name"), match.group("args").split(), match.group("indent")
        if name in CHAPTER_MARKERS:
            if chapter is None:
                log.warning("%s: <!-- tutorial:%s --> only works on a chapter page", src, name)
                return ""
            text = CHAPTER_MARKERS[name](chapter)
        elif name in SITE_MARKERS:
            text = SITE_MARKERS[name](args, src)
        else:
            log.warning("%s: unknown marker <!-- tutorial:%s -->", src, name)
            return ""
        return "\n".join(indent + line if line else line for line in text.splitlines())

    return MARKER.sub(expand, markdown)


def fenced(body: str, lang: str, title: str | None = None) -> str:
    """A fenced block longer than any run of backticks inside it, so the body cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    head = f'{fence}{lang} title="{title}"' if title else f"{fence}{lang}"
    return f"{head}\n{body.rstrip(chr(10))}\n{fence}"  # a final blank context line stays


def adds(chapter: manifest.Chapter) -> str:
    return "\n".join(f"- {item}" for item in chapter.adds)


def run(chapter: manifest.Chapter) -> str:
    by_hand = fenced(
        f"cd chapters/{chapter.name}\n{chapter.run}",
        "console",
        "or by hand, against a database of your own (DATABASE_URL)"
        if chapter.schema
        else "or by hand",
    )
    with_make = fenced(f"make run CHAPTER={chapter.number}", "console", "from the repository root")
    return f"{with_make}\n\n{by_hand}"


def neighbours(chapter: manifest.Chapter) -> str:
    before, after = chapter.previous, chapter.next
    parts = []
    if before:
        parts.append(f"Previous: [{before.number} · {before.title}]({before.name}.md)")
    else:
        parts.append("Previous: [Introduction](../index.md)")
    if after and has_page(after):
        parts.append(f"Next: [{after.number} · {after.title}]({after.name}.md)")
    else:
        parts.append("Next: [Where the article is wrong](../errata.md)")
    return " · ".join(parts)


# -- tests, read from their source -----------------------------------------------------------------
def test_functions(path: Path) -> list[tuple[str, str]]:
    """(name, first docstring line) of every top-level test function in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
            "test_"
        ):
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            found.append((node.name, doc[0] if doc else ""))
    return found


def tests(chapter: manifest.Chapter) -> str:
    src = page_path(chapter)
    module = chapter.test_module
    earlier = [c for c in manifest.load() if c.index < chapter.index and c.test_module.exists()]
    lines = []
    if module.exists():
        lines += [f"`tests/{module.name}` checks what this chapter introduces:", ""]
        lines += [
            f"- {test_link(module.name, name, src)}" + (f": {doc}" if doc else "")
            for name, doc in test_functions(module)
        ]
    else:
        # Not a build warning: a chapter's tests may land after its code. The page says so plainly.
        lines += [f"This chapter has no test module of its own yet (`tests/{module.name}`)."]
    if earlier:
        lines += [
            "",
            "Tests are cumulative: `make check` runs the tests of every earlier chapter against "
            "this folder too ("
            + ", ".join(
                f"[`{c.test_module.name}`]({up(src)}{test_page(c.test_module.name)})"
                for c in earlier
            )
            + "); `make test` runs them here when this is the last chapter or when it changes "
            "the code they run from.",
        ]
    lines += [
        "",
        "To run this chapter's tests against a folder you wrote yourself:",
        "",
        fenced(f"make check CHAPTER={chapter.number} DIR=path/to/your/folder", "console"),
    ]
    return "\n".join(lines)


def find_test(ref: str) -> tuple[str, str, str] | None:
    """`test_module.py::test_name` -> (module, name, first docstring line), when that test
    exists."""
    module, _, name = ref.partition("::")
    path = TESTS / module
    if not path.exists():
        return None
    for found, doc in test_functions(path):
        if found == name:
            return module, name, doc
    return None


def proofs(number: int, refs: list[str], src: str) -> list[tuple[str, str, str]]:
    """The tests named test_erratum_NN_* anywhere under tests/, then the ones a page names
    itself."""
    prefix = f"test_erratum_{number:02d}_"
    found = [
        (module.name, name, doc)
        for module in sorted(TESTS.glob("test_*.py"))
        for name, doc in test_functions(module)
        if name.startswith(prefix)
    ]
    for ref in refs:
        test = find_test(ref)
        if test is None:
            log.warning("%s: erratum %d names the test %s, which does not exist", src, number, ref)
        elif test not in found:
            found.append(test)
    return found


def proof(args: list[str], src: str) -> str:
    """`<!-- tutorial:proof N [module.py::test ...] -->`: the tests that prove erratum N.

    On the errata page: a list with each test's first docstring line. Elsewhere (an admonition on a
    chapter page): one line of links.
    """
    if not args or not args[0].isdigit():
        log.warning("%s: <!-- tutorial:proof N --> needs an erratum number", src)
        return ""
    number = int(args[0])
    found = proofs(number, args[1:], src)
    if not found:
        # Not a build warning: tests/test_docs.py fails until every erratum has a test.
        return f"**Proof:** no test for erratum {number} exists yet."
    if src == "errata.md":
        return "\n".join(
            ["**The proof:**", ""]
            + [
                f"- {test_link(module, name, src)} in `tests/{module}`"
                + (f": {doc}" if doc else "")
                for module, name, doc in found
            ]
        )
    return "Proven by " + ", ".join(test_link(module, name, src) for module, name, _ in found) + "."


# -- the diff between consecutive chapters ---------------------------------------------------------
def chapter_files(folder: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not SKIPPED.intersection(p.parts) and p.suffix != ".pyc"
    }


def text_lines(path: Path | None) -> list[str] | None:
    if path is None:
        return []
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None  # a binary file: named in the summary, never shown


def unified(
    old: Path | None, new: Path | None, a: list[str], b: list[str], old_label: str, new_label: str
) -> list[str]:
    """The unified diff a reader gets from `diff -u` (GNU diffutils) when it is installed, so the
    page shows exactly what running diff on the two folders shows; difflib's otherwise (its hunks
    can differ from diff's in layout, never in what they change)."""
    tool = shutil.which("diff")
    if tool:
        result = subprocess.run(
            [
                tool,
                "-u",
                "--label",
                old_label,
                "--label",
                new_label,
                str(old or os.devnull),
                str(new or os.devnull),
            ],
            capture_output=True,
            text=True,
            encoding="utf-8",
        )
        if result.returncode in (0, 1):
            return result.stdout.splitlines(keepends=True)
    return list(difflib.unified_diff(a, b, old_label, new_label))


def diff(chapter: manifest.Chapter) -> str:
    before = chapter.previous
    if before is None:
        return "## What changed\n\nThis is the first chapter: there is nothing to compare it with."
    old, new = chapter_files(before.folder), chapter_files(chapter.folder)
    blocks, summary = [], []
    for rel in sorted(old.keys() | new.keys()):
        a, b = text_lines(old.get(rel)), text_lines(new.get(rel))
        if a is None or b is None:
            summary.append(f"`{rel}` (binary, changed)" if a != b else None)
            continue
        if a == b:
            continue
        lines = unified(
            old.get(rel),
            new.get(rel),
            a,
            b,
            f"chapters/{before.name}/{rel}" if rel in old else "/dev/null",
            f"chapters/{chapter.name}/{rel}" if rel in new else "/dev/null",
        )
        added = sum(1 for line in lines[2:] if line.startswith("+"))
        removed = sum(1 for line in lines[2:] if line.startswith("-"))
        state = "new" if rel not in old else "removed" if rel not in new else f"+{added} −{removed}"
        summary.append(f"`{rel}` ({state})")
        body = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        blocks.append(fenced(SECTION_MARKER.sub(r";\1", body), "diff", rel))
    summary = [s for s in summary if s]
    heading = f"## What changed since chapter {before.number}"
    if not blocks:
        log.warning("chapter %s is identical to chapter %s", chapter.number, before.number)
        return f"{heading}\n\nNothing changed."
    head = (
        f"{heading}\n\nGenerated from `chapters/{before.name}/` and `chapters/{chapter.name}/` "
        "when the site was "
        f"built. Files changed: {', '.join(summary)}."
    )
    return "\n\n".join([head, *blocks])


# -- lists for the introduction and the reference --------------------------------------------------
def chapter_table(args: list[str], src: str) -> str:
    rows = ["| | Chapter | What it adds | Command |", "|---|---|---|---|"]
    for c in manifest.load():
        title = f"[{c.title}]({up(src)}{page_path(c)})" if has_page(c) else c.title
        rows.append(f"| {c.number} | {title} | {c.summary} | `{c.run}` |")
    return "\n".join(rows)


def commands(args: list[str], src: str) -> str:
    rows = [
        "| Chapter | Folder | Command (run inside the folder) | Or from the root |",
        "|---|---|---|---|",
    ]
    for c in manifest.load():
        rows.append(
            f"| {c.number} | `chapters/{c.name}/` | `{c.run}` | `make run CHAPTER={c.number}` |"
        )
    return "\n".join(rows)


def versions(args: list[str], src: str) -> str:
    """The pins in requirements.txt, so the errata always name the versions they were checked
    with."""
    pins = [
        line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    return (
        ", ".join(
            f"{name} {version}"
            for name, _, version in (pin.partition("==") for pin in pins if "==" in pin)
        )
        + "."
    )


CHAPTER_MARKERS = {"adds": adds, "run": run, "tests": tests, "diff": diff, "neighbours": neighbours}
SITE_MARKERS = {
    "chapters": chapter_table,
    "commands": commands,
    "proof": proof,
    "versions": versions,
}


# -- chapter 07's budget table, from its manifests and configs (tutorial/fleet/budget.py) ----------------
def budget_table(args: list[str], src: str) -> str:
    from tutorial.fleet import budget

    return budget.table()


SITE_MARKERS["budget"] = budget_table


def rollout_table(args: list[str], src: str) -> str:
    from tutorial.fleet import rollout

    return rollout.side_by_side()


SITE_MARKERS["rollout"] = rollout_table

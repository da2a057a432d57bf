"""The tutorial site, as source and as built HTML: every chapter has its page, every piece of code
on a chapter page comes from the chapter's files, every diff is the real diff, every answer shown is
real.

The site is built once per session by the `built_site` fixture (conftest.py); tests/test_site.py
opens the same build in a browser.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import missing

from tutorial import chapters as manifest
from tutorial.parts import process

ROOT = manifest.ROOT
DOCS = ROOT / "docs"
CHAPTERS = manifest.load()
ERRATA = range(1, 15)  # docs/errata.md lists fourteen
# The only blocks a chapter page may type by hand: shell sessions (commands, curl lines and
# answers).
TYPED = {"console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)(?P<attrs>[^\n`]*)$")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[a-z][-_0-9a-z]*))?"$')
TITLE = re.compile(r'title="(?P<title>[^"]*)"')


def page_source(chapter: manifest.Chapter) -> Path:
    return DOCS / "chapters" / f"{chapter.name}.md"


def page_url(chapter: manifest.Chapter) -> str:
    return f"chapters/{chapter.name}/"


def code_blocks(markdown: str) -> list[dict]:
    """Every fenced block of a markdown source: language, title and body lines."""
    blocks, current = [], None
    for line in markdown.splitlines():
        found = FENCE.match(line)
        if current is None and found:
            title = TITLE.search(found.group("attrs"))
            current = {
                "fence": found.group("fence"),
                "indent": found.group("indent"),
                "lang": found.group("lang"),
                "title": title.group("title") if title else None,
                "body": [],
            }
        elif current is not None and line.strip() == current["fence"]:
            blocks.append(current)
            current = None
        elif current is not None:
            body_line = (
                line[len(current["indent"]) :] if line.startswith(current["indent"]) else line
            )
            current["body"].append(body_line)
    assert current is None, f"an unclosed code block: {current}"
    return blocks


def includes(markdown: str) -> list[tuple[str, str | None]]:
    """(path, section) of every snippet include in fenced blocks."""
    found = []
    for block in code_blocks(markdown):
        for line in block["body"]:
            match = INCLUDE.match(line.strip())
            if match:
                found.append((match.group("path"), match.group("section")))
    return found


def resolve(path: str) -> Path | None:
    """Where pymdownx.snippets finds a path: chapters/ first, then the repository root."""
    for base in (ROOT / "chapters", ROOT):
        if (base / path).is_file():
            return base / path
    return None


def rendered_blocks(page_html: str, lang: str) -> list[tuple[str, str]]:
    """(title, text) of each highlighted block of a language, as the reader sees it."""
    pattern = re.compile(
        rf'<div class="language-{lang} highlight">'
        r'(?:<span class="filename">(?P<title>[^<]*)</span>)?'
        r"<pre>.*?<code>(?P<code>.*?)</code></pre>",
        re.S,
    )
    return [
        (
            html.unescape(m.group("title") or ""),
            html.unescape(re.sub(r"<[^>]+>", "", m.group("code"))),
        )
        for m in pattern.finditer(page_html)
    ]


# -- the build -------------------------------------------------------------------------------------
def test_strict_build_passes_without_a_warning(built_site):
    """`mkdocs build --strict` exits 0 and prints no WARNING: every include, link and anchor
    resolves."""
    assert built_site.returncode == 0, built_site.output
    assert "WARNING" not in built_site.output, built_site.output
    assert (built_site.path / "index.html").exists()


# -- pages and navigation --------------------------------------------------------------------------
def test_every_chapter_has_a_page_and_a_nav_entry_in_order(built_site):
    """chapters.toml's chapters each have docs/chapters/NN-slug.md and a link in the navigation, in
    order."""
    nav = built_site.page("")
    for chapter in CHAPTERS:
        assert page_source(chapter).exists(), f"docs/chapters/{chapter.name}.md is missing"
    positions = [nav.find(f'href="{page_url(chapter)}"') for chapter in CHAPTERS]
    assert -1 not in positions, dict(zip([c.name for c in CHAPTERS], positions, strict=True))
    assert positions == sorted(positions), "the navigation lists the chapters out of order"
    for chapter in CHAPTERS:
        assert f"{chapter.number} · {chapter.title}" in html.unescape(nav)


def test_every_chapter_page_names_a_chapter_that_exists():
    """No page under docs/chapters/ outlives its chapter: each one's name is a chapter in
    chapters.toml and its folder exists."""
    known = {chapter.name: chapter for chapter in CHAPTERS}
    pages = sorted((DOCS / "chapters").glob("*.md"))
    assert pages
    for page in pages:
        assert page.stem in known, f"docs/chapters/{page.name} names no chapter in chapters.toml"
        assert known[page.stem].folder.is_dir()
        assert page.read_text().startswith(
            f"# {known[page.stem].number} · {known[page.stem].title}\n"
        )


def test_chapter_pages_link_their_neighbours(built_site):
    """Each chapter page links to the previous and the next chapter (the first to the introduction,
    the last to the errata)."""
    for at, chapter in enumerate(CHAPTERS):
        page = built_site.page(page_url(chapter))
        before = f'href="../{CHAPTERS[at - 1].name}/"' if at else 'href="../../"'
        after = (
            f'href="../{CHAPTERS[at + 1].name}/"'
            if at + 1 < len(CHAPTERS)
            else 'href="../../errata/"'
        )
        [links] = re.findall(r"<p>Previous: (.*?)</p>", page, re.S)
        assert before in links and after in links, f"{chapter.name}: {links}"


def test_performance_page_is_listed_exactly_when_it_exists(built_site):
    """docs/performance.md (written with the benchmark) gets its nav entry once it exists, never
    before."""
    nav = built_site.page("")
    assert ('href="performance/"' in nav) == (DOCS / "performance.md").exists()
    assert ("How fast is it" in nav) == (DOCS / "performance.md").exists()


# -- code on chapter pages comes from the chapters -------------------------------------------------
@pytest.mark.parametrize("page_of", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_code_on_a_chapter_page_is_included_from_its_files(page_of):
    """Every block that is not a shell session is a snippet include of the chapter's own folder (or
    a file at the repository root, such as the Dockerfile), titled with the file's path."""
    chapter = page_of
    blocks = code_blocks(page_source(chapter).read_text())
    shown = 0
    for block in blocks:
        if block["lang"] in TYPED:
            continue
        body = [line for line in block["body"] if line.strip()]
        where = f"{chapter.name}.md, a {block['lang'] or 'plain'} block titled {block['title']!r}"
        assert block["lang"], f"{where}: every block names its language"
        assert len(body) == 1 and INCLUDE.match(body[0].strip()), (
            f"{where} is typed, not included:\n" + "\n".join(body)
        )
        path = INCLUDE.match(body[0].strip()).group("path")
        assert path.startswith(f"{chapter.name}/") or "/" not in path, (
            f"{where} includes {path}, not this chapter's"
        )
        assert resolve(path), f"{where}: {path} does not exist"
        assert block["title"] == (f"chapters/{path}" if "/" in path else path), (
            f"{where}: title is not the file"
        )
        shown += 1
    assert shown, f"{chapter.name}.md shows no code from its chapter"


def test_every_included_file_and_section_exists():
    """Each `--8<-- "file:section"` on any page names a file that exists and a section it marks."""
    seen = 0
    for page in sorted(DOCS.rglob("*.md")):
        for path, section in includes(page.read_text()):
            seen += 1
            found = resolve(path)
            assert found, f"{page.relative_to(ROOT)}: {path} does not exist"
            if section:
                text = found.read_text()
                for kind in ("start", "end"):
                    assert f"--8<-- [{kind}:{section}]" in text, (
                        f"{page.relative_to(ROOT)}: {path} has no [{kind}:{section}] marker"
                    )
    assert seen >= len(CHAPTERS)


@pytest.mark.parametrize("page_of", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_included_code_reaches_the_page(built_site, page_of):
    """The built page holds each included section, with the snippet markers stripped."""
    chapter = page_of
    page = built_site.page(page_url(chapter))
    rendered = "\n".join(
        text
        for lang in ("python", "sql", "dockerfile", "text", "toml", "ini", "yaml")
        for _, text in rendered_blocks(page, lang)
    )
    for path, section in includes(page_source(chapter).read_text()):
        text = resolve(path).read_text()
        if section:
            text = text.split(f"--8<-- [start:{section}]\n", 1)[1].split(
                f"--8<-- [end:{section}]", 1
            )[0]
            # The `# ` before the end marker goes; snippets dedents a section (mkdocs.yml).
            text = textwrap.dedent(text.rsplit("\n", 1)[0])
        for line in text.splitlines():
            if line.strip() and "--8<--" not in line:
                assert line in rendered, (
                    f"{chapter.name}: {path}:{section or ''} line {line!r} is not on the page"
                )


# -- the diff is generated, and matches diff(1) ----------------------------------------------------
def folder_diff(old: manifest.Chapter, new: manifest.Chapter) -> dict[str, list[str]]:
    """`diff -ruN` of two chapter folders, per file, from the first hunk on."""
    tool = shutil.which("diff")
    if not tool:
        missing("diff", "install GNU diffutils")
    result = subprocess.run(
        [tool, "-ruN", "-x", "__pycache__", "-x", "*.pyc", ".", str(new.folder)],
        cwd=old.folder,
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 1), result.stderr
    files: dict[str, list[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        if line.startswith("diff -ruN"):
            current = None
        elif line.startswith("--- ") and current is None:
            current = line[4:].split("\t")[0].removeprefix("./")
            files[current] = []
        elif line.startswith("+++ ") and files.get(current) == []:
            continue
        elif current is not None:
            files[current].append(line)
    return files


@pytest.mark.parametrize("page_of", CHAPTERS[1:], ids=[c.name for c in CHAPTERS[1:]])
def test_diff_on_the_page_is_diff_of_the_two_folders(built_site, page_of):
    """'What changed since chapter N-1' shows, file by file, exactly the hunks `diff -ruN` prints
    for the two chapter folders, and names the two folders."""
    chapter = page_of
    before = chapter.previous
    page = built_site.page(page_url(chapter))
    shown = {}
    for title, text in rendered_blocks(page, "diff"):
        lines = text.rstrip("\n").splitlines()
        assert lines[0] in (f"--- chapters/{before.name}/{title}", "--- /dev/null"), lines[0]
        assert lines[1] in (f"+++ chapters/{chapter.name}/{title}", "+++ /dev/null"), lines[1]
        shown[title] = [line.rstrip() for line in lines[2:]]
    expected = folder_diff(before, chapter)
    assert expected, f"{chapter.name} is identical to {before.name}"
    assert sorted(shown) == sorted(expected)
    for name in expected:
        # Markdown empties a line of spaces, so a blank context line (" ") reads as "" on the page,
        # and a code block cannot end in a blank line: a trailing blank context line is not shown.
        wanted = [line.rstrip() for line in expected[name]]
        while wanted and wanted[-1] == "":
            wanted.pop()
        assert shown[name] == wanted, f"{name}: the page's diff differs from diff -ruN"
    assert f"What changed since chapter {before.number}" in page


# -- what the page says the chapter answers is what it answers -------------------------------------
CURL = re.compile(r"^\$ curl -s localhost:8080(?P<path>/\S*)$")


def curl_answers(chapter: manifest.Chapter, title: str | None) -> list[tuple[str, str]]:
    """(path, answer) for each `$ curl -s localhost:8080/path` line in the page's console blocks
    with this title."""
    found = []
    for block in code_blocks(page_source(chapter).read_text()):
        if block["lang"] != "console" or block["title"] != title:
            continue
        lines = block["body"]
        for at, line in enumerate(lines):
            match = CURL.match(line)
            if match:
                found.append((match.group("path"), lines[at + 1]))
    return found


def test_curl_answers_on_chapter_pages_are_real(chapter, served):
    """Every `curl` line under "Try it" is sent to the chapter, started with its documented command,
    and the answer printed on the page is the body it really returns, byte for byte. A block titled
    "without a database" is checked against the chapter started with a database that refuses
    connections."""
    shown = curl_answers(chapter, None)
    assert shown, f"{chapter.name}.md has no curl lines to try"
    for path, answer in shown:
        status, body = process.get(served.url + path)
        assert body.decode() == answer, f"{chapter.name}: GET {path} answered {status} {body!r}"
    offline = curl_answers(chapter, "without a database")
    if offline:
        port = process.free_port()
        running = process.start(
            chapter,
            port=port,
            database_url=f"postgresql://postgres@127.0.0.1:{process.free_port()}/postgres",
            WEB_CONCURRENCY="1",
        )
        try:
            running.wait_until("/health")
            for path, answer in offline:
                status, body = process.get(running.url + path)
                assert body.decode() == answer, (
                    f"{chapter.name} without a database: GET {path} answered {body!r}"
                )
            assert running.terminate() == 0, running.output()
        finally:
            running.close()


# -- the errata, and the admonitions that point at them --------------------------------------------
def test_every_erratum_has_a_section_with_links_to_its_tests(built_site):
    """The errata page has a section per erratum, each with at least one link to a test that
    exists."""
    page = built_site.page("errata/")
    tests = {p.stem: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    for number in ERRATA:
        start = page.find(f'id="erratum-{number}"')
        assert start != -1, f"no section for erratum {number}"
        end = page.find('id="erratum-', start + 1)
        section = page[start : end if end != -1 else len(page)]
        links = re.findall(r'href="\.\./tests/(test_\w+)/#(test_\w+)"', section)
        assert links, f"erratum {number} links no test"
        for module, name in links:
            assert re.search(rf"^(async )?def {name}\(", tests.get(module, ""), re.M), (
                f"{module}::{name} does not exist"
            )
        for heading in ("The article says:", "What happens:", "Why:", "The fix:"):
            assert heading in section, f"erratum {number} has no {heading!r}"


def test_where_the_article_differs_a_chapter_says_so_and_links_the_proof(built_site):
    """Every "The article differs" admonition links its erratum's section and a test; together the
    chapter pages point at every erratum."""
    pointed = set()
    for chapter in CHAPTERS:
        page = built_site.page(page_url(chapter))
        for admonition in re.findall(r'<div class="admonition [a-z]+">(.*?)</div>', page, re.S):
            if "The article differs" not in admonition:
                continue
            numbers = re.findall(r'href="\.\./\.\./errata/#erratum-(\d+)"', admonition)
            assert numbers, f"{chapter.name}: an admonition links no erratum:\n{admonition}"
            assert re.search(r'href="\.\./\.\./tests/test_\w+/#test_\w+"', admonition), (
                f"{chapter.name}: an admonition links no test:\n{admonition}"
            )
            pointed.update(int(n) for n in numbers)
    assert pointed == set(ERRATA), (
        f"errata no chapter page points at: {sorted(set(ERRATA) - pointed)}"
    )


# -- pictures and the offline rule -----------------------------------------------------------------
def test_pictures_are_self_contained_svg_used_by_pages(built_site):
    """The process model, the shutdown timeline, the lock queue and the metrics folder's life
    are SVG files that parse, load nothing from elsewhere, and appear on the pages that explain
    them."""
    for name, pages in {
        "process-model.svg": ["chapters/03-gunicorn/", "reference/"],
        "shutdown-timeline.svg": ["chapters/05-graceful-shutdown/", "reference/"],
        "lock-queue.svg": ["chapters/09-schema-migrations/"],
        "metrics-folder.svg": ["chapters/10-observability/"],
    }.items():
        svg = (DOCS / "img" / name).read_text()
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert not re.search(r"(href|src)=\"(https?:)?//", svg) and "@import" not in svg, name
        for url in pages:
            assert f'img/{name}"' in built_site.page(url), f"{url} does not show {name}"


def test_the_built_site_loads_nothing_from_the_internet(built_site):
    """No page, script or stylesheet of the build names a web font or a CDN: only the XML namespaces
    and the article's own reference links may hold an http(s) URL."""
    offenders = []
    for path in built_site.path.rglob("*"):
        if path.suffix not in {".html", ".css", ".js"}:
            continue
        text = path.read_text(errors="replace")
        for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", text):
            if re.search(r"(src|href)=\"(https?:)?//", tag):
                offenders.append(f"{path.relative_to(built_site.path)}: {tag}")
        if path.suffix == ".css" and re.search(
            r"@import\s+url\([\"']?https?:|fonts\.googleapis", text
        ):
            offenders.append(f"{path.relative_to(built_site.path)}: a remote stylesheet")
    assert not offenders, "\n".join(offenders)
    config = json.loads(
        re.search(
            r'<script id="__config" type="application/json">(.*?)</script>',
            built_site.page(""),
            re.S,
        ).group(1)
    )
    assert config["search"].startswith("../") or config["search"].startswith("assets/")

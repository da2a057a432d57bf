"""The built site in a real browser: Debian's Chromium, headless, driven by Playwright, offline.

The site from the `built_site` fixture is served by a local HTTP server on a free port. Every
request the browser makes is recorded; any that leaves localhost fails the test (and is refused, as
is any host name lookup). Console errors and uncaught page errors fail the test too.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import missing

from tutorial import chapters as manifest

CHAPTERS = manifest.load()
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = manifest.ROOT / "test-output" / "chapter-05-graceful-shutdown.png"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# What the accessibility test holds every page to: WCAG 2.0 and 2.1, levels A and AA.
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
# mkdocs.yml's two palettes, light and dark, as Material names them on <body>.
SCHEMES = ["default", "slate"]


def open_folds(page) -> None:
    """Opens every collapsible block (`??? note`), so what is folded is checked too."""
    page.evaluate("() => document.querySelectorAll('article details').forEach(d => d.open = true)")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output stays readable
        pass


@pytest.fixture(scope="module")
def site_url(built_site):
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(built_site.path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        missing(
            "Chromium",
            "apt install chromium (Debian's package; the tests never download a browser)",
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright", "pip install -r requirements-dev.txt")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # Any host name but localhost fails to resolve: the site must need none.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            ],
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


class Recorder:
    """Every request, console error and page error of one test."""

    def __init__(self):
        self.requests: list[str] = []
        self.errors: list[str] = []

    def outside(self) -> list[str]:
        return [
            url
            for url in self.requests
            if urlsplit(url).scheme not in {"data", "blob", "about"}
            and urlsplit(url).hostname not in LOCAL_HOSTS
        ]

    def assert_clean(self) -> None:
        assert self.requests, "no request was recorded: the recorder is not listening"
        assert not self.outside(), f"requests that left localhost: {self.outside()}"
        assert not self.errors, "console errors:\n" + "\n".join(self.errors)


@pytest.fixture
def browser(browser_context):
    """A fresh page, with every request (the page's and its web workers') and every error
    recorded."""
    recorder = Recorder()

    def on_request(request):
        recorder.requests.append(request.url)

    def on_console(message):
        if message.type == "error":
            recorder.errors.append(f"{message.text} ({message.location})")

    def refuse_outside(route):
        recorder.requests.append(route.request.url)
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            route.abort()

    browser_context.on("request", on_request)
    browser_context.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/])"), refuse_outside)
    page = browser_context.new_page()
    page.on("console", on_console)
    page.on("pageerror", lambda error: recorder.errors.append(f"page error: {error}"))
    page.on(
        "worker", lambda worker: worker.on("console", on_console) if hasattr(worker, "on") else None
    )
    try:
        yield page, recorder
    finally:
        page.close()
        browser_context.remove_listener("request", on_request)
        browser_context.unroute_all(behavior="ignoreErrors")


# -- every chapter page renders its code and its diff ----------------------------------------------
def test_every_chapter_page_renders_its_code_its_diff_and_the_navigation(browser, site_url):
    """Each chapter page shows its included code blocks (with titles) and, after the first chapter,
    a diff with added and removed lines; the navigation lists every chapter; pictures load."""
    page, recorder = browser
    for chapter in CHAPTERS:
        page.goto(f"{site_url}chapters/{chapter.name}/")
        page.wait_for_load_state("load")
        assert page.locator("h1").first.inner_text().startswith(f"{chapter.number} · ")
        # A folded block opens when a reader clicks its title.
        folded = page.locator("article details:not([open]) > summary")
        for _ in range(folded.count()):
            folded.first.click()
        code = page.locator("article .highlight:not(.language-console):not(.language-diff) code")
        assert code.count() >= 1, chapter.name
        for at in range(code.count()):
            assert code.nth(at).is_visible() and code.nth(at).inner_text().strip(), (
                f"{chapter.name}: empty block {at}"
            )
        titles = page.locator(
            "article .highlight:not(.language-console):not(.language-diff) .filename"
        ).all_inner_texts()
        assert titles and all(title.strip() for title in titles), chapter.name
        diff = page.locator("article .language-diff code")
        if chapter.index > 1:
            assert diff.count() >= 1, f"{chapter.name}: no diff"
            text = "\n".join(diff.all_inner_texts())
            assert re.search(r"^\+", text, re.M) and text.startswith("--- chapters/"), chapter.name
            # Pygments colours the lines: added and removed lines are marked up, not plain text.
            assert page.locator("article .language-diff .gi").count() >= 1
        else:
            assert diff.count() == 0
        nav = page.locator("nav.md-nav--primary").inner_text()
        for other in CHAPTERS:
            assert f"{other.number} · {other.title}" in nav, (
                f"{chapter.name}: nav lacks chapter {other.number}"
            )
        for image in page.locator("article img").all():
            assert image.evaluate("img => img.complete && img.naturalWidth > 0"), (
                image.get_attribute("src")
            )
    recorder.assert_clean()


# -- search works offline --------------------------------------------------------------------------
def unique_word(built_site) -> tuple[str, str]:
    """A word found on exactly one page of the whole site, and that page a chapter page. Unique by
    its first six letters, so no stemmed form of it can match anywhere else."""
    index = json.loads((built_site.path / "search" / "search_index.json").read_text())
    pages: dict[str, str] = {}
    for doc in index["docs"]:
        page = doc["location"].split("#")[0]
        pages[page] = (
            pages.get(page, "")
            + " "
            + re.sub(r"<[^>]+>", " ", doc["title"] + " " + doc["text"]).lower()
        )
    for chapter in CHAPTERS:
        # Candidates come from the page's prose, lower-case as written: code is split differently
        # by the search (basicConfig is two words to it).
        source = (manifest.ROOT / "docs" / "chapters" / f"{chapter.name}.md").read_text()
        prose = re.sub(r"```.*?```|`[^`]*`|<!--.*?-->|\([^)]*\)", " ", source, flags=re.S)
        for word in sorted(set(re.findall(r"(?<![\w-])[a-z]{8,}(?![\w-])", prose))):
            stem = word[:6]
            if sum(stem in text for text in pages.values()) == 1:
                return word, f"chapters/{chapter.name}/"
    pytest.fail("no word appears on one chapter page only")


def test_search_finds_a_word_that_only_one_chapter_page_has(browser, site_url, built_site):
    """Typed into Material's search box, such a word lists that chapter page, and only that page,
    with the index loaded over localhost."""
    page, recorder = browser
    word, where = unique_word(built_site)
    page.goto(site_url)
    page.wait_for_load_state("load")
    box = page.locator("input.md-search__input")  # in the header at desktop width
    box.click()
    box.press_sequentially(word, delay=20)
    results = page.locator(".md-search-result__item a")
    results.first.wait_for(state="visible", timeout=15_000)
    links = [
        link for link in (results.nth(i).get_attribute("href") for i in range(results.count()))
    ]
    assert links and all(where in link for link in links), f"searching {word!r}: {links}"
    assert any(url.endswith("search/search_index.json") for url in recorder.requests), (
        recorder.requests
    )
    recorder.assert_clean()


# -- the look of a page ----------------------------------------------------------------------------
def test_screenshot_of_a_chapter_page(browser, site_url):
    """A full-page screenshot of chapter 05 in test-output/, for a human to look at; the page must
    use the bundled stylesheet (no default serif font) and show the shutdown timeline."""
    page, recorder = browser
    page.goto(f"{site_url}chapters/05-graceful-shutdown/")
    page.wait_for_load_state("load")
    font = page.evaluate("getComputedStyle(document.body).fontFamily")
    assert "Roboto" not in font or "-apple-system" in font, (
        font
    )  # no web font asked for by name alone
    assert (
        page.locator("article img[src$='shutdown-timeline.svg']").evaluate(
            "img => img.naturalWidth"
        )
        > 0
    )
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    recorder.assert_clean()


# -- code fits the page ----------------------------------------------------------------------------
WIDE_SCREENSHOT = manifest.ROOT / "test-output" / "chapter-06-health-checks.png"


def test_no_code_block_on_a_chapter_page_scrolls_sideways(browser, site_url):
    """At 1280 x 900, no code block of any chapter page, diffs included, is wider than its box
    (scrollWidth > clientWidth): chapter code keeps to 79 columns, and so do the console
    sessions."""
    page, recorder = browser
    assert page.viewport_size == {"width": 1280, "height": 900}
    wide = []
    for chapter in CHAPTERS:
        page.goto(f"{site_url}chapters/{chapter.name}/")
        page.wait_for_load_state("load")
        open_folds(page)
        blocks = page.evaluate(
            """() => [...document.querySelectorAll("article pre > code")].map(code => ({
            lang: code.closest(".highlight") ? code.closest(".highlight").className : "",
            over: code.scrollWidth - code.clientWidth,
            longest: Math.max(...code.innerText.split("\\n").map(line => line.length)),
            line: code.innerText.split("\\n").reduce((a, b) => b.length > a.length ? b : a, ""),
        }))"""
        )
        assert blocks, chapter.name
        wide += [
            f"{chapter.name} [{b['lang']}] {b['over']}px too wide, {b['longest']} columns: "
            f"{b['line']}"
            for b in blocks
            if b["over"] > 0
        ]
    page.goto(f"{site_url}chapters/06-health-checks/")
    page.wait_for_load_state("load")
    WIDE_SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(WIDE_SCREENSHOT), full_page=True)
    assert wide == [], "\n".join(wide)


def test_performance_charts_read_at_the_page_width(browser, site_url):
    """At 1280 px each benchmark chart fits its column without scrolling, is drawn near its own
    width (so 10 pt text stays about 12 px), and has its table of numbers right after it. The
    screenshot in test-output/ is for a human to look at."""
    page, recorder = browser
    page.goto(f"{site_url}performance/")
    page.wait_for_load_state("load")
    charts = page.locator("article img[src*='img/bench-']")
    assert charts.count() == 2
    for i in range(charts.count()):
        shown = charts.nth(i).evaluate(
            """img => {
                const box = img.closest('p').getBoundingClientRect();
                let next = img.closest('p').nextElementSibling;
                return {natural: img.naturalWidth, width: img.getBoundingClientRect().width,
                        column: box.width, next: next && next.querySelector('table') ? 'table'
                                                   : next && next.tagName};
            }"""
        )
        assert shown["natural"] > 0, shown
        assert shown["width"] <= shown["column"] + 1, shown
        assert shown["width"] >= 0.8 * shown["natural"], f"chart shrunk to be unreadable: {shown}"
        assert shown["next"] == "table", shown
    shot = manifest.ROOT / "test-output" / "performance.png"
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    recorder.assert_clean()


def test_no_table_on_any_page_scrolls_sideways(browser, site_url, built_site):
    """At 1280 x 900, every table of every page fits its column: a number cut off at the edge
    (the CPU column of a wide benchmark table) is a number nobody reads."""
    page, recorder = browser
    pages = sorted(built_site.path.rglob("index.html"))
    wide = []
    for html in pages:
        folder = html.parent.relative_to(built_site.path).as_posix()
        page.goto(site_url if folder == "." else f"{site_url}{folder}/")
        page.wait_for_load_state("load")
        wide += page.evaluate(
            """() => [...document.querySelectorAll("article table")].map(table => {
                const wrap = table.closest(".md-typeset__scrollwrap") || table.parentElement;
                return {head: table.rows[0].innerText.replace(/\\s+/g, " ").slice(0, 60),
                        over: wrap.scrollWidth - wrap.clientWidth, box: wrap.clientWidth};
            }).filter(t => t.over > 0).map(t => `${location.pathname}: ${t.over}px wider than` +
                                              ` its ${t.box}px: ${t.head}`)"""
        )
    assert len(pages) > 5, pages
    assert wide == [], "\n".join(wide)
    recorder.assert_clean()


# -- accessibility ---------------------------------------------------------------------------------
TRANSPARENT_PICTURES = """() => [...document.querySelectorAll("article img")]
    .filter(img => getComputedStyle(img).backgroundColor === "rgba(0, 0, 0, 0)")
    .map(img => img.getAttribute("src"))"""


# axe judges colour contrast element by element, and a chapter page's code holds
# thousands of highlighted tokens drawn in a handful of colour pairs (the
# theme's): the contrast pass keeps the first token of each pair and empties
# the text of the others, which halves the test's time and judges every pair.
ONE_TOKEN_PER_COLOUR_PAIR = """() => {
  // What a token's contrast depends on: its colour, size and weight, the
  // backgrounds under it down to the first opaque one, the opacity above it.
  const pair = el => {
    const style = getComputedStyle(el);
    const parts = [style.color, style.fontSize, style.fontWeight];
    let opacity = 1;
    for (let at = el; at; at = at.parentElement) {
      const s = getComputedStyle(at);
      opacity *= Number(s.opacity);
      if (s.backgroundColor === "rgba(0, 0, 0, 0)") continue;
      parts.push(s.backgroundColor);
      if (!s.backgroundColor.startsWith("rgba")) break;
    }
    return parts.concat(opacity).join(" ");
  };
  const seen = new Set();
  for (const el of document.querySelectorAll(".highlight pre, .highlight pre *")) {
    const texts = [...el.childNodes].filter(
      n => n.nodeType === Node.TEXT_NODE && n.nodeValue.trim());
    if (!texts.length) continue;
    const key = pair(el);
    if (seen.has(key)) texts.forEach(n => { n.nodeValue = ""; });
    seen.add(key);
  }
  return seen.size;
}"""


def site_pages(built_site) -> list[str]:
    """Every page of the build, as a path under the site's root: the folders with an index.html,
    and the 404 page."""
    folders = sorted(
        html.parent.relative_to(built_site.path) for html in built_site.path.rglob("index.html")
    )
    return [f"{folder.as_posix()}/".removeprefix("./") for folder in folders] + ["404.html"]


def use_scheme(page, site_url: str, scheme: str) -> None:
    """Switches the site to a colour scheme with the header's toggle, as a reader does; Material
    keeps the choice in localStorage for every later page of the site."""
    page.goto(site_url)
    page.wait_for_load_state("load")
    if page.evaluate("document.body.dataset.mdColorScheme") != scheme:
        page.locator("form[data-md-component=palette] label:visible").click()
    assert page.evaluate("document.body.dataset.mdColorScheme") == scheme


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_page_meets_wcag_2_1_aa_in_axe(browser, site_url, built_site, scheme):
    """axe-core, injected from the file the axe-playwright-python wheel ships (no request), finds
    no WCAG 2.0 or 2.1 A or AA violation on any page at 1280 px, in either colour scheme, with
    every folded block open; in the dark scheme every picture has a background of its own. A
    failure names the page, the rule and the first element."""
    try:
        from axe_playwright_python.sync_playwright import Axe
    except ImportError:
        missing("axe-playwright-python", "pip install -r requirements-dev.txt")
    page, recorder = browser
    axe = Axe()
    options = {
        "runOnly": {"type": "tag", "values": WCAG_TAGS},
        "rules": {"color-contrast": {"enabled": False}},
        "resultTypes": ["violations"],
    }
    contrast = {
        "runOnly": {"type": "rule", "values": ["color-contrast"]},
        "resultTypes": ["violations"],
    }
    pages = site_pages(built_site)
    assert len(pages) > 20, pages
    found = []
    use_scheme(page, site_url, scheme)
    try:
        for path in pages:
            page.goto(site_url + path)
            page.wait_for_load_state("load")
            assert page.evaluate("document.body.dataset.mdColorScheme") == scheme, path
            open_folds(page)
            if scheme == "slate":
                # axe does not read text inside a picture, and ours are drawn for a white page.
                found += [
                    f"/{path} [{scheme}] a picture with no background of its own: {src}"
                    for src in page.evaluate(TRANSPARENT_PICTURES)
                ]
            violations = axe.run(page, options=options).response["violations"]
            page.evaluate(ONE_TOKEN_PER_COLOUR_PAIR)
            results = axe.run(page, options=contrast).response
            # The contrast rule ran on this page: axe saw text to judge.
            ran = {rule["id"] for kind in ("violations", "passes") for rule in results[kind]}
            assert "color-contrast" in ran, f"{path}: axe did not run color-contrast"
            for rule in violations + results["violations"]:
                first = rule["nodes"][0]
                where = " ".join(map(str, first["target"]))  # its CSS selector (frames apart)
                # axe's own summary says what is wrong, e.g. the two colours and their ratio.
                why = re.sub(
                    r"Fix (any|all) of the following:", "", first.get("failureSummary", "")
                )
                why = " ".join(why.split())
                found.append(
                    f"/{path} [{scheme}] {rule['id']} ({rule['impact']}), "
                    f"{len(rule['nodes'])} elements, the first {where}: "
                    f"{' '.join(first['html'].split())[:160]}\n    {why[:240]}"
                )
        version = page.evaluate("axe.version")
    finally:
        use_scheme(page, site_url, "default")  # the other tests look at the light scheme
    assert found == [], f"{len(found)} failures (axe-core {version}):\n" + "\n".join(found)
    recorder.assert_clean()

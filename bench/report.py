"""Medians with min-max over the rounds, the targets as ratios, Markdown tables and SVG charts.

Everything here is a pure function of results.json: `python -m bench --from-results FILE` redraws
the tables and charts of a past run without measuring anything.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .variants import (
    APP,
    BARE,
    DEFAULT_W2,
    NGINX_W2,
    PREVIOUS_W2,
    ROOT_PATH,
    SINGLE,
    TUNED_W1,
    TUNED_W2,
    USERS_PATH,
)

PATH_TITLES = {ROOT_PATH: "GET /", USERS_PATH: "GET /users/{id}"}
# What the ratio columns divide by: for GET /, chapter 01, the framework's ceiling (bare aiohttp)
# and the machine's (nginx); for GET /users/{id}, one default worker and the database's (pgbench).
BASELINES = {ROOT_PATH: (APP, BARE, NGINX_W2), USERS_PATH: (SINGLE, "pgbench")}


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def summarise(runs: list[dict], paths) -> dict:
    out = {
        key: spread([r.get(key) for r in runs]) for key in ("start_s", "worker_boot_s", "stop_s")
    }
    for path in paths:
        done = [r[path] for r in runs if path in r]
        stats = {
            key: spread([d[key] for d in done])
            for key in ("rps", "p50_ms", "p99_ms", "client_cpu_pct")
        }
        stats["errors"] = sum(d["errors"] for d in done)
        # CPU per process: the busiest of each run with the busiest of the others, and so on.
        stats["cpu"] = {}
        for group in ("server", "postgres"):
            lists = [d["cpu"].get(group, []) for d in done]
            rank = min((len(cpus) for cpus in lists), default=0)
            stats["cpu"][group] = [statistics.median(c[i] for c in lists) for i in range(rank)]
            stats["cpu"][group + "_total"] = spread([sum(cpus) for cpus in lists])
        out[path] = stats
    return out


def median(summary: dict, key: str, path: str | None, field: str) -> float | None:
    entry = summary.get(key, {})
    entry = entry.get(path, {}) if path else entry
    value = (entry or {}).get(field)
    return value["median"] if value else None


def checks(summary: dict, written: str | None) -> list[dict]:
    """The targets, for the chapter as written and for the recommended setup."""
    found = []
    for subject in dict.fromkeys((written, TUNED_W2)):
        if subject not in summary:
            continue

        def ratio(base, path, subject=subject):
            a, b = median(summary, subject, path, "rps"), median(summary, base, path, "rps")
            return round(a / b, 2) if a and b else None

        rows = [
            ("GET / req/s vs chapter 01 under python app.py", ">=", 1.6, ratio(APP, ROOT_PATH)),
            ("GET / req/s vs nginx with 2 workers", ">=", 0.35, ratio(NGINX_W2, ROOT_PATH)),
            ("GET /users/{id} p99 (ms)", "<=", 20, median(summary, subject, USERS_PATH, "p99_ms")),
            ("GET /users/{id} req/s vs 1 default worker", ">=", 1.2, ratio(SINGLE, USERS_PATH)),
            (
                "worker boot to first healthy answer (s)",
                "<",
                0.3,
                median(summary, subject, None, "worker_boot_s"),
            ),
            ("idle graceful stop (s)", "<", 1.3, median(summary, subject, None, "stop_s")),
        ]
        for name, op, target, value in rows:
            met = (
                None
                if value is None
                else {">=": value >= target, "<=": value <= target, "<": value < target}[op]
            )
            found.append(
                {
                    "subject": subject,
                    "check": name,
                    "target": f"{op} {target}",
                    "value": value,
                    "met": met,
                }
            )
    return found


# -- Markdown --------------------------------------------------------------------------------------
def _range(s: dict | None, fmt: str = "{:,.0f}") -> str:
    if not s:
        return "–"
    if s["min"] == s["max"]:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def rps_of(variants: list[dict], key: str, path: str, field: str = "median") -> float | None:
    v = next((v for v in variants if v["key"] == key and path in v["summary"]), None)
    return v["summary"][path]["rps"][field] if v else None


def ranges_apart(variants: list[dict], a: str, b: str, path: str) -> bool:
    """Whether the min-max req/s ranges of two variants do not overlap: only then does one run
    establish which of the two is faster."""
    low_a, high_a = rps_of(variants, a, path, "min"), rps_of(variants, a, path, "max")
    low_b, high_b = rps_of(variants, b, path, "min"), rps_of(variants, b, path, "max")
    return low_a > high_b or high_a < low_b


def _name(v: dict) -> str:
    return (
        f"**{v['label']}** (`{v['key']}`)"
        if v.get("as_written") or v["key"] == TUNED_W2
        else f"{v['label']} (`{v['key']}`)"
    )


def intro(results: dict) -> str:
    s = results["settings"]
    return (
        f"Median of {s['rounds']} interleaved runs, min–max in brackets. CPU is per process, "
        "in % of one core (Gunicorn's workers, busiest first; an idle master is left out). "
        f"wrk {s['wrk']}, {s['duration_s']} s per run.\n"
    )


def path_table(results: dict, path: str, compact: bool = False) -> str:
    """One row per variant that served `path`: req/s, its ratio to each baseline, latency, CPU.
    Compact (the page's, beside its chart): no p50, and the server's CPU only."""
    variants = results["variants"]
    rows = [v for v in variants if path in v["summary"]]
    if not rows:
        return ""
    bases = [(key, rps_of(variants, key, path)) for key in BASELINES[path]]
    bases = [(key, rps) for key, rps in bases if rps]
    heads = ["variant", "req/s", *(f"× `{key}`" for key, _ in bases)]
    heads += (
        ["p99 ms", "CPU % server"]
        if compact
        else ["p50 ms", "p99 ms", "CPU % server", "CPU % postgres", "CPU % client"]
    )
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for v in rows:
        s = v["summary"][path]
        rps = s["rps"]["median"]
        server = " + ".join(f"{c:.0f}" for c in s["cpu"]["server"]) or "–"
        pg = s["cpu"]["postgres_total"]
        pg = f"{pg['median']:.0f}" if pg else "–"
        client = f"{s['client_cpu_pct']['median']:.0f}" if s["client_cpu_pct"] else "–"
        if v["kind"] == "pgbench":
            server, client = "–", f"{client} (pgbench)"
        errors = f" ({s['errors']} errors)" if s["errors"] else ""
        cells = [f"{_name(v)}{errors}", _range(s["rps"]), *(f"{rps / b:.2f}" for _, b in bases)]
        p99 = _range(s["p99_ms"], "{:.1f}")
        cells += (
            [p99, server] if compact else [f"{s['p50_ms']['median']:.2f}", p99, server, pg, client]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stop_table(results: dict) -> str:
    timed = [v for v in results["variants"] if v["summary"].get("stop_s")]
    if not timed:
        return ""
    lines = [
        "| variant | spawn to first 200 | first worker's fork to first 200 | "
        "idle SIGTERM to exit |",
        "|---|---:|---:|---:|",
    ]
    for v in timed:
        s = v["summary"]
        lines.append(
            f"| {_name(v)} | {_range(s['start_s'], '{:.2f}')} | "
            f"{_range(s['worker_boot_s'], '{:.2f}')} | {_range(s['stop_s'], '{:.2f}')} |"
        )
    return "\n".join(lines) + "\n"


def checks_table(results: dict) -> str:
    if not results.get("checks"):
        return ""
    lines = ["| variant | check | target | measured | met |", "|---|---|---|---:|---|"]
    for c in results["checks"]:
        met = {True: "yes", False: "**no**", None: "–"}[c["met"]]
        lines.append(f"| `{c['subject']}` | {c['check']} | {c['target']} | {c['value']} | {met} |")
    return "\n".join(lines) + "\n"


def table(results: dict) -> str:
    """Every table of the run in one document (bench/results/table.md, and the run's own output)."""
    parts = [intro(results)]
    for title, text in [
        (f"**{PATH_TITLES[ROOT_PATH]}**", path_table(results, ROOT_PATH)),
        (f"**{PATH_TITLES[USERS_PATH]}**", path_table(results, USERS_PATH)),
        ("**Start and stop** (seconds)", stop_table(results)),
        ("**The targets** (`checks` in bench/report.py)", checks_table(results)),
    ]:
        if text:
            parts += [title, "", text]
    return "\n".join(parts)


# -- chart -----------------------------------------------------------------------------------------
COLOURS = {
    "gunicorn": "#8fb0d6",
    "written": "#3b6ea8",
    "tuned": "#1f3f66",
    "app": "#9a9a9a",
    "bare": "#7a5aa8",
    "nginx": "#5a9e5a",
    "pgbench": "#c08a2e",
}


def _colour(v: dict) -> str:
    if v.get("as_written"):
        return COLOURS["written"]
    if v["key"] == TUNED_W2:
        return COLOURS["tuned"]
    return COLOURS[v["kind"]]


# One chart per question, each drawn for the page's column (about 690 px at 1280 px): an SVG
# 7 inches wide (672 px) is shown at its own size there, and stays sharp at any zoom.
CHARTS = {
    "root": (
        "How many GET / per second, against the yardsticks?",
        [(ROOT_PATH, "rps", "req/s (bar label: × chapter 01 under python app.py)")],
    ),
    "users": (
        "How fast and how steady is GET /users/{id}?",
        [
            (USERS_PATH, "rps", "req/s (bar label: × 1 worker, default setup)"),
            (USERS_PATH, "p99_ms", "p99 latency, ms (lower is better)"),
        ],
    ),
}
WIDTH_IN = 7.0


def _panel(ax, variants: list[dict], path: str, field: str, xlabel: str) -> None:
    from matplotlib import ticker

    rows = [v for v in variants if path in v["summary"]][::-1]
    base = rps_of(variants, BASELINES[path][0], path) if field == "rps" else None
    med = [v["summary"][path][field]["median"] for v in rows]
    lo = [m - v["summary"][path][field]["min"] for m, v in zip(med, rows, strict=True)]
    hi = [v["summary"][path][field]["max"] - m for m, v in zip(med, rows, strict=True)]
    ax.barh(range(len(rows)), med, xerr=[lo, hi], color=[_colour(v) for v in rows], capsize=2)
    ax.set_yticks(range(len(rows)), [v["label"] for v in rows], fontsize=9)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, max(m + h for m, h in zip(med, hi, strict=True)) * 1.22)
    # Few, short tick labels: "40k" rather than "40000", so they never run into each other.
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
    ax.xaxis.set_major_formatter(
        ticker.FuncFormatter(
            lambda x, _: f"{x / 1000:.0f}k" if field == "rps" and x >= 1000 else f"{x:g}"
        )
    )
    ax.tick_params(axis="x", labelsize=9)
    for y, (m, h) in enumerate(zip(med, hi, strict=True)):
        text = f" {m:.1f}" if field != "rps" else f" {m / base:.2f}×" if base else f" {m:,.0f}"
        ax.text(m + h, y, text, va="center", fontsize=8.5)  # past the whisker, never over it


def chart(results: dict, name: str, path: Path) -> None:
    """Draw the chart `name` of CHARTS to `path` (SVG): one panel per row, stacked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "bench"  # the same results give the same file
    question, panels = CHARTS[name]
    variants = results["variants"]
    panels = [p for p in panels if any(p[0] in v["summary"] for v in variants)]
    if not panels:  # a run of --only that never served this path
        fig = plt.figure(figsize=(WIDTH_IN, 0.8))
        fig.text(0.5, 0.5, f"{question} Not measured in this run.", ha="center", fontsize=10)
        fig.savefig(path, format="svg", metadata={"Date": None})
        plt.close(fig)
        return
    heights = [0.32 * sum(p[0] in v["summary"] for v in variants) + 0.7 for p in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        squeeze=False,
        layout="constrained",
        figsize=(WIDTH_IN, sum(heights) + 0.6),
        gridspec_kw={"height_ratios": heights},
    )
    for ax, (p, field, xlabel) in zip(axes[:, 0], panels, strict=True):
        _panel(ax, variants, p, field, xlabel)
    m, s = results["machine"], results["settings"]
    fig.suptitle(
        f"{question}\n{s['chapter']}, {m['cpus']} cores, median of {s['rounds']} runs, "
        f"whiskers min–max, {results['started'][:10]}",
        fontsize=10,
    )
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


# -- the knobs, in the order of their measured effect ----------------------------------------------
KNOBS = [  # (variant, what it changes, compared with): the ratio is variant ÷ compared-with
    (TUNED_W2, "uvloop worker (`aiohttp.GunicornUVLoopWebWorker`)", "w2-no-uvloop"),
    (TUNED_W2, "access log off", "w2-with-log"),
    ("w2-orjson", "orjson for `GET /users/{id}` (not adopted)", TUNED_W2),
    (TUNED_W2, "`reuse_port`: a listening socket per worker", "w2-no-reuseport"),
    (DEFAULT_W2, "a second worker, default setup", SINGLE),
    (TUNED_W2, "a second worker, recommended setup", TUNED_W1),
    (TUNED_W2, "the recommended setup against the default, 2 workers", DEFAULT_W2),
    # Below 1.00x: what the measured chapter's own code costs against the chapter before it, both
    # in the recommended setup (chapter 10: its JSON logs, request ids and metrics).
    (TUNED_W2, "this chapter's additions, against the chapter before", PREVIOUS_W2),
]


def knob_effects(results: dict) -> list[dict]:
    """Each knob's req/s ratio on both paths against what it changes, largest gain first (by the
    geometric mean of the two ratios; a knob that costs more than it gives sorts last)."""
    variants = results["variants"]
    found = []
    for key, what, base in KNOBS:
        exact = {}
        for path in PATH_TITLES:
            a, b = rps_of(variants, key, path), rps_of(variants, base, path)
            exact[path] = a / b if a and b else None
        if None in exact.values():
            continue
        # sorted by the exact ratios: one shown as 0.00 still has a logarithm
        effect = math.exp(sum(math.log(r) for r in exact.values()) / len(exact))
        ratios = {path: round(r, 2) for path, r in exact.items()}
        found.append(
            {
                "variant": key,
                "knob": what,
                "against": base,
                "ratios": ratios,
                "apart": {path: ranges_apart(variants, key, base, path) for path in PATH_TITLES},
                "effect": round(effect, 3),
            }
        )
    return sorted(found, key=lambda k: -k["effect"])


def knobs_md(results: dict) -> str:
    effects = knob_effects(results)
    lines = [
        "| knob | req/s of | ÷ req/s of | GET / | GET /users/{id} |",
        "|---|---|---|---:|---:|",
    ]
    if not effects:
        lines = ["_This run measured too few variants to compare knobs._"]
    for k in effects:
        cells = [
            f"{'' if k['apart'][path] else '≈ '}{k['ratios'][path]:.2f}×" for path in PATH_TITLES
        ]
        lines.append(f"| {k['knob']} | `{k['variant']}` | `{k['against']}` | {' | '.join(cells)} |")
    if any(not all(k["apart"].values()) for k in effects):
        lines += [
            "",
            "≈: the two variants' min–max ranges overlap, so this run does not establish which "
            "of them is faster.",
        ]
    by_key = {v["key"]: v for v in results["variants"]}
    written = next((v for v in results["variants"] if v.get("as_written")), None)
    bare = rps_of(results["variants"], BARE, ROOT_PATH)
    if written and bare and ROOT_PATH in written["summary"]:
        mine = written["summary"][ROOT_PATH]["rps"]["median"]
        lines += [
            "",
            f"The chapter as written (`{written['key']}`) serves GET / at "
            f"{mine / bare:.2f}× the req/s of bare aiohttp with the same worker settings "
            f"(`{BARE}`): {mine:,.0f} against {bare:,.0f}"
            + (
                "."
                if ranges_apart(results["variants"], written["key"], BARE, ROOT_PATH)
                else "; their ranges overlap, so this run does not establish the gap."
            ),
        ]
    if TUNED_W2 in by_key and PREVIOUS_W2 in by_key:
        cells = []
        for path, title in PATH_TITLES.items():
            mine, before = (
                rps_of(results["variants"], TUNED_W2, path),
                rps_of(results["variants"], PREVIOUS_W2, path),
            )
            if mine and before:
                apart = ranges_apart(results["variants"], TUNED_W2, PREVIOUS_W2, path)
                cells.append(f"{title} at {'' if apart else '≈ '}{mine / before:.2f}×")
        if cells:
            lines += [
                "",
                f"This chapter against the one before it, both in the recommended setup "
                f"(`{TUNED_W2}` ÷ `{PREVIOUS_W2}`): {', '.join(cells)} the req/s.",
            ]
    if TUNED_W2 in by_key and DEFAULT_W2 in by_key:
        fast = (by_key[TUNED_W2]["summary"].get("stop_s") or {}).get("median")
        slow = (by_key[DEFAULT_W2]["summary"].get("stop_s") or {}).get("median")
        if fast and slow:
            lines += [
                "",
                f"Idle graceful stop: {slow:.2f} s for `{DEFAULT_W2}`, "
                f"{fast:.2f} s for `{TUNED_W2}` "
                f"with the SIGTERM hook ({fast / slow:.2f}×).",
            ]
    return "\n".join(lines) + "\n"


def machine_md(results: dict) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    soft = ", ".join(f"{name} {version}" for name, version in v.items())
    return (
        f"- Run: {results['started']}, {results['wall_s']:.0f} s in all, chapter `{s['chapter']}`, "
        f"{s['rounds']} rounds of {s['warmup_s']} s warm-up and {s['duration_s']} s measured "
        "per path\n"
        f"- Machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, {m['os']}, "
        f"Linux {m['kernel']}; load average {m['load_before'][0]} before, "
        f"{m['load_after'][0]} after\n"
        f"- Software: {soft}\n"
        f"- Load: wrk {s['wrk']} over loopback; pgbench {s['pgbench']}; "
        f"{s['sample_users']:,} sample users\n"
    )


def write(results: dict, out: Path) -> dict[str, Path]:
    """Write results.json (with the knob effects added), the tables and the charts to `out`.
    `results` itself is left as it was given."""
    results = {**results, "knobs": knob_effects(results)}
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "json": ("results.json", json.dumps(results, indent=2) + "\n"),
        "table": ("table.md", table(results)),
        "table_root": ("table-root.md", path_table(results, ROOT_PATH, compact=True)),
        "table_users": ("table-users.md", path_table(results, USERS_PATH, compact=True)),
        "table_stop": ("table-stop.md", stop_table(results)),
        "table_checks": ("table-checks.md", checks_table(results)),
        "intro": ("table-intro.md", intro(results)),
        "knobs": ("knobs.md", knobs_md(results)),
        "machine": ("machine.md", machine_md(results)),
    }
    files = {}
    for key, (name, text) in texts.items():
        files[key] = out / name
        files[key].write_text(text or "_Not measured in this run._\n")
    for name in CHARTS:
        files[f"chart_{name}"] = out / f"chart-{name}.svg"
        chart(results, name, files[f"chart_{name}"])
    return files

"""``moerge report``: a self-contained HTML page and PNG figures from a results folder's records.

One section per (track, expert kind): the test table (methods × tasks, raw and
normalised accuracy, held-in and held-out means, merge cost), the validation
sweep that chose each method's values, and three figures: held-in vs held-out
normalised accuracy per method, accuracy vs number of merged experts, and
accuracy vs merge cost; where routers were scored (``moerge route compare``), the routing table and its
two figures (:mod:`moerge.evaluation.routing_report`).

Records scored against an older build of the zoo (another ``zoo`` fingerprint
than the group's newest record) are left out of every table and figure, and the
report says how many it left out.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moerge.data.tasks import get_suite
from moerge.evaluation.experiment import load_records
from moerge.evaluation.intervals import paired_interval
from moerge.evaluation.intervals import png_bytes as _png

ROLE_ORDER = {"pretrained": 0, "expert": 1, "multitask": 2, "merge": 3, "model": 4}  # "model": `moerge eval` of a folder


def _f(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _params(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())


def test_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Test records of baselines and of the full merges, in a stable order."""
    rows = [r for r in records if r["split"] == "test" and r["role"] in ROLE_ORDER]
    return sorted(rows, key=lambda r: (ROLE_ORDER[r["role"]], -(r["held_in_norm"] or 0) if r["role"] == "merge"
                                       else 0, r["name"]))


def versus_best(records: list[dict[str, Any]], suite: str) -> dict[int, str]:
    """For each test row (by id), its held-in normalised accuracy minus that of the best merge, with the
    paired 95% interval, e.g. "-0.007 [-0.015, +0.001]"; "best" for the best merge itself."""
    rows = test_rows(records)
    merges = [r for r in rows if r["role"] == "merge" and r["held_in_norm"] is not None]
    if not merges:
        return {}
    best = max(merges, key=lambda r: r["held_in_norm"])
    held_in = list(get_suite(suite).held_in)
    out = {id(best): "best"}
    for r in rows:
        if r is not best:
            iv = paired_interval(r, best, held_in)
            if iv:
                out[id(r)] = f"{iv[0]:+.3f} [{iv[1]:+.3f}, {iv[2]:+.3f}]"
    return out


def markdown_table(records: list[dict[str, Any]], suite: str) -> str:
    """The test table in Markdown (for the README)."""
    s = get_suite(suite)
    head = ["model", "values (chosen on validation)", *s.tasks, "held-in", "held-out", "held-in norm",
            "vs best merge (95% CI)", "held-out norm", "merge s", "merge MiB", "statistics s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vs = versus_best(records, suite)
    for r in test_rows(records):
        cells = [r["name"], _params(r)] + [_f(r["accuracy"].get(t), True) for t in s.tasks]
        cells += [_f(r["held_in"], True), _f(r["held_out"], True), _f(r["held_in_norm"]), vs.get(id(r), ""),
                  _f(r["held_out_norm"])]
        cells += [f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "",
                  f"{r['merge_peak_mib']:.0f}" if "merge_peak_mib" in r else "", _stats_cost(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(records: list[dict[str, Any]], suite: str) -> str:
    """A compact terminal table: one row per record (accuracy in % per task; held-in/held-out means, raw and
    normalised). Held-out tasks are starred."""
    s = get_suite(suite)
    width = max([5] + [len(r["name"]) for r in records])
    cols = [f"{t[:9]}{'*' if t in s.held_out else ''}" for t in s.tasks]
    head = f"{'model':<{width}} " + " ".join(f"{c:>10}" for c in cols) + \
        f" {'held-in':>8} {'held-out':>8} {'in norm':>8} {'out norm':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        cells = " ".join(f"{_f(r['accuracy'].get(t), True):>10}" for t in s.tasks)
        lines.append(f"{r['name']:<{width}} {cells} {_f(r['held_in'], True):>8} {_f(r['held_out'], True):>8} "
                     f"{_f(r['held_in_norm']):>8} {_f(r['held_out_norm']):>8}")
    return "\n".join(lines)


def _stats_cost(r: dict[str, Any]) -> str:
    """What a data-aware merge's statistics cost to compute (all experts, once), e.g. '412 (kfac)'."""
    return f"{r['stats_seconds']:.0f} ({r['stats_kind']})" if "stats_seconds" in r else ""


def figures(records: list[dict[str, Any]], title: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    rows = [r for r in test_rows(records) if r["held_in_norm"] is not None]
    # 1. held-in vs held-out normalised accuracy per model
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["held_in_norm"] or 0 for r in rows], 0.4, label="held-in")
    ax.bar([x + 0.2 for x in xs], [r["held_out_norm"] or 0 for r in rows], 0.4, label="held-out")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=40, ha="right")
    ax.set_ylabel("accuracy / fine-tuned expert's")
    values = [r["held_in_norm"] or 1 for r in rows] + [r["held_out_norm"] or 1 for r in rows] + [1.0]
    ax.set_ylim(max(0.0, min(values) - 0.1), max(values) + 0.12)
    ax.set_title(f"{title}: normalised test accuracy")
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    out["normalized"] = _png(fig)
    plt.close(fig)
    # 2. accuracy vs number of merged experts
    curve: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["split"] == "test" and r["role"] in ("curve", "merge") and r.get("n_experts"):
            curve[r["method"]][r["n_experts"]].append(r)
    curve = {m: v for m, v in curve.items() if len(v) > 1}
    if curve:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, key, label in ((axes[0], "held_in_norm", "held-in"), (axes[1], "held_out_norm", "held-out")):
            for m, by_k in sorted(curve.items()):
                ks = sorted(by_k)
                ys = [sum(r[key] for r in by_k[k]) / len(by_k[k]) for k in ks]
                ax.plot(ks, ys, marker="o", label=m)
            ax.set_xlabel("experts merged")
            ax.set_title(label)
            ax.set_xticks(sorted({k for v in curve.values() for k in v}))
        axes[0].set_ylabel("normalised accuracy (mean over subsets)")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{title}: accuracy vs number of merged experts", y=1.04)
        out["experts"] = _png(fig)
        plt.close(fig)
    # 3. accuracy vs merge cost
    merges = [r for r in rows if "merge_seconds" in r]
    if merges:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for r in merges:
            ax.scatter(r["merge_seconds"], r["held_in_norm"], color="C0")
            ax.scatter(r["merge_seconds"], r["held_out_norm"] or 0, color="C1", marker="s")
            ax.annotate(r["name"], (r["merge_seconds"], r["held_in_norm"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.scatter([], [], color="C0", label="held-in")
        ax.scatter([], [], color="C1", marker="s", label="held-out")
        ax.set_xlabel("merge wall time (s, whole process)")
        ax.set_ylabel("normalised test accuracy")
        ax.set_title(f"{title}: accuracy vs merge cost")
        ax.legend(fontsize=8)
        out["cost"] = _png(fig)
        plt.close(fig)
    return out


def _html_table(records: list[dict[str, Any]], suite: str) -> str:
    s = get_suite(suite)
    head = ["model", "values", *[f"{t}{'*' if t in s.held_out else ''}" for t in s.tasks], "held-in", "held-out",
            "held-in norm", "vs best merge (95% CI)", "held-out norm", "merge s", "merge MiB", "statistics s"]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    vs = versus_best(records, suite)
    for r in test_rows(records):
        cells = [r["name"], _params(r)]
        for t in s.tasks:
            a, n = r["accuracy"].get(t), r["normalized"].get(t)
            cells.append(f"{_f(a, True)}<small> ({_f(n)})</small>" if n is not None else _f(a, True))
        cells += [_f(r["held_in"], True), _f(r["held_out"], True), f"<b>{_f(r['held_in_norm'])}</b>",
                  vs.get(id(r), ""), f"<b>{_f(r['held_out_norm'])}</b>", f"{r.get('merge_seconds', '')}", f"{r.get('merge_peak_mib', '')}",
                  _stats_cost(r)]
        out.append("<tr>" + "".join(f"<td>{c if '<' in str(c) else html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(out) + "</table><p><small>* held-out task. Accuracy in %, normalised by each task's fine-tuned " \
                            "expert in brackets. Statistics: seconds to compute every expert's statistics " \
                            "(once; data-aware methods only). vs best merge: held-in normalised accuracy minus " \
                            "the best merge's, with a paired bootstrap 95% interval over the test examples " \
                            "(an interval that excludes 0 resolves the ranking).</small></p>"


def _sweep_table(records: list[dict[str, Any]]) -> str:
    sweeps = sorted((r for r in records if r["role"] == "sweep"), key=lambda r: (r["name"], -r["held_in_norm"]))
    if not sweeps:
        return ""
    out = ["<table><tr><th>method</th><th>values</th><th>held-in validation (norm)</th><th>merge s</th></tr>"]
    best: dict[str, float] = {}
    for r in sweeps:
        best.setdefault(r["name"], r["held_in_norm"])
    for r in sweeps:
        mark = " ✓" if r["held_in_norm"] == best[r["name"]] else ""
        out.append(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(_params(r))}</td>"
                   f"<td>{_f(r['held_in_norm'])}{mark}</td><td>{r.get('merge_seconds', '')}</td></tr>")
    return "\n".join(out) + "</table>"


def current_zoo(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, left out): the records of one (suite, track, kind) group made against the zoo of its newest
    record, and the others. Records without a fingerprint (made before records carried one) form a zoo
    of their own, older than any dated record."""
    if not records:
        return [], []
    newest = max(records, key=lambda r: r.get("created", ""))
    zoo = newest.get("zoo")
    kept = [r for r in records if r.get("zoo") == zoo]
    return kept, [r for r in records if r.get("zoo") != zoo]


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td:first-child,th:first-child,td:nth-child(2){text-align:left}th{background:#f3f3f3}img{max-width:100%}
small{color:#777}h2{border-bottom:1px solid #ddd;margin-top:2em}"""


def write_report(results: str | Path, out: str | Path | None = None,
                 warn: Callable[[str], None] | None = None) -> Path:
    """Write ``report.html`` and one PNG per figure into ``out`` (default: the results folder).
    ``warn`` receives one line per group whose older-zoo records were left out."""
    results = Path(results)
    out = Path(out) if out else results
    out.mkdir(parents=True, exist_ok=True)
    from moerge.evaluation import routing_report

    records = load_records(results)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["suite"], r["track"], r["kind"])].append(r)
    parts = [f"<!doctype html><meta charset='utf-8'><title>moerge evaluation</title><style>{CSS}</style>",
             "<h1>moerge: merges of fine-tuned experts, held-in and held-out</h1>",
             "<p>Values of each method are chosen on the validation splits of the held-in tasks only; the table is "
             "on test. Normalised accuracy = accuracy / the accuracy of the task's own fine-tuned expert.</p>"]
    for (suite, track, kind), group in sorted(groups.items()):
        title = f"{suite} / {track} / {kind}"
        s = get_suite(suite)
        recs, stale = current_zoo(group)
        parts.append(f"<h2>{html.escape(title)}</h2><p>held-in: {', '.join(s.held_in)}; held-out: "
                     f"{', '.join(s.held_out)}; zoo {recs[0].get('zoo') or 'not fingerprinted'}</p>")
        if stale:
            msg = (f"{title}: left out {len(stale)} record(s) scored against an older build of the zoo "
                   f"({', '.join(sorted({str(r.get('zoo')) for r in stale}))}); re-run the comparison, or move "
                   f"them out of {results / 'records'}")
            parts.append(f"<p><b>{html.escape(msg)}</b></p>")
            if warn:
                warn(msg)
        parts.append(_html_table(recs, suite))
        for name, png in figures(recs, title).items():
            fname = f"{track}-{kind}-{name}.png"
            (out / fname).write_bytes(png)
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        sweep = _sweep_table(recs)
        if sweep:
            parts.append("<h3>Validation sweep (held-in tasks)</h3>" + sweep)
        (out / f"{track}-{kind}-table.md").write_text(markdown_table(recs, suite) + "\n")
        if routing_report.has_routing(recs):
            parts.append(routing_report.html_section(recs, suite))
            for name, png in routing_report.figures(recs, suite, title).items():
                (out / f"{track}-{kind}-{name}.png").write_bytes(png)
                parts.append(f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
            (out / f"{track}-{kind}-routing.md").write_text(routing_report.markdown(recs, suite) + "\n")
    page = out / "report.html"
    page.write_text("\n".join(parts))
    return page

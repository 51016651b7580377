"""The routing section of ``moerge report``: routers beside the merges, held-in and leave-one-task-out.

One row per router or baseline. A trained router's seeds are pooled: its score is the mean over seeds, and
its paired bootstrap interval against the best merge resamples test examples with each example's hit
averaged over the seeds (the same draws for both sides). Leave-one-task-out: each fold's record scores the
left-out task; the row's value is the mean normalised accuracy over the folds, and its interval resamples
within every fold's task.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

import numpy as np

from moerge.data.tasks import get_suite
from moerge.evaluation.intervals import group_hits, group_interval, normaliser, png_bytes

ROUTE_ROLES = ("route", "loto")
LABELS = {"linear": "linear (uniform ΔW average)", "oracle": "oracle (task id → own expert)",
          "retrieval": "retrieval (MiniLM top-1)", "avg_act": "average activation", "multitask": "multitask model"}


def has_routing(records: list[dict[str, Any]]) -> bool:
    return any(r["role"] in ROUTE_ROLES for r in records)


def score(group: dict[str, list[dict[str, Any]]]) -> float | None:
    """Mean over tasks of the normalised accuracy (each task's records: the seeds, hits averaged)."""
    vals = []
    for t, recs in group.items():
        h = group_hits(recs, t)
        norm = next((n for r in recs if (n := normaliser(r, t))), None)
        if h is None or not norm:
            return None
        vals.append(h.mean() / norm)
    return float(np.mean(vals)) if vals else None


def _fmt_iv(iv: tuple[float, float, float] | None) -> str:
    return "" if iv is None else f"{iv[0]:+.3f} [{iv[1]:+.3f}, {iv[2]:+.3f}]"


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def rows(records: list[dict[str, Any]], suite: str) -> list[dict[str, Any]]:
    """One row per router, the best merge, the uniform average, the multitask model: held-in, held-out and
    leave-one-out groups (task -> records), routing mass, build cost, and intervals against the best merge."""
    s = get_suite(suite)
    test = [r for r in records if r["split"] == "test"]
    merges = [r for r in test if r["role"] == "merge" and r["held_in_norm"] is not None]
    best = max(merges, key=lambda r: r["held_in_norm"]) if merges else None
    by_name: dict[str, dict[str, Any]] = {}

    def entry(name: str, kind: str) -> dict[str, Any]:
        return by_name.setdefault(name, {"name": name, "kind": kind, "held_in": defaultdict(list),
                                         "held_out": defaultdict(list), "loto": defaultdict(list), "recs": []})

    for r in test:
        if r["role"] == "route" and r["name"] != "lorahub":
            e = entry(r["name"], "router")
            e["recs"].append(r)
            for t in r["accuracy"]:
                (e["held_in"] if t in s.held_in else e["held_out"])[t].append(r)
        elif r["role"] == "route":  # LoraHub's weights per held-out task (found on a few of its examples)
            e = entry("lorahub", "router")
            for t in r["accuracy"]:
                e["held_out"][t].append(r)
        elif r["role"] == "loto":
            e = entry(r["name"], "router" if "merge_seconds" not in r else "merge")
            e["loto"][r["left_out"]].append(r)
    in_folds = {r["name"] for r in test if r["role"] == "loto" and "merge_seconds" in r}
    for r in test:  # the merges beside the routers: the best, the uniform average, those of the folds
        if (r["role"] == "merge" and (r is best or r["name"] == "linear" or r["name"] in in_folds)) or \
                r["role"] == "multitask":
            e = entry(r["name"], "merge" if r["role"] == "merge" else "multitask")
            e["recs"].append(r)
            for t in r["accuracy"]:
                (e["held_in"] if t in s.held_in else e["held_out"])[t].append(r)
    for e in by_name.values():  # a merge seen only in the folds keeps its fold rows; others need test rows
        e["held_in"], e["held_out"], e["loto"] = dict(e["held_in"]), dict(e["held_out"]), dict(e["loto"])
    loto_merges = [e for e in by_name.values() if e["kind"] == "merge" and len(e["loto"]) == len(s.held_in)]
    best_loto = max(loto_merges, key=lambda e: score(e["loto"]) or -1) if loto_merges else None
    ref = by_name.get(best["name"]) if best else None
    out = []
    for e in by_name.values():
        e["best"] = ref is e
        e["best_loto"] = best_loto is e
        e["held_in_score"], e["held_out_score"], e["loto_score"] = (
            score(e["held_in"]) if e["held_in"] else None, score(e["held_out"]) if e["held_out"] else None,
            score(e["loto"]) if len(e["loto"]) == len(s.held_in) else None)
        e["vs_best"] = group_interval(e["held_in"], ref["held_in"]) if ref and e["held_in"] and ref is not e else None
        e["vs_best_loto"] = (group_interval(e["loto"], best_loto["loto"]) if best_loto and e["loto_score"] is not None
                             and best_loto is not e else None)
        masses = [r["routing_mass"] for r in e["recs"] if r.get("routing_mass")]
        e["mass"] = None
        if masses:
            layers = np.array([np.mean([m[t] for t in m], axis=0) for m in masses])  # [seeds, layers]
            e["mass_per_layer"] = layers.mean(axis=0).tolist()
            e["mass"] = float(layers.mean())
            e["n_experts"] = e["recs"][0].get("n_experts")
        e["seeds"] = len({str((r.get("params") or {}).get("seed")) for r in e["recs"]}) or \
            max((len(v) for v in e["loto"].values()), default=0)
        spread = [r["held_in_norm"] for r in e["recs"] if r.get("held_in_norm") is not None]
        e["spread"] = (min(spread), max(spread)) if len(spread) > 1 else None
        costs = [r["build_seconds"] for r in e["recs"] if "build_seconds" in r]
        e["build_seconds"] = float(np.mean(costs)) if costs else None
        e["values"] = _values(e)
        out.append(e)
    order = {"router": 0, "merge": 1, "multitask": 2}
    return sorted(out, key=lambda e: (order[e["kind"]], -(e["held_in_score"] or e["loto_score"] or 0)))


def _values(e: dict[str, Any]) -> str:
    recs = e["recs"] or [r for v in e["loto"].values() for r in v]
    if not recs:
        return ""
    p = {k: v for k, v in (recs[0].get("params") or {}).items() if k not in ("seed", "task")}
    return ", ".join(f"{k}={v}" for k, v in p.items())


HEAD = ["model", "values", "seeds", "held-in norm (no task id)", "vs best merge (95% CI)", "held-out norm",
        "leave-one-out norm", "vs best merge, leave-one-out (95% CI)", "own-expert mass", "build s"]


def _cells(e: dict[str, Any]) -> list[str]:
    spread = f" ({e['spread'][0]:.3f}–{e['spread'][1]:.3f})" if e["spread"] else ""
    return [LABELS.get(e["name"], e["name"]), e["values"], str(e["seeds"] or ""), _f(e["held_in_score"]) + spread,
            "best merge" if e["best"] else _fmt_iv(e["vs_best"]), _f(e["held_out_score"]), _f(e["loto_score"]),
            "best merge" if e["best_loto"] else _fmt_iv(e["vs_best_loto"]),
            _f(e["mass"]) if e["mass"] is not None else "",
            f"{e['build_seconds']:.0f}" if e["build_seconds"] is not None else ""]


def markdown(records: list[dict[str, Any]], suite: str) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_cells(e)) + " |" for e in rows(records, suite)]
    return "\n".join(lines)


def html_section(records: list[dict[str, Any]], suite: str) -> str:
    out = ["<h3>Routing: held-in without a task id, and leave one task out</h3><table><tr>"
           + "".join(f"<th>{html.escape(h)}</th>" for h in HEAD) + "</tr>"]
    for e in rows(records, suite):
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(e)) + "</tr>")
    return "\n".join(out) + (
        "</table><p><small>Normalised accuracy on test (accuracy / the task's own expert's). Held-in: every "
        "router over all held-in experts, no task id. Leave one task out: the router (or merge) of the other "
        "experts on the left-out task, mean over the folds. Values chosen on validation of the tasks whose "
        "experts are in the set. Trained routers: mean over seeds (range in brackets); intervals pool the seeds "
        "per example. Own-expert mass: mean routing weight a held-in task's inputs give its own expert "
        "(chance = 1 / experts).</small></p>")


def figures(records: list[dict[str, Any]], suite: str, title: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    es = rows(records, suite)
    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(es)), 3.8))
    xs = np.arange(len(es))
    for k, (key, label) in enumerate((("held_in_score", "held-in, no task id"), ("held_out_score", "held-out"),
                                      ("loto_score", "leave one task out"))):
        ax.bar(xs + (k - 1) * 0.27, [e[key] or 0 for e in es], 0.27, label=label)
    for x, e in zip(xs, es):
        if e["spread"]:
            ax.plot([x - 0.27, x - 0.27], e["spread"], color="black", lw=1)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs, [e["name"] for e in es], rotation=35, ha="right")
    ax.set_ylabel("accuracy / fine-tuned expert's")
    vals = [e[k] for e in es for k in ("held_in_score", "held_out_score", "loto_score") if e[k]] or [1.0]
    ax.set_ylim(max(0.0, min(vals) - 0.1), max(vals + [1.0]) + 0.12)
    ax.set_title(f"{title}: routers and merges (test; seed range as a line)")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    out["routing"] = png_bytes(fig)
    plt.close(fig)
    massed = [e for e in es if e.get("mass_per_layer")]
    if massed:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for e in massed:
            ax.plot(range(len(e["mass_per_layer"])), e["mass_per_layer"], marker=".", label=e["name"])
        n = massed[0].get("n_experts")
        if n:
            ax.axhline(1 / n, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_xlabel("layer")
        ax.set_ylabel("routing weight on the task's own expert")
        ax.set_title(f"{title}: does the router find the task's expert?")
        ax.legend(fontsize=8)
        out["routing-mass"] = png_bytes(fig)
        plt.close(fig)
    return out

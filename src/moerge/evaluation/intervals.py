"""Scores over evaluation records shared by the report's sections: each task's normaliser, per-example
hits pooled over records (seeds), and paired percentile-bootstrap intervals of normalised accuracy."""

from __future__ import annotations

import io
from typing import Any


def normaliser(r: dict[str, Any], task: str) -> float | None:
    """The accuracy that normalises ``task`` in record ``r`` (the task's own expert's), or None."""
    ref = (r.get("reference") or {}).get(task)
    if ref:
        return float(ref)
    a, n = r["accuracy"].get(task), r["normalized"].get(task)
    return a / n if a and n else None


def paired_interval(a: dict[str, Any], b: dict[str, Any], tasks: list[str], *, n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float] | None:
    """Difference of mean normalised accuracy over ``tasks``, record ``a`` minus record ``b``, with a paired
    percentile-bootstrap interval: each task's test examples are resampled (the same draws for both models,
    which were scored on the same examples) and each task's normaliser is held at its observed value.
    None when either record lacks per-example hits for a task."""
    return group_interval({t: [a] for t in tasks}, {t: [b] for t in tasks}, n_boot=n_boot, seed=seed, level=level)


def group_hits(recs: list[dict[str, Any]], task: str) -> Any:
    """Each example's hit on ``task`` averaged over ``recs`` (e.g. a router's seeds; one record: its hits),
    or None when one of them lacks per-example hits or they disagree in length."""
    import numpy as np

    rows = [(r.get("correct") or {}).get(task) for r in recs]
    if not rows or any(not x or len(x) != len(rows[0]) for x in rows):
        return None
    return np.mean([np.frombuffer(x.encode(), np.uint8).astype(np.float64) - ord("0") for x in rows], axis=0)


def group_interval(a: dict[str, list[dict[str, Any]]], b: dict[str, list[dict[str, Any]]], *, n_boot: int = 2000,
                   seed: int = 0, level: float = 0.95) -> tuple[float, float, float] | None:
    """:func:`paired_interval` where each side gives, per task, a list of records (seeds) whose hits are
    averaged per example; the tasks are those of ``a`` (each may come from another record, as the folds of
    leave-one-task-out do)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    point, boot = 0.0, np.zeros(n_boot)
    for t in a:
        ha, hb = group_hits(a[t], t), group_hits(b.get(t, []), t)
        norm = next((n for r in a[t] + b.get(t, []) if (n := normaliser(r, t))), None)
        if ha is None or hb is None or len(ha) != len(hb) or not norm:
            return None
        d = ha - hb
        point += d.mean() / norm
        boot += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1) / norm
    k = len(a)
    if not k:
        return None
    lo, hi = np.quantile(boot / k, [(1 - level) / 2, (1 + level) / 2])
    return point / k, float(lo), float(hi)


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()

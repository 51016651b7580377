"""Merges of zoo experts, scored honestly: baselines, validation-only sweeps, test results, expert-count curves.

Every evaluated model becomes one JSON record in a results folder (what was
merged, how, on which split, per-task accuracy, accuracy normalised by the
fine-tuned expert of each task, the held-in and held-out means, the merge's wall
time and peak memory). ``moerge report`` draws its tables and figures from these
records only. Each record carries the fingerprint of the zoo it was scored
against (``zoo``) and when it was made (``created``), so that the report can
leave out the records of a zoo since rebuilt.

Protocol (after "Realistic Evaluation of Model Merging for Compositional
Generalization"): hyperparameters are chosen by the mean normalised accuracy on
the *validation* splits of the *held-in* tasks; the chosen merge alone is then
scored on the test splits of all tasks. Held-out tasks never influence a choice.
Normalisation: a task's accuracy divided by the accuracy, on the same split, of
the full fine-tuned expert of that task (for held-out tasks that expert exists
only as a reference and is never merged).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moerge.data.tasks import TaskError, get_suite
from moerge.errors import StepError
from moerge.evaluation.evaluate import EvalSettings, Evaluator, OwnHeadEvaluator
from moerge.evaluation.models import default_cache
from moerge.evaluation.zoo import (
    MULTITASK,
    expert_dir,
    fingerprint,
    list_experts,
    pretrained_dir,
    stats_dir,
    zoo_fingerprint,
)
from moerge.measure import run_measured
from moerge.runtime.models import files_hash
from moerge.stats.format import META as STATS_META
from moerge.stats.format import read_meta, stale_for

# data-free methods of the engine and the values tried on validation (slerp, nuslerp, nearswap and arcee_fusion
# take one or two models: not in a many-expert comparison; passthrough does not merge)
GRIDS: dict[str, dict[str, dict[str, list[Any]]]] = {
    "full": {
        "linear": {},
        "task_arithmetic": {"lambda": [0.2, 0.3, 0.5, 0.7, 1.0]},
        "ties": {"density": [0.2, 0.5], "lambda": [0.5, 0.7, 1.0]},
        "dare_linear": {"density": [0.3, 0.5], "lambda": [0.3, 0.5, 0.7]},
        "dare_ties": {"density": [0.3, 0.5], "lambda": [0.5, 1.0]},
        "breadcrumbs": {"density": [0.8, 0.9], "lambda": [0.3, 0.5, 0.7]},
        "breadcrumbs_ties": {"density": [0.8, 0.9], "lambda": [0.5, 1.0]},
        "model_stock": {},
        "fisher": {},
        "regmean": {"alpha": [0.5, 0.9, 1.0]},
        "mats": {"init_lambda": [0.3, 1.0], "iterations": [10, 50]},
        "della": {"density": [0.3, 0.5], "lambda": [0.5, 1.0]},
        "della_linear": {"density": [0.3, 0.5], "lambda": [0.3, 0.5, 0.7]},
        "sce": {"select_topk": [0.1, 0.5, 1.0]},
        "multislerp": {},
        "karcher": {},
        "ram": {},
        "ramplus_tl": {},
        "tsv_m": {"lambda": [0.5, 1.0, 1.5]},
        "iso_c": {"lambda": [0.5, 1.0, 1.5]},
        "iso_cts": {"lambda": [0.5, 1.0, 1.5]},
        "knots": {"density": [0.2, 1.0], "lambda": [0.5, 1.0]},
        "wudi": {"lambda": [0.5, 1.0]},
    },
    "small": {
        "linear": {},
        "task_arithmetic": {"lambda": [0.3, 0.5, 1.0]},
        "ties": {"density": [0.2, 0.5], "lambda": [0.7, 1.0]},
        "dare_linear": {"density": [0.5], "lambda": [0.3, 0.5]},
        "dare_ties": {"density": [0.5], "lambda": [0.7, 1.0]},
        "breadcrumbs": {"density": [0.9], "lambda": [0.3, 0.5]},
        "breadcrumbs_ties": {"density": [0.9], "lambda": [0.7, 1.0]},
        "model_stock": {},
        "fisher": {},
        "regmean": {"alpha": [0.5, 0.95]},
        "mats": {"init_lambda": [0.3, 1.0], "iterations": [10]},
        "della": {"density": [0.5], "lambda": [0.7, 1.0]},
        "sce": {"select_topk": [0.1, 1.0]},
        "multislerp": {},
        "karcher": {},
        "ram": {},
        "tsv_m": {"lambda": [0.7, 1.0, 1.5]},
        "iso_c": {"lambda": [0.7, 1.0, 1.5]},
        "iso_cts": {"lambda": [0.7, 1.0, 1.5]},
        "knots": {"density": [1.0], "lambda": [0.7, 1.0]},
        "wudi": {"lambda": [0.7, 1.0]},
    },
}
# data-aware methods and the statistics each expert brings (computed once, cached in the zoo)
# (a comparison may name another statistic for a method as METHOD@STATISTIC, e.g. mats@gram: MaTS with the
# RegMean objective)
DATA_AWARE = {"fisher": "fisher", "regmean": "gram", "mats": "kfac"}


def method_and_statistic(spec: str) -> tuple[str, str | None]:
    """'mats@gram' -> ('mats', 'gram'); 'regmean' -> ('regmean', 'gram'); 'ties' -> ('ties', None)."""
    method, _, stat = spec.partition("@")
    if stat and method not in DATA_AWARE:
        raise TaskError(f"{spec!r}: {method} reads no statistics")
    return method, (stat or DATA_AWARE.get(method))
CURVE_METHODS = ("linear", "task_arithmetic", "ties")

Log = Callable[[str], None]


# methods that require a per-model weight and give it no default (as mergekit's multislerp): a comparison
# weighs its experts alike (tests/test_evaluation.py checks this against the registry for every grid method)
WEIGHT_REQUIRED = frozenset({"multislerp"})


def equal_weights(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The recipe's parameters, with ``weight: 1.0`` (equal shares) for the methods of ``WEIGHT_REQUIRED``."""
    out = dict(params)
    if method in WEIGHT_REQUIRED:
        out.setdefault("weight", 1.0)
    return out


@dataclass
class Experiment:
    """One comparison: a suite, a track, an expert kind, where the zoo is and where records go."""

    suite: str
    track: str
    kind: str = "full"
    zoo: Path = field(default_factory=lambda: default_cache() / "zoo")
    results: Path = Path("results")
    val_limit: int | None = None  # examples per task on validation (sweeps)
    test_limit: int | None = None  # examples per task on test
    seed: int = 0  # DARE's seed
    log: Log = print

    def __post_init__(self) -> None:
        self.zoo, self.results = Path(self.zoo), Path(self.results)
        self.s = get_suite(self.suite)
        self.experts = list_experts(self.zoo, self.track, self.kind)
        missing = [t for t in self.s.held_in if t not in self.experts]
        if missing:
            raise TaskError(f"the zoo has no {self.track}/{self.kind} expert for {', '.join(missing)}",
                            hint=f"moerge zoo build {self.suite} --track {self.track} --kind {self.kind}")
        self.full_experts = list_experts(self.zoo, self.track, "full")
        self.zoo_id = zoo_fingerprint(self.zoo, self.track, self.kind, self.suite)
        self.work = default_cache() / "merges"
        self._normalisers: dict[str, dict[str, float | None]] = {}

    # -- scoring -------------------------------------------------------------------------------
    def settings(self, split: str) -> EvalSettings:
        return EvalSettings(self.suite, self.track, split, self.val_limit if split == "validation" else self.test_limit)

    def evaluator(self, split: str, heads: Path | None = None) -> Evaluator:
        return Evaluator(self.settings(split), heads=heads if heads is not None else self.zoo / self.track / self.kind)

    def normaliser(self, split: str, task: str) -> float | None:
        """A task's accuracy under its own fine-tuned expert (held-in: the merged kind's expert; held-out:
        the full fine-tuned expert, which is never merged)."""
        cache = self._normalisers.setdefault(split, {})
        if task not in cache:
            kind = self.kind if task in self.s.held_in else "full"
            if kind == "full" and task not in self.full_experts:
                return None
            folder = expert_dir(self.zoo, self.track, kind, task)
            if self.track == "encoder":  # the expert with its own head (a held-out task's head scores nothing else)
                ev: Evaluator = OwnHeadEvaluator(self.settings(split), folder, task)
            else:
                ev = self.evaluator(split)
            cache[task] = ev.score(folder, [task])[task]
        return cache[task]

    def record(self, name: str, role: str, folder: Path, split: str, tasks: list[str] | None = None,
               probe_only: bool = False, heads: Path | None = None, **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        tasks = tasks or list(self.s.tasks)
        results = self.evaluator(split, heads).results(folder, tasks, probe_only=probe_only)
        return self.record_results(name, role, results, split, tasks, time.perf_counter() - t0, **extra)

    def record_results(self, name: str, role: str, results: dict[str, dict[str, Any]], split: str,
                       tasks: list[str], seconds: float, **extra: Any) -> dict[str, Any]:
        """The record of per-task ``results`` (each with its accuracy and per-example hits ``correct``),
        normalised and saved; for models that are not one folder too (a retrieval router's picks)."""
        acc = {t: r["accuracy"] for t, r in results.items()}
        norm_by = {t: self.normaliser(split, t) for t in tasks}
        normalized = {t: acc[t] / norm_by[t] for t in tasks if norm_by[t]}
        held_in = [t for t in tasks if t in self.s.held_in]
        held_out = [t for t in tasks if t in self.s.held_out]
        rec = {
            "name": name, "role": role, "suite": self.suite, "track": self.track, "kind": self.kind,
            "split": split, "limit": self.settings(split).limit,
            "accuracy": acc, "normalized": normalized,
            "held_in": _mean([acc[t] for t in held_in]), "held_out": _mean([acc[t] for t in held_out]),
            "held_in_norm": _mean([normalized[t] for t in held_in if t in normalized]),
            "held_out_norm": _mean([normalized[t] for t in held_out if t in normalized]),
            "reference": norm_by,  # each task's normaliser (the expert's accuracy on the same examples)
            "correct": {t: r["correct"] for t, r in results.items()},  # per example, for paired comparisons
            "eval_seconds": round(seconds, 1),
            "zoo": self.zoo_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
        }
        self._save(rec)
        return rec

    def _save(self, rec: dict[str, Any]) -> None:
        folder = self.results / "records"
        folder.mkdir(parents=True, exist_ok=True)
        key = json.dumps([rec["name"], rec["role"], rec["split"], rec.get("params"), rec.get("experts"),
                          rec["track"], rec["kind"]], sort_keys=True)
        path = folder / f"{rec['track']}-{rec['kind']}-{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}.json"
        if path.exists():  # the same result again (its scores cached): it keeps when and at what cost it was measured
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("correct") == rec["correct"] and old.get("zoo") == rec["zoo"]:
                for k in ("created", "eval_seconds"):
                    if k in old:
                        rec[k] = old[k]
        path.write_text(json.dumps(rec, indent=1, sort_keys=True))

    # -- merging -------------------------------------------------------------------------------
    def recipe(self, spec: str, params: dict[str, Any], experts: list[str]) -> dict[str, Any]:
        method, stat = method_and_statistic(spec)
        models: list[Any] = [str(expert_dir(self.zoo, self.track, self.kind, t)) for t in experts]
        if stat is not None:
            models = [{"model": m, "stats": str(self.stats(t, stat))} for m, t in zip(models, experts)]
        return {"method": method, "base_model": str(pretrained_dir(self.zoo, self.track)),
                "models": models, "parameters": equal_weights(method, params), "seed": self.seed}

    def stats(self, task: str, stat: str) -> Path:
        """An expert's statistics folder, computed on first use (`moerge stats`, its own process, measured)."""
        out = stats_dir(self.zoo, self.track, self.kind, stat, task)
        expert = expert_dir(self.zoo, self.track, self.kind, task)
        meta = out / STATS_META
        if meta.exists() and stale_for(read_meta(out), files_hash(expert)):
            self.log(f"statistics: the {task} expert was rebuilt since its {stat} statistics were computed")
            meta.unlink()
        if not meta.exists():
            self.log(f"statistics: {stat} of the {task} expert ...")
            log = self.work / f"stats-{self.track}-{stat}-{task}.log"
            self.work.mkdir(parents=True, exist_ok=True)
            rec = run_measured([sys.executable, "-m", "moerge", "stats", stat,
                                str(expert), "--data", task,
                                "--track", self.track, "--out", str(out), "--force", "--quiet"], log=log)
            if rec["rc"]:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise StepError(f"moerge stats failed ({log}): {' '.join(tail)}")
        return out

    def stats_cost(self, spec: str, experts: list[str]) -> dict[str, Any]:
        """What the statistics of a data-aware merge cost (computing them, once per expert)."""
        _, stat = method_and_statistic(spec)
        if stat is None:
            return {}
        metas = [read_meta(self.stats(t, stat)) for t in experts]
        return {"stats_seconds": round(sum(m["seconds"] for m in metas), 1),
                "stats_examples": sum(m["examples"] for m in metas), "stats_kind": stat}

    def merge(self, recipe: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """Run ``moerge merge`` in its own process; returns (output, its wall time, CPU time, peak RSS and peak
        anonymous memory, measured by :mod:`moerge.measure`)."""
        import yaml

        key = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=8).hexdigest()
        out = self.work / key
        self.work.mkdir(parents=True, exist_ok=True)
        rpath = self.work / f"{key}.yaml"
        rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
        shutil.rmtree(out, ignore_errors=True)
        log = self.work / f"{key}.log"
        rec = run_measured([sys.executable, "-m", "moerge", "merge", str(rpath), str(out), "--quiet", "--force"],
                           log=log)
        if rec["rc"]:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise StepError(f"merge failed ({rpath}, log {log}): {' '.join(tail)}")
        log.unlink(missing_ok=True)
        return out, {"merge_seconds": round(rec["wall"], 2), "merge_cpu_seconds": round(rec["cpu"], 2),
                     "merge_peak_mib": round(rec["rss_mib"], 1), "merge_anon_mib": round(rec["anon_mib"], 1)}

    def merged_record(self, method: str, params: dict[str, Any], experts: list[str], split: str,
                      tasks: list[str] | None = None, role: str = "merge", **extra: Any) -> dict[str, Any]:
        recipe = self.recipe(method, params, experts)
        out, cost = self.merge(recipe)
        try:
            return self.record(method, role, out, split, tasks, method=method, params=params, experts=experts,
                               n_experts=len(experts), **cost, **self.stats_cost(method, experts), **extra)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    # -- the protocol --------------------------------------------------------------------------
    def baselines(self, split: str = "test") -> list[dict[str, Any]]:
        """Pretrained, each expert, and the multitask oracle (when built), on ``split``."""
        recs = [self.record("pretrained", "pretrained", pretrained_dir(self.zoo, self.track), split,
                            probe_only=True)]
        self.log(_line(recs[-1]))
        for t in self.s.held_in:
            recs.append(self.record(f"expert:{t}", "expert", expert_dir(self.zoo, self.track, self.kind, t), split,
                                    experts=[t]))
            self.log(_line(recs[-1]))
        if MULTITASK in self.experts:
            heads = expert_dir(self.zoo, self.track, self.kind, MULTITASK) / "heads"
            oracle = expert_dir(self.zoo, self.track, self.kind, MULTITASK)
            recs.append(self.record("multitask", "multitask", oracle, split,
                                    heads=heads if self.track == "encoder" else None, model=fingerprint(oracle)))
            self.log(_line(recs[-1]))
        return recs

    def sweep(self, method: str, grid: dict[str, list[Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Every grid point on held-in validation; the best by mean normalised accuracy (first on ties)."""
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
        recs = []
        for params in points:
            recs.append(self.merged_record(method, params, list(self.s.held_in), "validation",
                                           list(self.s.held_in), role="sweep"))
            self.log(_line(recs[-1]))
        best = max(recs, key=lambda r: r["held_in_norm"])
        return best["params"], recs

    def compare(self, methods: list[str] | None = None, grid: str = "full", curve: bool = True) -> list[dict[str, Any]]:
        """Baselines, then per method a validation sweep and its test result, then the expert-count curve.
        ``methods=None``: every method of the grid; ``[]``: the baselines only."""
        grids = GRIDS[grid]
        methods = list(grids) if methods is None else methods
        out = self.baselines()
        chosen = {}
        for m in methods:
            params, _ = self.sweep(m, grids.get(m, grids.get(method_and_statistic(m)[0], {})))
            chosen[m] = params
            out.append(self.merged_record(m, params, list(self.s.held_in), "test"))
            self.log("test " + _line(out[-1]))
        if curve:
            out += self.expert_curve({m: chosen[m] for m in CURVE_METHODS if m in chosen})
        return out

    def expert_curve(self, methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Each method (at its chosen values) on every subset of 2 … N−1 held-in experts; test split,
        scored on the subset's held-in tasks and every held-out task."""
        recs = []
        held_in = list(self.s.held_in)
        for k in range(2, len(held_in)):
            for subset in itertools.combinations(held_in, k):
                for m, params in methods.items():
                    recs.append(self.merged_record(m, params, list(subset), "test",
                                                   list(subset) + list(self.s.held_out), role="curve"))
                    self.log("curve " + _line(recs[-1]))
        return recs


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def _line(r: dict[str, Any]) -> str:
    p = ",".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
    cost = f" merge {r['merge_seconds']:.1f}s {r['merge_peak_mib']:.0f}MiB" if "merge_seconds" in r else ""
    return (f"{r['split']:<10} {r['name']:<22} {p:<22} held-in {_fmt(r['held_in'])} (norm {_fmt(r['held_in_norm'])})"
            f"  held-out {_fmt(r['held_out'])} (norm {_fmt(r['held_out_norm'])}){cost}")


def load_records(results: Path) -> list[dict[str, Any]]:
    folder = Path(results) / "records"
    if not folder.is_dir():
        raise TaskError(f"{results}: no records folder", hint="run `moerge compare` (or `moerge eval`) first")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

"""Routers among zoo experts, scored beside the merges: held-in without a task id, and leave-one-task-out.

Two settings (after the MoErging survey, Yadav et al. 2024, and PHATGOOSE's protocol):

- **held-in, no task id**: every router is built over all held-in experts and scored, like a merge, on the
  test split of every task (held-in and held-out); nothing tells it which task an input comes from.
- **leave one task out**: for each held-in task T, the router is built over the other experts only and scored
  on T's test split (T's expert exists only as T's normaliser). The merges of the other experts (task
  arithmetic, TIES) and LoraHub (weights found on 5 of T's train examples) are scored the same way.

Every value a router or merge has to choose (Arrow's top-k, a merge's λ and density) is chosen on the
validation splits of the tasks whose experts are in the set (the held-in ones; in a fold, the other three):
never on the task scored. The references' defaults are kept where nothing is chosen (PHATGOOSE and the
average-activation router top-2, SMEAR all experts). Trained routers (PHATGOOSE's gates, SMEAR's router)
run with several seeds; each seed is one record. Baselines run by the same code: the task-id oracle (each
task's own expert: 1.0 normalised by construction), retrieval (an input goes to the expert whose training
example is nearest to it in MiniLM's embedding, top-1) and the uniform ΔW average (the ``linear`` merge).

Each held-in record also carries the mean routing weight each held-in task's test inputs give the task's
own expert, per layer (``routing_mass``): how often a router finds the expert one would want.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moerge.data.tasks import TaskError, get_task
from moerge.errors import StepError
from moerge.evaluation.experiment import Experiment, _line
from moerge.evaluation.zoo import expert_dir, pretrained_dir, read_meta
from moerge.measure import run_measured

# the routers of a comparison: Arrow (values chosen on validation), the trained ones, the baselines
ROUTERS = ("arrow", "phatgoose", "avg_act", "smear", "retrieval", "oracle", "lorahub")
ARROW_TOP_K = (1, 2, 3)
# the merges each fold is compared with, and the values tried on the fold's validation tasks
FOLD_MERGES: dict[str, dict[str, list[Any]]] = {
    "task_arithmetic": {"lambda": [0.3, 0.5, 1.0]},
    "ties": {"density": [0.2, 0.5], "lambda": [0.7, 1.0]},
    "linear": {},
}


class RoutingExperiment:
    """The routing comparison of one zoo (decoder track: routers trained on data need a causal LM)."""

    def __init__(self, exp: Experiment, *, seeds: tuple[int, ...] = (0, 1, 2), steps: int = 100,
                 batch_size: int = 8, extract_rank: int = 16, mass_examples: int = 32,
                 lorahub_examples: int = 5, fold_seeds: tuple[int, ...] | None = None) -> None:
        if exp.track != "decoder":
            raise TaskError("routing is compared on the decoder track (SmolLM2 experts): trained routers learn "
                            "from a causal LM's target loss, and encoder heads would tell the task")
        self.exp, self.seeds, self.steps, self.batch_size = exp, tuple(seeds), steps, batch_size
        self.extract_rank, self.mass_examples, self.lorahub_examples = extract_rank, mass_examples, lorahub_examples
        self.fold_seeds = self.seeds if fold_seeds is None else tuple(fold_seeds)  # SMEAR trains again per fold
        self.held_in = list(exp.s.held_in)
        self.base = pretrained_dir(exp.zoo, exp.track)
        self.work = exp.work / f"routing-{exp.zoo_id}-{exp.kind}"
        self.log = exp.log

    # -- building ------------------------------------------------------------------------------------
    def folder(self, task: str) -> Path:
        return expert_dir(self.exp.zoo, self.exp.track, self.exp.kind, task)

    def train_examples(self, task: str) -> int | None:
        """How many train examples the task's expert saw (the trained routers learn from the same ones)."""
        meta = read_meta(self.folder(task)) or {}
        n = ((meta.get("data") or {}).get(task) or {}).get("train_examples")
        return int(n) if n else None

    def build(self, method: str, experts: list[str], seed: int = 0) -> tuple[Path, dict[str, Any]]:
        """``moerge route METHOD`` over the zoo's experts, in its own process (measured); built once per
        (method, experts, seed, steps) and kept in the work folder."""
        key = hashlib.blake2b(json.dumps([method, experts, seed, self.steps, self.batch_size]).encode(),
                              digest_size=6).hexdigest()
        out = self.work / f"{method}-{key}"
        cost_file = self.work / f"{method}-{key}.cost.json"
        if out.is_dir() and cost_file.exists():
            return out, json.loads(cost_file.read_text())
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moerge", "route", method, str(self.base),
               *[str(self.folder(t)) for t in experts], "--out", str(out), "--force"]
        if self.exp.kind == "full":
            cmd += ["--extract-rank", str(self.extract_rank)]
        if method != "arrow":
            for t in experts:
                cmd += ["--data", t]
            n = self.train_examples(experts[0])
            cmd += ["--steps", str(self.steps), "--batch-size", str(self.batch_size), "--seed", str(seed),
                    "--quiet"] + (["--examples", str(n)] if n else [])
        log = self.work / f"{method}-{key}.log"
        self.log(f"route: building {method} over {', '.join(experts)} (seed {seed}) ...")
        rec = run_measured(cmd, log=log)
        if rec["rc"]:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise StepError(f"moerge route {method} failed ({log}): {' '.join(tail)}")
        cost = {"build_seconds": round(rec["wall"], 2), "build_cpu_seconds": round(rec["cpu"], 2),
                "build_peak_mib": round(rec["rss_mib"], 1)}
        cost_file.write_text(json.dumps(cost))
        return out, cost

    def derive(self, bundle: Path, *, drop: str | None = None, top_k: int | None = None) -> Path:
        from moerge.routing.build import derive_bundle
        from moerge.routing.bundle import read_bundle

        names = [n for n, _ in read_bundle(bundle, verify=False).experts("task")]
        out = bundle.with_name(f"{bundle.name}-{drop or 'all'}-k{top_k or 'same'}")
        if not out.is_dir():
            derive_bundle(bundle, out, keep=[n for n in names if n != drop],
                          router={"top_k": top_k} if top_k else None, force=True)
        return out

    # -- scoring -------------------------------------------------------------------------------------
    def record(self, name: str, role: str, bundle: Path, split: str, tasks: list[str], experts: list[str],
               params: dict[str, Any], cost: dict[str, Any], **extra: Any) -> dict[str, Any]:
        spec = json.loads((bundle / "moerge_routing.json").read_text())
        rec = self.exp.record(name, role, bundle, split, tasks, method=name, params=params, experts=experts,
                              n_experts=len(experts), router=spec["router"], **cost, **extra)
        self.log(("" if split == "validation" else "test ") + _line(rec))
        return rec

    def routing_mass(self, bundle: Path, tasks: list[str]) -> dict[str, list[float]]:
        """Per held-in task, the mean routing weight its test inputs (prompt tokens, first
        ``mass_examples``) give the task's own expert, per layer (mean over the layer's routed modules)."""
        from transformers import AutoTokenizer

        from moerge.routing.layer import record, token_mask
        from moerge.routing.load import load_routed

        model = load_routed(bundle)
        tok = AutoTokenizer.from_pretrained(str(self.base))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        names = [e["name"] for e in model.moerge_routing["experts"] if e.get("role", "task") == "task"]
        out: dict[str, list[float]] = {}
        ev = self.exp.evaluator("test")
        for t in tasks:
            if t not in names:
                continue
            task, own = get_task(t), names.index(t)
            recorders = record(model)
            prompts = [task.render(e.text) for e in ev.examples(t)[: self.mass_examples]]
            with torch.no_grad():
                for i in range(0, len(prompts), 8):
                    enc = tok(prompts[i:i + 8], return_tensors="pt", padding=True, truncation=True,
                              max_length=ev.settings.max_length)
                    with token_mask(enc["attention_mask"]):
                        model(**enc)
            layers: dict[int, list[float]] = {}
            for module, r in recorders.items():
                m = re.search(r"layers\.(\d+)\.", module)
                layers.setdefault(int(m.group(1)) if m else 0, []).append(float(r.mass[own]) / max(r.tokens, 1))
            out[t] = [sum(v) / len(v) for _, v in sorted(layers.items())]
            record(model, on=False)
        return out

    def composite(self, name: str, role: str, picks: dict[str, list[str]], split: str, experts: list[str],
                  **extra: Any) -> dict[str, Any]:
        """The record of a router that sends each whole input to one expert (``picks[task][i]``): each
        example scored by its expert (every expert's per-example results on the split, cached)."""
        t0 = time.perf_counter()
        tasks = list(picks)
        ev = self.exp.evaluator(split)
        per_expert = {e: ev.results(self.folder(e), tasks) for e in sorted({p for v in picks.values() for p in v})}
        results = {}
        for t in tasks:
            correct = "".join(per_expert[p][t]["correct"][i] for i, p in enumerate(picks[t]))
            results[t] = {"accuracy": correct.count("1") / len(correct), "correct": correct}
        shares = {t: {e: round(v.count(e) / len(v), 4) for e in experts} for t, v in picks.items()}
        rec = self.exp.record_results(name, role, results, split, tasks, time.perf_counter() - t0, method=name,
                                      experts=experts, n_experts=len(experts), pick_share=shares, **extra)
        self.log(("" if split == "validation" else "test ") + _line(rec))
        return rec

    def retrieval_picks(self, experts: list[str], tasks: list[str], split: str) -> dict[str, list[str]]:
        """Top-1 retrieval: each input goes to the expert one of whose training examples is nearest to it
        (cosine of mean-pooled all-MiniLM-L6-v2 embeddings; Jang et al. 2023's retrieval baseline)."""
        from moerge.data.tasks import suite_splits
        from moerge.evaluation.encoder import embed
        from moerge.runtime.models import load_model

        enc_dir = pretrained_dir(self.exp.zoo, "encoder")
        if not enc_dir.is_dir():
            from moerge.evaluation.zoo import ensure_pretrained

            ensure_pretrained(self.exp.zoo, "encoder")
        model, tok = load_model(enc_dir, "encoder")
        bank, owner = [], []
        for e in experts:
            train = suite_splits(self.exp.suite, e).train[: self.train_examples(e) or None]
            bank.append(embed(model, tok, [x.text for x in train]))
            owner += [e] * len(train)
        keys = torch.nn.functional.normalize(torch.cat(bank), dim=-1)
        ev = self.exp.evaluator(split)
        out = {}
        for t in tasks:
            q = torch.nn.functional.normalize(embed(model, tok, [x.text for x in ev.examples(t)]), dim=-1)
            out[t] = [owner[int(i)] for i in (q @ keys.T).argmax(-1)]
        return out

    # -- the two settings ----------------------------------------------------------------------------
    def held_in_setting(self, methods: list[str]) -> list[dict[str, Any]]:
        """Every router over all held-in experts, on the test split of every task."""
        tasks, hi, recs = list(self.exp.s.tasks), self.held_in, []
        for method in methods:
            if method == "arrow":
                bundle, cost = self.build("arrow", hi)
                sweep = [self.record("arrow", "route-sweep", self.derive(bundle, top_k=k), "validation", hi, hi,
                                     {"top_k": k}, cost) for k in ARROW_TOP_K]
                k = max(sweep, key=lambda r: r["held_in_norm"])["params"]["top_k"]
                chosen = self.derive(bundle, top_k=k)
                recs.append(self.record("arrow", "route", chosen, "test", tasks, hi, {"top_k": k}, cost,
                                        routing_mass=self.routing_mass(chosen, hi)))
            elif method in ("phatgoose", "smear", "avg_act"):
                for seed in (self.seeds if method != "avg_act" else (0,)):
                    bundle, cost = self.build(method, hi, seed)
                    params = {"seed": seed} if method != "avg_act" else {}
                    recs.append(self.record(method, "route", bundle, "test", tasks, hi, params, cost,
                                            routing_mass=self.routing_mass(bundle, hi)))
            elif method == "retrieval":
                recs.append(self.composite("retrieval", "route", self.retrieval_picks(hi, tasks, "test"), "test",
                                           hi))
            elif method == "oracle":
                recs.append(self.composite("oracle", "route", {t: [t] * len(self.exp.evaluator("test").examples(t))
                                                               for t in hi}, "test", hi))
            elif method == "lorahub":  # a few examples of each held-out task: its own weights
                for t in self.exp.s.held_out:
                    recs.append(self.lorahub(hi, t))
            else:
                raise TaskError(f"unknown router {method!r}", hint=f"one of {', '.join(ROUTERS)}")
        return recs

    def lorahub(self, experts: list[str], task: str, role: str = "route") -> dict[str, Any]:
        key = hashlib.blake2b(json.dumps([experts, task, self.lorahub_examples]).encode(), digest_size=6).hexdigest()
        out = self.work / f"lorahub-{key}"
        cost_file = out.with_suffix(".cost.json")
        if not (out.is_dir() and cost_file.exists()):
            self.work.mkdir(parents=True, exist_ok=True)
            log = out.with_suffix(".log")
            rec = run_measured([sys.executable, "-m", "moerge", "route", "lorahub", str(self.base),
                                *[str(self.folder(t)) for t in experts], "--data", task, "--examples",
                                str(self.lorahub_examples), "--out", str(out), "--force", "--quiet"], log=log)
            if rec["rc"]:
                raise StepError(f"moerge route lorahub failed ({log})")
            cost_file.write_text(json.dumps({"build_seconds": round(rec["wall"], 2),
                                             "build_peak_mib": round(rec["rss_mib"], 1)}))
        cost = json.loads(cost_file.read_text())
        weights = json.loads((out / "moerge_lorahub.json").read_text()).get("weights")
        rec = self.exp.record("lorahub", role, out, "test", [task], method="lorahub",
                              params={"examples": self.lorahub_examples, "task": task}, experts=experts,
                              n_experts=len(experts), weights=weights, left_out=task, **cost)
        self.log("test " + _line(rec))
        return rec

    def leave_one_out(self, methods: list[str], merges: dict[str, dict[str, list[Any]]] | None = None
                      ) -> list[dict[str, Any]]:
        """For each held-in task: routers and merges over the other experts, scored on that task's test split
        (role ``loto``; ``left_out`` names the task); values chosen on the other tasks' validation."""
        recs: list[dict[str, Any]] = []
        merges = FOLD_MERGES if merges is None else merges
        for t in self.held_in:
            others = [e for e in self.held_in if e != t]
            extra = {"left_out": t}
            for method in methods:
                if method == "arrow":
                    full, cost = self.build("arrow", self.held_in)
                    sweep = [self.record("arrow", "loto-sweep", self.derive(full, drop=t, top_k=k), "validation",
                                         others, others, {"top_k": k}, cost, **extra) for k in ARROW_TOP_K]
                    k = max(sweep, key=lambda r: r["held_in_norm"])["params"]["top_k"]
                    recs.append(self.record("arrow", "loto", self.derive(full, drop=t, top_k=k), "test", [t], others,
                                            {"top_k": k}, cost, **extra))
                elif method in ("phatgoose", "avg_act"):  # per-expert rows: the fold drops one expert's rows
                    for seed in (self.seeds if method == "phatgoose" else (0,)):
                        full, cost = self.build(method, self.held_in, seed)
                        recs.append(self.record(method, "loto", self.derive(full, drop=t), "test", [t], others,
                                                {"seed": seed} if method == "phatgoose" else {}, cost, **extra))
                elif method == "smear":  # a joint router: trained again on the other experts' data
                    for seed in self.fold_seeds:
                        bundle, cost = self.build("smear", others, seed)
                        recs.append(self.record("smear", "loto", bundle, "test", [t], others, {"seed": seed}, cost,
                                                **extra))
                elif method == "retrieval":
                    recs.append(self.composite("retrieval", "loto", self.retrieval_picks(others, [t], "test"), "test",
                                               others, **extra))
                elif method == "lorahub":
                    recs.append(self.lorahub(others, t, role="loto"))
                elif method != "oracle":  # the oracle has no expert for a left-out task
                    raise TaskError(f"unknown router {method!r}", hint=f"one of {', '.join(ROUTERS)}")
            for method, grid in merges.items():
                points = [dict(zip(grid, v)) for v in itertools.product(*grid.values())] or [{}]
                sweep = [self.exp.merged_record(method, p, others, "validation", others, role="loto-sweep")
                         for p in points] if len(points) > 1 else []
                params = max(sweep, key=lambda r: r["held_in_norm"])["params"] if sweep else points[0]
                rec = self.exp.merged_record(method, params, others, "test", [t], role="loto", left_out=t)
                recs.append(rec)
                self.log("test " + _line(rec))
        return recs

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

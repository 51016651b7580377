"""Shrinking an MoE: merge or drop experts per layer into a genuinely smaller checkpoint.

Methods (per layer, from calibration data run through the MoE itself):

- ``frequency``: keep the K experts whose top-k includes the most real tokens (F-prune, NAEE's baseline);
- ``hc-smoe`` (Chen et al. 2025, arXiv:2410.08589): hierarchical clustering of the experts by their mean
  output over *all* calibration tokens (every expert run on every token, not only those routed to it),
  Euclidean distance, average linkage (the authors' scripts; their class default is Ward), down to K
  clusters; each cluster merged into one expert;
- ``mc-smoe`` (Li et al. 2024, arXiv:2310.01334): the K most used experts found K groups; every other
  expert joins the one whose column of router logits over the calibration tokens is most similar
  ((cos + 1)/2, MC-SMoE's default ``router-logits`` similarity, K per layer where MC-SMoE spreads a global
  budget over layers by frequency); each group merged;
- ``naee`` (Lu et al. 2024, arXiv:2402.14800): keep the K experts whose routed block output on the
  calibration tokens is closest to that of all experts (every subset enumerated, or a seeded sample of
  ``max_subsets`` of them), the others dropped and the router sliced.

A cluster's expert is the usage-frequency-weighted average of its members' matrices (MC-SMoE's merge,
``merge: frequency``; the plain mean when no member is used, or with ``merge: average``). Its router row is
the row of its most used member (``router: dominant``, HC-SMoE's ``prune_experts``) or the frequency-weighted
mean of the members' rows (``router: mean``); no linear row reproduces a merged softmax group exactly
(that would need log Σ exp of the members' logits). The router keeps K rows and the config says K
experts: the output is smaller on disk and in memory, unlike the reference code, which aliases merged
experts and keeps every router row. Everything that is not an expert or a router is copied unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.arch.moe_layouts import DENSE_MLP, LAYOUTS
from moerge.engine.items import InputRef, Piece, WorkItem
from moerge.engine.plan import Plan, make_plan
from moerge.errors import PlanError
from moerge.moe.upcycle import layer_order
from moerge.moe.view import MoeView, open_moe
from moerge.recipe.loader import load_recipe

SHRINK_METHODS = ("hc-smoe", "mc-smoe", "naee", "frequency")


@dataclass
class Calibration:
    """Per layer, from calibration data run through the MoE: each expert's share of real tokens routed to it
    (top-k), the Gram matrix of the router logits over tokens, and (when asked) every expert's mean output
    over all tokens and the block inputs themselves."""

    frequency: list[torch.Tensor]  # L × (E,)
    logit_gram: list[torch.Tensor]  # L × (E, E): Σ_t l_t l_tᵀ
    mean_output: list[torch.Tensor] | None  # L × (E, H)
    inputs: list[list[torch.Tensor]] | None  # L × batches × (N, H)
    tokens: int
    hidden_act: str = "silu"


def _expert_out(x: torch.Tensor, mats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], act: Any) -> torch.Tensor:
    gate, up, down = mats
    return (act(x @ gate.T) * (x @ up.T)) @ down.T  # (N, H)


def calibrate(path: Path, view: MoeView, samples: list[Any], *, max_length: int, device: str,
              outputs: bool = False, keep_inputs: bool = False, batch_size: int = 8) -> Calibration:
    """Run ``samples`` through the MoE at ``path``: routing counts and the logits' Gram from its router
    logits; with ``outputs``, every expert's mean output over every real token (run on the block's input,
    hooked); with ``keep_inputs``, those inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.activations import ACT2FN

    from moerge.data.samples import encode
    from moerge.runtime.models import check_files

    check_files(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    act = ACT2FN[model.config.hidden_act]
    L, E = view.layers, view.experts
    counts = [torch.zeros(E, dtype=torch.float64) for _ in range(L)]
    grams = [torch.zeros(E, E, dtype=torch.float64) for _ in range(L)]
    sums = [torch.zeros(E, view.hidden, dtype=torch.float64) for _ in range(L)] if outputs else None
    kept: list[list[torch.Tensor]] | None = [[] for _ in range(L)] if keep_inputs else None
    cached: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def experts(layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The layer's expert matrices, read from the checkpoint once (not once per batch)."""
        if layer not in cached:
            cached[layer] = [tuple(w.float().to(device) for w in view.expert(layer, e))  # type: ignore[misc]
                             for e in range(E)]
        return cached[layer]

    inputs: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[k].mlp.register_forward_pre_hook(
        lambda mod, args, k=k: inputs.__setitem__(k, args[0])) for k in range(L)] if outputs or keep_inputs else []
    tokens = 0
    try:
        for s in range(0, len(samples), batch_size):
            batch = encode(tok, samples[s:s + batch_size], max_length, torch.device(device))
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_router_logits=True)
                keep = batch["attention_mask"].reshape(-1).bool()
                for k, lg in enumerate(out.router_logits):
                    logits = lg.reshape(-1, E)[keep].double()
                    top = logits.topk(view.top_k, dim=-1).indices
                    counts[k] += torch.bincount(top.reshape(-1), minlength=E).double().cpu()
                    grams[k] += (logits.T @ logits).cpu()
                    if k in inputs:
                        x = inputs[k].reshape(-1, view.hidden)[keep].float()  # (N, H)
                        if kept is not None:
                            kept[k].append(x.cpu())
                        if sums is not None:
                            for e, mats in enumerate(experts(k)):
                                sums[k][e] += _expert_out(x, mats, act).sum(0).double().cpu()
            tokens += int(keep.sum())
    finally:
        for h in hooks:
            h.remove()
    total = max(tokens, 1)
    return Calibration([c / total for c in counts], grams, [s / total for s in sums] if sums is not None else None,
                       kept, tokens, str(model.config.hidden_act))


def average_linkage(points: torch.Tensor, k: int) -> list[list[int]]:
    """Agglomerative clustering of ``points`` (E, H) into ``k`` clusters: Euclidean distance, average
    linkage (the mean distance between members); ties merge the pair with the smallest indices. Clusters
    are returned sorted, each by its smallest member."""
    d = torch.cdist(points.double(), points.double())
    clusters = [[i] for i in range(points.shape[0])]
    while len(clusters) > k:
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                dist = float(d[clusters[a]][:, clusters[b]].mean())
                if best is None or dist < best[0] - 1e-12:
                    best = (dist, a, b)
        assert best is not None
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


def groups_for(method: str, calib: Calibration, layer: int, k: int, view: MoeView | None = None,
               max_subsets: int = 20000, seed: int = 0) -> list[list[int]]:
    """The experts of ``layer`` that each of the K output experts is made from."""
    freq = calib.frequency[layer]
    order = sorted(range(len(freq)), key=lambda e: (-float(freq[e]), e))
    if method == "frequency":
        return [[e] for e in sorted(order[:k])]
    if method == "mc-smoe":
        return dominant_groups(calib.logit_gram[layer], order[:k])
    if method == "naee":
        assert view is not None and calib.inputs is not None
        return [[e] for e in naee_keep(view, calib, layer, k, max_subsets=max_subsets, seed=seed)]
    assert calib.mean_output is not None
    return average_linkage(calib.mean_output[layer], k)


def dominant_groups(gram: torch.Tensor, dominant: list[int]) -> list[list[int]]:
    """MC-SMoE's grouping: the ``dominant`` (most used) experts each found a group; every other expert
    joins the dominant one whose router-logit column is most similar ((cos + 1)/2 of the columns of the
    tokens × experts logit matrix, from its Gram); ties to the lower index."""
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    sim = (gram / (norms[:, None] * norms[None, :]) + 1) / 2
    groups = {d: [d] for d in dominant}
    for e in range(gram.shape[0]):
        if e not in groups:
            best = max(sorted(dominant), key=lambda d: float(sim[e, d]))
            groups[best].append(e)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def routed_output(x: torch.Tensor, outs: torch.Tensor, rows: torch.Tensor, top_k: int, renorm: bool,
                  keep: list[int] | None = None) -> torch.Tensor:
    """The routed part of an MoE block: softmax over the router logits (of the ``keep`` experts only, the
    others' logits at −∞), top-k, renormalised when ``renorm``; ``outs`` (E, N, H) each expert's output."""
    logits = x @ rows.T  # (N, E)
    if keep is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, keep] = 0.0
        logits = logits + mask
    p = logits.softmax(-1)
    w, idx = p.topk(top_k, dim=-1)  # (N, k)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    chosen = outs.permute(1, 0, 2)[torch.arange(x.shape[0])[:, None], idx]  # (N, k, H)
    return (w[..., None] * chosen).sum(1)


def naee_keep(view: MoeView, calib: Calibration, layer: int, k: int, *, max_subsets: int, seed: int) -> list[int]:
    """NAEE's layer-wise pruning (Lu et al. 2024, arXiv:2402.14800): the K experts to keep, by enumeration
    of every subset (at most ``max_subsets``, then a seeded sample that always holds the most used K),
    minimising Σ over calibration batches of ‖Z − Z'‖_F, the block's routed output with all experts (Z)
    against with only the subset (Z'): unsquared per batch, as the authors' code (FusionBench's docs write a
    mean of squares)."""
    import itertools
    import random

    from transformers.activations import ACT2FN

    act = ACT2FN[calib.hidden_act]
    E = view.experts
    rows = view.router(layer).float()
    mats = [tuple(w.float() for w in view.expert(layer, e)) for e in range(E)]
    freq = calib.frequency[layer]
    top = sorted(sorted(range(E), key=lambda e: (-float(freq[e]), e))[:k])
    n_subsets = math.comb(E, k)
    if n_subsets <= max_subsets:
        subsets = [list(c) for c in itertools.combinations(range(E), k)]
    else:
        rng = random.Random(seed + layer)
        seen = {tuple(top)}
        while len(seen) < max_subsets:
            seen.add(tuple(sorted(rng.sample(range(E), k))))
        subsets = [list(c) for c in sorted(seen)]
    assert calib.inputs is not None
    errors = [0.0] * len(subsets)
    for x in calib.inputs[layer]:
        outs = torch.stack([_expert_out(x, m, act) for m in mats])  # (E, N, H)
        z = routed_output(x, outs, rows, view.top_k, view.norm_topk_prob)
        for j, keep in enumerate(subsets):
            errors[j] += float((z - routed_output(x, outs, rows, view.top_k, view.norm_topk_prob, keep)).norm())
    best = min(range(len(subsets)), key=lambda j: (errors[j], subsets[j]))
    return subsets[best]


def member_weights(group: list[int], freq: torch.Tensor, merge: str) -> list[float]:
    f = [float(freq[e]) for e in group]
    if merge == "frequency" and sum(f) > 0:
        return [x / sum(f) for x in f]
    return [1.0 / len(group)] * len(group)


@dataclass
class ShrinkPlan:
    plan: Plan
    view: MoeView
    k: int
    layout: str
    config: dict[str, Any]

    def close(self) -> None:
        self.plan.close()
        self.view.close()

    def add_routers(self, rows: dict[int, torch.Tensor]) -> None:
        """Router rows by layer, written in the input's dtype under the input's names."""
        v = self.view
        dtype = v.source.info(v.arch.router(0, v.layout)).dtype
        items = list(self.plan.items)
        for layer in range(v.layers):
            r = rows[layer].detach().float()
            items.append(WorkItem(name=v.arch.router(layer, v.layout), shape=tuple(r.shape), dtype=dtype, base=None,
                                  inputs=[], model_params=[], params={}, seed=0, value=r))
        self.plan.items = sorted(items, key=layer_order)

    def summary(self) -> dict[str, Any]:
        return {"architecture": self.view.arch.class_name, "experts_in": self.view.experts, "experts_out": self.k,
                "layout": self.layout, "tensors": len(self.plan.items),
                "parameters": sum(math.prod(i.shape) for i in self.plan.items),
                "output_bytes": sum(i.nbytes for i in self.plan.items), "input_bytes": self.plan.input_bytes}


def plan_shrink(path: str | Path, k: int, *, layout: str | None = None) -> ShrinkPlan:
    """Check the MoE at ``path`` and K, and plan every tensor but the experts and routers (copied); the
    experts and routers are planned by :func:`plan_experts` once the groups are known."""
    view = open_moe(path)
    try:
        if not 1 <= k < view.experts:
            raise PlanError(f"{path} has {view.experts} experts per layer; --experts must be between 1 and "
                            f"{view.experts - 1}, got {k}")
        if k < view.top_k:
            raise PlanError(f"{path} routes each token to {view.top_k} experts; it cannot keep fewer ({k})",
                            hint=f"choose --experts {view.top_k} or more")
        if view.transposed:
            raise PlanError(f"{path}: fused experts stored [E, H, 2I] are not shrunk yet")
        layout = layout or view.layout
        if layout not in LAYOUTS:
            raise PlanError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        plan = make_plan(load_recipe({"method": "passthrough", "models": [str(path)]}))
    except BaseException:
        view.close()
        raise
    expert_names = _expert_names(view)
    plan.items = [i for i in plan.items if i.name not in expert_names]
    cfg = dict(view.source.config or {})
    cfg[view.arch.experts_key] = k
    return ShrinkPlan(plan, view, k, layout, cfg)


def plan_shrink_copy(path: str | Path) -> ShrinkPlan:
    """A plan that copies the MoE at ``path`` whole but for its router rows, which
    :meth:`ShrinkPlan.add_routers` then supplies (router training)."""
    view = open_moe(path)
    try:
        plan = make_plan(load_recipe({"method": "passthrough", "models": [str(path)]}))
    except BaseException:
        view.close()
        raise
    routers = {view.arch.router(layer, view.layout) for layer in range(view.layers)}
    plan.items = [i for i in plan.items if i.name not in routers]
    return ShrinkPlan(plan, view, view.experts, view.layout, dict(view.source.config or {}))


def _expert_names(view: MoeView) -> set[str]:
    names = set()
    for layer in range(view.layers):
        names.add(view.arch.router(layer, view.layout))
        if view.layout == "fused":
            names.update(view.arch.fused(layer))
        else:
            for e in range(view.experts):
                names.update(view.arch.per_expert(layer, e))
    return names


def plan_experts(sp: ShrinkPlan, groups: list[list[list[int]]], weights: list[list[list[float]]],
                 router: str, freq: list[torch.Tensor]) -> None:
    """Add the K merged experts and the K router rows of every layer to the plan."""
    v, i, h = sp.view, sp.view.width, sp.view.hidden
    items = list(sp.plan.items)
    dtype = v.source.info(v.arch.router(0, v.layout)).dtype
    for layer in range(v.layers):
        members = list(zip(groups[layer], weights[layer]))
        if sp.layout == "fused":
            gu, dn = v.arch.fused(layer)
            items.append(_expert_item(v, layer, gu, "gate_up", (sp.k, 2 * i, h), members))
            items.append(_expert_item(v, layer, dn, "down_proj", (sp.k, h, i), members))
        else:
            for out_e, m in enumerate(members):
                for name, part in zip(v.arch.per_expert(layer, out_e), DENSE_MLP):
                    shape = (h, i) if part == "down_proj" else (i, h)
                    items.append(_expert_item(v, layer, name, part, shape, [m], stacked=False))
        rows = v.router(layer).float()
        if router == "dominant":
            new = torch.stack([rows[max(g, key=lambda e: (float(freq[layer][e]), -e))] for g in groups[layer]])
        else:
            new = torch.stack([sum(wt * rows[e] for e, wt in zip(g, ws)) for g, ws in members])
        items.append(WorkItem(name=v.arch.router(layer, sp.layout), shape=tuple(new.shape), dtype=dtype, base=None,
                              inputs=[], model_params=[], params={}, seed=0, value=new))
    sp.plan.items = sorted(items, key=layer_order)


def _expert_item(v: MoeView, layer: int, name: str, part: str, shape: tuple[int, ...],
                 members: list[tuple[list[int], list[float]]], stacked: bool = True) -> WorkItem:
    """One output expert tensor: per output expert, its members' ``part`` weighted and added."""
    groups = [[expert_piece(v, layer, e, p, wt, term) for term, (e, wt) in enumerate(zip(m, ws)) for p in _parts(part)]
              for m, ws in members]
    return WorkItem(name=name, shape=shape, dtype=_expert_dtype(v, layer), base=None, inputs=[], model_params=[],
                    params={}, seed=0, groups=groups, stacked=stacked)


def _parts(part: str) -> tuple[str, ...]:
    return ("gate_proj", "up_proj") if part == "gate_up" else (part,)


def _expert_dtype(v: MoeView, layer: int) -> str:
    name = v.arch.fused(layer)[0] if v.layout == "fused" else v.arch.per_expert(layer, 0)[0]
    return v.source.info(name).dtype


def expert_piece(v: MoeView, layer: int, e: int, part: str, weight: float, term: int) -> Piece:
    """Expert ``e``'s ``part`` (gate_proj, up_proj or down_proj) of ``layer`` as a piece of the input."""
    i, h = v.width, v.hidden
    if v.layout == "per-expert":
        name = v.arch.per_expert(layer, e)[DENSE_MLP.index(part)]
        return Piece(InputRef(0, name), scale=weight, term=term)
    gu, dn = v.arch.fused(layer)
    if part == "down_proj":
        return Piece(InputRef(0, dn), scale=weight, start=e * h * i, shape=(h, i), term=term)
    offset = e * 2 * i * h + (i * h if part == "up_proj" else 0)
    return Piece(InputRef(0, gu), scale=weight, start=offset, shape=(i, h), term=term)

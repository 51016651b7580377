"""Shrinking an MoE: merge or drop experts per layer into a genuinely smaller checkpoint.

Methods (per layer, from calibration data run through the MoE itself):

- ``frequency``: keep the K experts whose top-k includes the most real tokens (F-prune, NAEE's baseline);
- ``hc-smoe`` (Chen et al. 2025, arXiv:2410.08589): hierarchical clustering of the experts by their mean
  output over *all* calibration tokens (every expert run on every token, not only those routed to it),
  Euclidean distance, average linkage (the authors' scripts; their class default is Ward), down to K
  clusters; each cluster merged into one expert.

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
from dataclasses import dataclass, field
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

SHRINK_METHODS = ("frequency", "hc-smoe")


@dataclass
class Calibration:
    """Per layer: each expert's share of real tokens routed to it (top-k), and its mean output over all tokens."""

    frequency: list[torch.Tensor]  # L × (E,)
    mean_output: list[torch.Tensor] | None  # L × (E, H)
    tokens: int


def calibrate(path: Path, view: MoeView, samples: list[Any], *, max_length: int, device: str,
              outputs: bool, batch_size: int = 8) -> Calibration:
    """Run ``samples`` through the MoE at ``path``: routing counts from its router logits and, with
    ``outputs``, every expert's mean output over every real token (from the block's input, hooked)."""
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
    sums = [torch.zeros(E, view.hidden, dtype=torch.float64) for _ in range(L)] if outputs else None
    weights = [[tuple(w.float().to(device) for w in view.expert(layer, e)) for e in range(E)]
               for layer in range(L)] if outputs else None
    inputs: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[k].mlp.register_forward_pre_hook(
        lambda mod, args, k=k: inputs.__setitem__(k, args[0])) for k in range(L)] if outputs else []
    tokens = 0
    try:
        for s in range(0, len(samples), batch_size):
            batch = encode(tok, samples[s:s + batch_size], max_length, torch.device(device))
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_router_logits=True)
                keep = batch["attention_mask"].reshape(-1).bool()
                for k, lg in enumerate(out.router_logits):
                    top = lg.reshape(-1, E)[keep].topk(view.top_k, dim=-1).indices
                    counts[k] += torch.bincount(top.reshape(-1), minlength=E).double().cpu()
                    if sums is not None and weights is not None:
                        x = inputs[k].reshape(-1, view.hidden)[keep].float()  # (N, H)
                        for e, (gate, up, down) in enumerate(weights[k]):
                            y = (act(x @ gate.T) * (x @ up.T)) @ down.T  # (N, H)
                            sums[k][e] += y.sum(0).double().cpu()
            tokens += int(keep.sum())
    finally:
        for h in hooks:
            h.remove()
    total = max(tokens, 1)
    return Calibration([c / total for c in counts], [s / total for s in sums] if sums is not None else None, tokens)


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


def groups_for(method: str, calib: Calibration, layer: int, k: int) -> list[list[int]]:
    """The experts of ``layer`` that each of the K output experts is made from."""
    freq = calib.frequency[layer]
    if method == "frequency":
        order = sorted(range(len(freq)), key=lambda e: (-float(freq[e]), e))
        return [[e] for e in sorted(order[:k])]
    assert calib.mean_output is not None
    return average_linkage(calib.mean_output[layer], k)


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
    groups: list[list[list[int]]] = field(default_factory=list)  # per layer, per output expert: members
    weights: list[list[list[float]]] = field(default_factory=list)

    def close(self) -> None:
        self.plan.close()
        self.view.close()

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
    sp.groups, sp.weights = groups, weights
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

"""SMEAR (Muqeeth, Liu & Raffel, 2024, "Soft Merging of Experts with Adaptive Routing", TMLR,
arXiv:2306.03745), recycled: a router per module over *frozen* experts, trained on the union of the
experts' data, whose weights average the experts' parameters once per example.

The reference (r-three/smear) trains adapters and routers together from scratch: per example, the mean of
the adapter input over the sequence (padding included), an affine LayerNorm, a linear map to one logit per
expert (initialised N(0, 0.01²), bias 0), a softmax over all experts (no top-k), expert dropout 0.1 in
training, then one adapter forward with the probability-weighted parameters. Here the experts are given
and only the router trains. For LoRA experts, the forward with Σ p_e ΔW_e equals the p-weighted sum of
the experts' outputs, so the routed layer's ``mix: outputs`` *is* SMEAR's parameter merge. Deviations, both
documented in docs/routing.md: the mean runs over real tokens up to each position (causal; see
:mod:`moerge.routing.layer`), and the affine LayerNorm is folded into the router's rows and biases
(``LN(x)·w + b`` with a non-affine LayerNorm spans the same functions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moerge.routing.data import Sample, encode, target_loss
from moerge.routing.experts import ExpertSet
from moerge.routing.layer import RoutedLinear, RouterOptions, routed_layers
from moerge.routing.phatgoose import GateSettings, order, schedule


def train_router(model: nn.Module, tok: Any, experts: ExpertSet, n_task: int, data: list[list[Sample]],
                 settings: GateSettings, options: RouterOptions,
                 progress: Callable[[int, int, float], None] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Router rows and biases of every module, trained on the union of ``data`` (interleaved by a seeded
    permutation) with the experts and the base frozen. ``model`` (the base) gets routed layers in place."""
    from moerge.routing.load import attach_experts

    settings.check()
    g = torch.Generator().manual_seed(settings.seed)
    d_in = {m: experts.base.info(m + ".weight").shape[1] for m in experts.modules}
    rows = {m: torch.randn(n_task, d, generator=g) * settings.init_scale for m, d in d_in.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    attach_experts(model, experts, n_task, rows, options)
    params = []
    for layer in routed_layers(model).values():
        assert isinstance(layer, RoutedLinear)
        for name in ("router_rows", "router_bias"):
            value = getattr(layer, name)
            delattr(layer, name)
            setattr(layer, name, nn.Parameter(value.clone()))
            params.append(getattr(layer, name))
        layer.expert_dropout = settings.expert_dropout
    union = [s for samples in data[:n_task] for s in samples]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = schedule(opt, settings)
    per_step = settings.batch_size * settings.accumulate
    picks = order(len(union), settings.steps * per_step, settings.seed)
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)  # expert dropout
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(settings.steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(settings.accumulate):
            lo = step * per_step + k * settings.batch_size
            batch = encode(tok, [union[i] for i in picks[lo:lo + settings.batch_size]], settings.max_length, device)
            loss = target_loss(model, batch) / settings.accumulate
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        losses.append(total)
        if progress:
            progress(step + 1, settings.steps, total)
    model.eval()
    out_rows = {n: layer.router_rows.detach().float().cpu() for n, layer in routed_layers(model).items()}
    out_bias = {n: layer.router_bias.detach().float().cpu() for n, layer in routed_layers(model).items()}
    tenth = max(1, len(losses) // 10)
    log = {"steps": settings.steps, "sequences": settings.steps * per_step, "examples": len(union),
           "seconds": round(time.perf_counter() - t0, 2), "loss_first": round(sum(losses[:tenth]) / tenth, 5),
           "loss_last": round(sum(losses[-tenth:]) / tenth, 5), "loss_finite": all(math.isfinite(x) for x in losses)}
    return out_rows, out_bias, log

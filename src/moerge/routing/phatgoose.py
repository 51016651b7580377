"""PHATGOOSE (Muqeeth et al., 2024, "Learning to Route Among Specialized Experts for Zero-Shot
Generalization", arXiv:2402.05859): after each expert is trained, a gate vector v per module is trained on
that expert's own data with everything else frozen, and the gates then serve as router rows.

Gate training, as the reference (r-three/phatgoose) computes it: v starts at zero; in each adapted module
the LoRA's input is scaled per token by σ(x · v), so ``y = W x + σ(x · v) · s B A x``; only the gates
train, with AdamW (lr 5e-3, no weight decay) for 100 steps, constant after a 6% linear warm-up. The
reference's batch is 1024 sequences (32 × 32 accumulation) on T5-XL; ``batch_size`` × ``accumulate`` is
what this machine affords and is recorded in the bundle. mttl's re-implementation (lr 1e-3, batch 4,
linear decay after 10% warm-up) is ``schedule="linear"`` with those values.

Routing (per token, per module): ``LN(x) · LN(v_e) / √d`` with a LayerNorm without affine, softmax over all
experts, the top 2, renormalised by their sum + 1e-6 (the reference; ``renorm_eps=0`` is mttl's top-2
softmax). The gate's sigmoid is not applied at inference.

Gates train one expert at a time on one loaded base model (the expert's layers swapped in and back out),
so memory is the base model plus one expert; each finished expert's gates are saved in a work folder
beside the output, and a rerun with the same settings picks up from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moerge.routing.data import Sample, encode, target_loss
from moerge.routing.experts import ExpertSet


@dataclass(frozen=True)
class GateSettings:
    steps: int = 100
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup: float = 0.06
    schedule: str = "constant"  # constant (the reference) | linear (decay to 0 after warm-up, mttl)
    batch_size: int = 8
    accumulate: int = 1
    max_length: int = 64
    seed: int = 0
    expert_dropout: float = 0.1  # SMEAR only: each expert's weight dropped with this probability in training
    init_scale: float = 1e-2  # SMEAR only: router rows start as N(0, init_scale²), biases at 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.accumulate < 1 or self.max_length < 2:
            raise ValueError("steps, batch size and accumulation must be at least 1 (max length at least 2)")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise ValueError("lr must be positive, warmup in [0, 1), weight decay at least 0")
        if not 0 <= self.expert_dropout < 1 or self.init_scale < 0:
            raise ValueError("expert dropout must be in [0, 1) and the init scale at least 0")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be constant or linear; got {self.schedule!r}")


class GatedLinear(nn.Linear):
    """The base linear layer plus one frozen LoRA expert whose input is scaled per token by σ(x · v)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("a", a.to(device, dtype), persistent=False)
        self.register_buffer("b", b_scaled.to(device, dtype), persistent=False)
        self.gate = nn.Parameter(torch.zeros(base.in_features, device=device, dtype=torch.float32))
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x.float() @ self.gate).to(x.dtype).unsqueeze(-1)
        return F.linear(x, self.weight, self.bias) + g * ((x @ self.a.T) @ self.b.T)


def schedule(opt: torch.optim.Optimizer, s: GateSettings) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, round(s.warmup * s.steps)) if s.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if s.schedule == "constant":
            return 1.0
        return max(0.0, (s.steps - step) / max(1, s.steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def order(n: int, total: int, seed: int) -> list[int]:
    """``total`` example indices: seeded permutations of range(n), one after another."""
    rng, out = random.Random(seed), []
    while len(out) < total:
        perm = list(range(n))
        rng.shuffle(perm)
        out += perm
    return out[:total]


def train_gates(model: nn.Module, tok: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                samples: list[Sample], settings: GateSettings,
                progress: Callable[[int, int, float], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train one expert's gates (``factors``: module → (A, B, scale)) on ``samples``; returns the gate vector
    of every module (float32, CPU) and the training log. ``model`` is the base; it is left as it was."""
    settings.check()
    if not samples:
        raise ValueError("no training examples for the gates")
    torch.manual_seed(settings.seed)
    modules = dict(model.named_modules())
    originals: dict[str, nn.Linear] = {}
    gated: dict[str, GatedLinear] = {}
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, (a, b, scale) in factors.items():
            parent, _, child = name.rpartition(".")
            holder = modules[parent] if parent else model
            originals[name] = getattr(holder, child)
            gated[name] = GatedLinear(originals[name], a, b * scale)
            setattr(holder, child, gated[name])
        gates = [g.gate for g in gated.values()]
        opt = torch.optim.AdamW(gates, lr=settings.lr, weight_decay=settings.weight_decay)
        sched = schedule(opt, settings)
        per_step = settings.batch_size * settings.accumulate
        picks = order(len(samples), settings.steps * per_step, settings.seed)
        device = next(model.parameters()).device
        model.train()
        t0, losses = time.perf_counter(), []
        for step in range(settings.steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for k in range(settings.accumulate):
                idx = picks[step * per_step + k * settings.batch_size:step * per_step + (k + 1) * settings.batch_size]
                batch = encode(tok, [samples[i] for i in idx], settings.max_length, device)
                loss = target_loss(model, batch) / settings.accumulate
                loss.backward()
                total += float(loss.detach())
            opt.step()
            sched.step()
            losses.append(total)
            if progress:
                progress(step + 1, settings.steps, total)
        seconds = time.perf_counter() - t0
    finally:
        for name, layer in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, layer)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    first, last = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    log = {"steps": settings.steps, "sequences": settings.steps * per_step, "seconds": round(seconds, 2),
           "loss_first": round(sum(first) / len(first), 5), "loss_last": round(sum(last) / len(last), 5),
           "loss_finite": all(math.isfinite(x) for x in losses)}
    return {n: g.gate.detach().float().cpu() for n, g in gated.items()}, log


def samples_hash(samples: list[Sample]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for s in samples:
        h.update(json.dumps([s.prompt, s.target]).encode())
    return h.hexdigest()


def all_gates(model: nn.Module, tok: Any, experts: ExpertSet, n_task: int, data: list[list[Sample]],
              settings: GateSettings, work: Path,
              progress: Callable[[str, int, int, float], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Router rows [E, d_in] per module: each task expert's gates, trained one expert at a time; finished
    experts are kept in ``work`` (safetensors + their settings) and reused by a rerun."""
    from safetensors.torch import load_file, save_file

    work.mkdir(parents=True, exist_ok=True)
    per_expert: list[dict[str, torch.Tensor]] = []
    logs: dict[str, Any] = {}
    for e, expert in enumerate(experts.experts[:n_task]):
        key = {"settings": asdict(settings), "data": samples_hash(data[e]),
               "expert": hashlib.blake2b((expert.folder / "adapter_model.safetensors").read_bytes(),
                                         digest_size=8).hexdigest()}
        saved, meta = work / f"{e:03d}-{expert.name}.safetensors", work / f"{e:03d}-{expert.name}.json"
        if saved.exists() and meta.exists() and json.loads(meta.read_text()).get("key") == key:
            per_expert.append(load_file(str(saved)))
            logs[expert.name] = {**json.loads(meta.read_text())["log"], "resumed": True}
            continue
        factors = {m: experts.factors(m)[e] for m in experts.modules}
        gates, log = train_gates(model, tok, factors, data[e], settings,
                                 progress=(lambda k, n, loss, name=expert.name: progress(name, k, n, loss))
                                 if progress else None)
        save_file({m: g.contiguous() for m, g in gates.items()}, str(saved))
        meta.write_text(json.dumps({"key": key, "log": log}))
        per_expert.append(gates)
        logs[expert.name] = log
    rows = {m: torch.stack([g[m] for g in per_expert]) for m in experts.modules}
    return rows, logs

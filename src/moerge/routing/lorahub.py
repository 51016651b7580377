"""LoraHub (Huang et al., 2024, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", COLM, arXiv:2307.13269): weights w for N experts found gradient-free on a few examples of a
new task, then one plain adapter out.

The search, as the reference (sail-sg/lorahub ``algorithm.py``) runs it: nevergrad's ``NGOpt`` over
w ∈ [−1.5, 1.5]^N from w = 0, a budget of 40 evaluations; objective = the few-shot loss + 0.05 · mean |w|.
The reference's loss sums each batch's mean cross-entropy and divides by the *number of examples* (so
with one batch of 5 the cross-entropy enters as CE/5 and the L1 term weighs 5× more than it appears);
``loss: reference`` reproduces that, ``loss: mean`` is the mean cross-entropy per example. mttl's variant
has no L1 (``l1: 0``).

Composition differs on purpose: the reference weights every A and every B by w_i and adds them, so its
update is (Σ w_i B_i)(Σ w_i A_i), with cross terms B_i A_j and w_i² on each expert's own product. moerge
combines the updates exactly, ΔW = Σ w_i s_i B_i A_i, and writes it as one LoRA adapter of rank Σ r_i
(A stacked, B concatenated with w_i s_i folded in, scale 1): PEFT loads it as any adapter.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.routing.data import Sample, encode, per_example_loss
from moerge.routing.experts import ExpertSet
from moerge.routing.layer import routed_layers


@dataclass(frozen=True)
class HubSettings:
    budget: int = 40
    bound: float = 1.5
    l1: float = 0.05
    loss: str = "reference"  # reference (Σ batch-mean CE / examples) | mean (mean CE per example)
    batch_size: int = 5
    max_length: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.budget < 1 or self.batch_size < 1 or not self.bound > 0 or self.l1 < 0:
            raise ValueError("budget and batch size must be at least 1, bound positive, l1 at least 0")
        if self.loss not in ("reference", "mean"):
            raise ValueError(f"loss must be reference or mean; got {self.loss!r}")


def objective(model: nn.Module, tok: Any, samples: list[Sample], weights: torch.Tensor, s: HubSettings) -> float:
    """The few-shot loss of the model with every routed layer at fixed ``weights``, plus the L1 term."""
    for layer in routed_layers(model).values():
        layer.fixed = weights
    device = next(model.parameters()).device
    total, n = 0.0, len(samples)
    with torch.no_grad():
        for i in range(0, n, s.batch_size):
            batch = encode(tok, samples[i:i + s.batch_size], s.max_length, device)
            per = per_example_loss(model, batch)
            tokens = (batch["labels"][:, 1:] != -100).sum(1).clamp_min(1).float()
            if s.loss == "reference":  # the batch's mean token CE, summed over batches, / examples
                total += float(per.sum() / tokens.sum()) / n
            else:
                total += float((per / tokens).sum()) / n
    return total + s.l1 * float(weights.abs().mean())


def search(model: nn.Module, tok: Any, samples: list[Sample], n: int, s: HubSettings,
           progress: Callable[[int, int, float], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The weights nevergrad's NGOpt finds within the budget (and the search log)."""
    import nevergrad as ng
    import numpy as np

    s.check()
    param = ng.p.Array(init=np.zeros(n), lower=-s.bound, upper=s.bound)
    param.random_state = np.random.RandomState(s.seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=s.budget)
    history: list[float] = []
    t0 = time.perf_counter()

    def f(w: Any) -> float:
        value = objective(model, tok, samples, torch.tensor(w, dtype=torch.float32), s)
        history.append(value)
        if progress:
            progress(len(history), s.budget, min(history))
        return value

    best = opt.minimize(f)
    w = torch.tensor(best.value, dtype=torch.float32)
    final = objective(model, tok, samples, w, s)
    zero = objective(model, tok, samples, torch.zeros(n), s)
    for layer in routed_layers(model).values():
        layer.fixed = None
    log = {"optimizer": opt.name if hasattr(opt, "name") else type(opt).__name__, "evaluations": len(history),
           "seconds": round(time.perf_counter() - t0, 2), "objective": final, "objective_at_zero": zero,
           "history": [round(h, 6) for h in history], "finite": all(math.isfinite(h) for h in history)}
    return w, log


def write_merged_adapter(experts: ExpertSet, weights: torch.Tensor, tmp: Path, record: dict[str, Any]) -> None:
    """One PEFT adapter whose ΔW is Σ w_i s_i B_i A_i in every module (rank Σ r_i, scale 1)."""
    from safetensors.torch import save_file

    tensors, ranks = {}, {}
    for module in experts.modules:
        factors = experts.factors(module)
        a = torch.cat([f[0] for f in factors])
        b = torch.cat([float(w) * s * bb for w, (_, bb, s) in zip(weights.tolist(), factors)], dim=1)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        ranks[module] = a.shape[0]
    rank = max(ranks.values())
    other = {m: r for m, r in ranks.items() if r != rank}  # scale 1 everywhere: alpha = r per module
    first = json.loads((experts.adapters[0].folder / "adapter_config.json").read_text())
    config = {**{k: v for k, v in first.items() if k not in ("rank_pattern", "alpha_pattern", "use_rslora")},
              "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
              "target_modules": sorted(experts.modules), "rank_pattern": other, "alpha_pattern": other}
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "moerge_lorahub.json").write_text(json.dumps(record, indent=1))


def run(base: str | Path, adapters: list[Path], data: str, out: Path, *, examples: int | None,
        settings: HubSettings, force: bool, progress: Callable[[int, int, float], None] | None) -> Path:
    """Search the weights on ``data`` and publish the merged adapter at ``out``."""
    from moerge.errors import MoergeError
    from moerge.io.publish import Publication, check_not_an_input
    from moerge.routing.build import base_model
    from moerge.routing.data import load_samples
    from moerge.routing.layer import RouterOptions
    from moerge.routing.load import attach_experts
    from moerge.version import __version__

    try:
        import nevergrad  # noqa: F401
    except ImportError:
        raise MoergeError("LoraHub's search needs nevergrad", hint="pip install 'moerge[route]'") from None
    check_not_an_input(out, [Path(base), *adapters])
    if out.exists() and not force:
        raise MoergeError(f"{out} already exists", hint="pass --force to replace it")
    samples = load_samples(data, limit=examples)
    model, tok = base_model(base)
    with ExpertSet(base, adapters) as experts:
        n = len(adapters)
        rows = {m: torch.zeros(n, experts.base.info(m + ".weight").shape[1]) for m in experts.modules}
        attach_experts(model, experts, n, rows, RouterOptions(top_k=n))
        weights, log = search(model, tok, samples, n, settings, progress)
        record = {"method": "lorahub", "weights": dict(zip([e.name for e in experts.experts], weights.tolist())),
                  "experts": [str(a.resolve()) for a in adapters], "data": data, "examples": len(samples),
                  "settings": asdict(settings), "search": log, "moerge": __version__}
        with Publication(out, force=force) as pub:
            write_merged_adapter(experts, weights, pub.tmp, record)
            pub.commit()
    return out

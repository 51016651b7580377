"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher information.

    θ* = Σᵢ cᵢ(Fᵢ + ε)θᵢ / Σᵢ cᵢ(Fᵢ + ε)

with ε = ``epsilon`` (MergeLM's ``minimal_fisher_weight``, 1e-6) and cᵢ the models' weights. With
``normalize`` (default, as in MergeLM and FusionBench), cᵢ ← cᵢ·(1/‖Fᵢ‖) / Σⱼ(1/‖Fⱼ‖), where ‖Fᵢ‖
is the L2 norm of model i's whole Fisher (read from its ``moerge_stats.json``), so a model whose
loss is simply sharper does not dominate. Elementwise, so it streams in blocks like a linear merge.
Tensors without a Fisher are averaged with weights cᵢ.

Statistics: ``moerge stats fisher`` (empirical, or ``--estimator true``).
"""

from __future__ import annotations

from typing import Any

import torch

from moerge.methods.base import Param, register
from moerge.methods.data_aware import STATS_WEIGHT, StatsSource, average
from moerge.methods.protocol import TensorMerger


class FisherMerger(TensorMerger):
    def __init__(self, coeff: list[float], epsilon: float, stats: StatsSource) -> None:
        self.coeff = coeff
        self.epsilon = epsilon
        self.stats = stats

    def emit(self, start, base, models) -> torch.Tensor:
        stop = start + models[0].numel()
        num = torch.zeros_like(models[0])
        den = torch.zeros_like(models[0])
        for k, (c, m) in enumerate(zip(self.coeff, models)):
            w = self.stats.block(k, start, stop).add_(self.epsilon).mul_(c)
            den.add_(w)
            num.addcmul_(w, m)
        return num.div_(den)


def fisher_coefficients(weight: list[float], norms: list[float] | None) -> list[float]:
    """cᵢ, normalised by the models' global Fisher norms when ``norms`` are given."""
    if norms is None:
        return list(weight)
    if any(n <= 0 for n in norms):
        raise ValueError("a model's Fisher is zero everywhere; it cannot be normalised (set normalize: false)")
    inv = [1.0 / n for n in norms]
    return [w * v / sum(inv) for w, v in zip(weight, inv)]


@register(
    "fisher",
    params=(
        STATS_WEIGHT,
        Param("normalize", bool, True, "divide each model's Fisher by its global L2 norm first", constant=True),
        Param("epsilon", float, 1e-6, "added to every Fisher entry (so parameters no example moved are "
              "still averaged, not divided by zero)", low=0.0, low_open=True, constant=True),
    ),
    summary="per-parameter average weighted by each model's diagonal Fisher (needs `moerge stats fisher` "
    "per model)",
    citation="Matena & Raffel 2022, Merging models with Fisher-weighted averaging (arXiv:2111.09832)",
    needs_base=False,
    min_models=1,
    stats=("fisher",),
)
def fisher(shape: tuple[int, ...], *, weight: list[float], normalize: bool, epsilon: float,
           stats: StatsSource | None = None, notes: dict[str, Any] | None = None) -> TensorMerger:
    """θ* = Σ cᵢ(Fᵢ+ε)θᵢ / Σ cᵢ(Fᵢ+ε)."""
    if stats is None:
        return average(weight, notes)
    norms = [stats.norm(k) for k in range(len(weight))] if normalize else None
    return FisherMerger(fisher_coefficients(weight, norms), epsilon, stats)

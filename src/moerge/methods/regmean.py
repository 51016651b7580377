"""RegMean: the merge that best reproduces every expert's layer outputs on its own inputs.

For a linear layer with weight W (out × in) and input Gram matrices Gᵢ = XᵢᵀXᵢ / rows,
minimising Σᵢ cᵢ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² gives

    W* = (Σᵢ cᵢ Wᵢ G̃ᵢ) (Σᵢ cᵢ G̃ᵢ + ρI)⁻¹,     G̃ᵢ = α·Gᵢ + (1−α)·diag(Gᵢ),

i.e. W*ᵀ = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ of the paper, with ρ = ``ridge`` × the mean diagonal entry of
Σ cᵢG̃ᵢ. The system is factorised once per layer in float64 (Cholesky); the output is then
streamed by blocks of rows as Σᵢ Wᵢ[rows]·Pᵢ with Pᵢ = cᵢ G̃ᵢ (Σ cG̃ + ρI)⁻¹. Tensors without a
Gram matrix (biases, norms, embeddings) are averaged with weights cᵢ.

Statistics: ``moerge stats gram`` (or the input factor of ``moerge stats kfac``).
"""

from __future__ import annotations

from typing import Any

import torch

from moerge.methods.base import register
from moerge.methods.data_aware import ALPHA, RIDGE, STATS_WEIGHT, StatsSource, average, shrink
from moerge.methods.protocol import TensorMerger


def regularised_system(grams: list[torch.Tensor], weight: list[float], alpha: float, ridge: float,
                       what: str, notes: dict[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(cᵢ·G̃ᵢ in float64, the Cholesky factor of Σ cᵢG̃ᵢ + ρI); records the conditioning in ``notes``."""
    shrunk = [shrink(g.double(), alpha).mul_(c) for g, c in zip(grams, weight)]
    system = torch.zeros_like(shrunk[0])
    for g in shrunk:  # summed in place: one extra in × in matrix, not a stack of them
        system.add_(g)
    rho = ridge * float(system.diagonal().mean())
    system.diagonal().add_(rho)
    factor, info = torch.linalg.cholesky_ex(system)
    del system
    if int(info) != 0:
        raise ValueError(
            f"the sum of the models' Gram matrices ({what}) is singular or not positive definite even "
            f"with ridge {ridge:g}; raise 'ridge' (e.g. 1e-4), or check the statistics")
    pivots = factor.diagonal()
    cond = float((pivots.max() / pivots.min()) ** 2)  # a cheap estimate (exact for diagonal systems)
    worst = notes.setdefault("condition_estimate", {})
    worst[what] = cond
    return shrunk, factor


class RegMeanMerger(TensorMerger):
    row_aligned = True

    def __init__(self, shape: tuple[int, ...], weight: list[float], alpha: float, ridge: float,
                 stats: StatsSource, name: str, notes: dict[str, Any]) -> None:
        if len(shape) != 2:
            raise ValueError(f"regmean statistics belong to 2-D weights, this tensor is {list(shape)}")
        grams = [stats.whole(k) for k in range(len(weight))]
        if any(g.shape != (shape[1], shape[1]) for g in grams):
            raise ValueError(f"its Gram matrices should be {shape[1]}×{shape[1]}, got {list(grams[0].shape)}")
        shrunk, factor = regularised_system(grams, weight, alpha, ridge, name, notes)
        del grams
        # Pᵢ = (A⁻¹ cᵢG̃ᵢ)ᵀ with A symmetric: the output rows are Σᵢ Wᵢ[rows] Pᵢ (each cᵢG̃ᵢ freed once used)
        self.proj = []
        while shrunk:
            self.proj.append(torch.cholesky_solve(shrunk.pop(0), factor).T.to(torch.float32).contiguous())
        self.cols = shape[1]
        notes["solved_layers"] = notes.get("solved_layers", 0) + 1

    def emit(self, start, base, models) -> torch.Tensor:
        out = torch.zeros(models[0].numel() // self.cols, self.cols, dtype=torch.float32, device=models[0].device)
        for p, m in zip(self.proj, models):
            out.addmm_(m.view(-1, self.cols), p)
        return out.view(-1)


@register(
    "regmean",
    params=(STATS_WEIGHT, ALPHA, RIDGE),
    summary="per linear layer, the weights that best reproduce every expert's outputs on its inputs "
    "(needs `moerge stats gram` per model)",
    citation="Jin et al. 2023, Dataless knowledge fusion by merging weights of language models "
    "(arXiv:2212.09849)",
    needs_base=False,
    min_models=1,
    stats=("gram", "kfac"),
)
def regmean(shape: tuple[int, ...], *, weight: list[float], alpha: float, ridge: float,
            stats: StatsSource | None = None, name: str = "", notes: dict[str, Any] | None = None) -> TensorMerger:
    """W* = (Σ cᵢWᵢG̃ᵢ)(Σ cᵢG̃ᵢ + ρI)⁻¹ for linear weights with statistics; Σ cᵢθᵢ/Σ cᵢ for the rest."""
    notes = notes if notes is not None else {}
    if stats is None:
        return average(weight, notes)
    return RegMeanMerger(shape, weight, alpha, ridge, stats, name, notes)

"""Model Breadcrumbs: drop both the smallest and the largest task-vector entries."""

from __future__ import annotations

import torch

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.consensus import combine
from moerge.methods.sparsify import breadcrumbs_counts, rank_window_mask
from moerge.methods.ties import TIES_CONVENTIONS

CITATION = ("Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with "
            "Sparse Masks (ECCV 2024, arXiv:2312.06795)")
BREADCRUMBS_PARAMS = (
    WEIGHT,
    Param("density", float, 0.9, "fraction of task-vector entries kept per tensor", per_model=True,
          low=0.0, high=1.0, low_open=True, defaults={"mergekit": 1.0}),
    Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped per tensor (the "
          "outliers)", per_model=True, low=0.0, high=1.0, high_open=True),
    LAMBDA,
)


def breadcrumbs_sparsifier(density: list[float], gamma: list[float]):
    """Keep the entries ranked between the bottom (1−density−γ) and the top γ by magnitude.

    Unlike mergekit, a tensor too small for ⌊γn⌋ ≥ 1 drops no outlier and is
    *not* zeroed (mergekit's slice ``[n_bot:-0]`` is empty).
    """

    def sparsify(i: int, d: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        n_bot, n_top = breadcrumbs_counts(d.numel(), density[i], gamma[i])
        if n_bot == 0 and n_top == 0:
            return None, 1.0
        return rank_window_mask(d, n_bot, n_top), 1.0

    return sparsify


@register(
    "breadcrumbs",
    params=(*BREADCRUMBS_PARAMS, Param("normalize", bool, False, "divide by the sum of the weights")),
    summary="drop the smallest and the largest task-vector entries, then task arithmetic",
    citation=CITATION,
    needs_base=True,
)
def breadcrumbs(base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float],
                density: list[float], gamma: list[float], lam: float, normalize: bool) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢ·window(τᵢ)."""
    return combine(base, models, weight=weight, lam=lam,
                   sparsify=breadcrumbs_sparsifier(density, gamma), consensus=None,
                   normalize=normalize)


@register(
    "breadcrumbs_ties",
    params=(*BREADCRUMBS_PARAMS,
            Param("normalize", bool, True, "disjoint mean (true) or disjoint sum (false)",
                  defaults={"mergekit": False}),
            *[p for p in TIES_CONVENTIONS if p.name != "trim_scope"]),
    summary="Breadcrumbs masks, then TIES sign election and disjoint merge",
    citation=CITATION,
    needs_base=True,
)
def breadcrumbs_ties(base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float],
                     density: list[float], gamma: list[float], lam: float, normalize: bool,
                     sign_election: str, consensus_method: str, divisor: str) -> torch.Tensor:
    """θ₀ + λ·disjoint-merge(elect(window(τᵢ)))."""
    return combine(base, models, weight=weight, lam=lam,
                   sparsify=breadcrumbs_sparsifier(density, gamma), consensus=consensus_method,
                   sign_election=sign_election, normalize=normalize, divisor=divisor,
                   zero_sign="plus" if sign_election == "weighted" else "majority")

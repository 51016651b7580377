"""Model Breadcrumbs: drop both the smallest and the largest task-vector entries."""

from __future__ import annotations

import math

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.masks import breadcrumbs_counts
from moerge.methods.task_vector import RankWindowSparsifier, Sparsifier, TaskVectorMerger
from moerge.methods.ties import TIES_CONVENTIONS, zero_sign_rule

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


def breadcrumbs_sparsifiers(shape: tuple[int, ...], density: list[float], gamma: list[float]) -> list[Sparsifier]:
    """Keep the entries ranked between the bottom (1 − density − γ) and the top γ by magnitude.

    A tensor too small for ⌊γn⌋ ≥ 1 drops no outlier and is *not* zeroed (older
    mergekit releases zeroed it: their slice ``[n_bot:-0]`` was empty).
    """
    n = math.prod(shape)
    out: list[Sparsifier] = []
    for dens, gam in zip(density, gamma):
        n_bot, n_top = breadcrumbs_counts(n, dens, gam)
        out.append(RankWindowSparsifier(n, n_bot, n - n_top) if n_bot or n_top else Sparsifier())
    return out


@register(
    "breadcrumbs",
    params=(*BREADCRUMBS_PARAMS, Param("normalize", bool, False, "divide by the sum of the weights")),
    summary="drop the smallest and the largest task-vector entries, then task arithmetic",
    citation=CITATION,
    needs_base=True,
)
def breadcrumbs(shape: tuple[int, ...], *, weight: list[float], density: list[float], gamma: list[float],
                lam: float, normalize: bool) -> TaskVectorMerger:
    """θ₀ + λ·Σ wᵢ·window(τᵢ)."""
    return TaskVectorMerger(weight=weight, lam=lam, normalize=normalize,
                            sparsifiers=breadcrumbs_sparsifiers(shape, density, gamma))


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
def breadcrumbs_ties(shape: tuple[int, ...], *, weight: list[float], density: list[float], gamma: list[float],
                     lam: float, normalize: bool, sign_election: str, consensus_method: str,
                     divisor: str) -> TaskVectorMerger:
    """θ₀ + λ·disjoint-merge(elect(window(τᵢ)))."""
    return TaskVectorMerger(weight=weight, lam=lam, sparsifiers=breadcrumbs_sparsifiers(shape, density, gamma),
                            consensus=consensus_method, sign_election=sign_election, normalize=normalize,
                            divisor=divisor, zero_sign=zero_sign_rule(sign_election))

"""DARE: drop task-vector entries at random and rescale the survivors, then merge."""

from __future__ import annotations

import torch

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.consensus import combine
from moerge.methods.sparsify import bernoulli_keep, tensor_seed
from moerge.methods.ties import TIES_CONVENTIONS

RESCALE_NORM = ("inverse_density", "l1")
CITATION = ("Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous "
            "Models as a Free Lunch (ICML 2024, arXiv:2311.03099)")

DARE_PARAMS = (
    WEIGHT,
    Param("density", float, 0.5, "probability that a task-vector entry is kept (1 − drop rate)",
          per_model=True, low=0.0, high=1.0, low_open=True, defaults={"mergekit": 1.0}),
    LAMBDA,
    Param("rescale", bool, True, "rescale the kept entries so the task vector keeps its size"),
    Param("rescale_norm", str, "inverse_density", "divide by the density (paper, PEFT, "
          "FusionBench) or match the L1 norm of the original task vector per tensor (mergekit)",
          choices=RESCALE_NORM, defaults={"mergekit": "l1"}, gradient=False, in_mergekit=False),
)


def dare_sparsifier(density: list[float], rescale: bool, rescale_norm: str, seed: int):
    """Model i's keep-mask ~ Bernoulli(densityᵢ), seeded per (tensor, model), and its rescale."""

    def sparsify(i: int, d: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        p = density[i]
        if p >= 1.0:
            return None, 1.0
        mask = bernoulli_keep(d.shape, p, tensor_seed(seed, i), device=d.device)
        if not rescale:
            return mask, 1.0
        if rescale_norm == "inverse_density":
            return mask, 1.0 / p
        before = float(d.abs().sum(dtype=torch.float64))
        after = float((d * mask).abs().sum(dtype=torch.float64))
        if before < 1e-7 or after < 1e-7:
            return mask, 1.0
        return mask, before / after

    return sparsify


@register(
    "dare_linear",
    params=(*DARE_PARAMS, Param("normalize", bool, False, "divide by the sum of the weights")),
    summary="drop task-vector entries at random with rescaling, then task arithmetic",
    citation=CITATION,
    needs_base=True,
)
def dare_linear(base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float],
                density: list[float], lam: float, rescale: bool, rescale_norm: str,
                normalize: bool, seed: int = 0) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢ·DARE(τᵢ)."""
    return combine(base, models, weight=weight, lam=lam,
                   sparsify=dare_sparsifier(density, rescale, rescale_norm, seed),
                   consensus=None, normalize=normalize)


@register(
    "dare_ties",
    params=(*DARE_PARAMS,
            Param("normalize", bool, True, "disjoint mean (true) or disjoint sum (false)",
                  defaults={"mergekit": False}),
            *[p for p in TIES_CONVENTIONS if p.name != "trim_scope"]),
    summary="drop task-vector entries at random with rescaling, then TIES sign election and disjoint merge",
    citation=CITATION,
    needs_base=True,
)
def dare_ties(base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float],
              density: list[float], lam: float, rescale: bool, rescale_norm: str, normalize: bool,
              sign_election: str, consensus_method: str, divisor: str, seed: int = 0) -> torch.Tensor:
    """θ₀ + λ·disjoint-merge(elect(DARE(τᵢ)))."""
    return combine(base, models, weight=weight, lam=lam,
                   sparsify=dare_sparsifier(density, rescale, rescale_norm, seed),
                   consensus=consensus_method, sign_election=sign_election,
                   normalize=normalize, divisor=divisor,
                   zero_sign="plus" if sign_election == "weighted" else "majority")

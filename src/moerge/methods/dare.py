"""DARE: drop task-vector entries at random and rescale the survivors, then merge."""

from __future__ import annotations

import math

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.task_vector import TaskVectorMerger, drop_sparsifiers
from moerge.methods.ties import TIES_CONVENTIONS, zero_sign_rule

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



@register(
    "dare_linear",
    params=(*DARE_PARAMS, Param("normalize", bool, False, "divide by the sum of the weights")),
    summary="drop task-vector entries at random with rescaling, then task arithmetic",
    citation=CITATION,
    needs_base=True,
)
def dare_linear(shape: tuple[int, ...], *, weight: list[float], density: list[float], lam: float,
                rescale: bool, rescale_norm: str, normalize: bool, seed: int = 0) -> TaskVectorMerger:
    """θ₀ + λ·Σ wᵢ·DARE(τᵢ): keep each entry with probability p, seeded per (seed, tensor, model)."""
    return TaskVectorMerger(weight=weight, lam=lam, normalize=normalize,
                            sparsifiers=drop_sparsifiers(math.prod(shape), density, seed, rescale, rescale_norm))


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
def dare_ties(shape: tuple[int, ...], *, weight: list[float], density: list[float], lam: float, rescale: bool,
              rescale_norm: str, normalize: bool, sign_election: str, consensus_method: str, divisor: str,
              seed: int = 0) -> TaskVectorMerger:
    """θ₀ + λ·disjoint-merge(elect(DARE(τᵢ)))."""
    return TaskVectorMerger(weight=weight, lam=lam,
                            sparsifiers=drop_sparsifiers(math.prod(shape), density, seed, rescale, rescale_norm),
                            consensus=consensus_method, sign_election=sign_election, normalize=normalize,
                            divisor=divisor, zero_sign=zero_sign_rule(sign_election))

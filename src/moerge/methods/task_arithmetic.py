"""Task arithmetic: add a scaled sum of task vectors to the base."""

from __future__ import annotations

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.task_vector import Sparsifier, TaskVectorMerger


@register(
    "task_arithmetic",
    params=(
        WEIGHT,
        LAMBDA,
        Param("normalize", bool, False, "divide the weighted sum of task vectors by Σ weights"),
    ),
    summary="base + λ·Σ wᵢ(θᵢ − θ₀)",
    citation="Ilharco et al. 2023, Editing models with task arithmetic (ICLR 2023, arXiv:2212.04089)",
    needs_base=True,
)
def task_arithmetic(shape: tuple[int, ...], *, weight: list[float], lam: float,
                    normalize: bool) -> TaskVectorMerger:
    """θ = θ₀ + λ·Σ wᵢτᵢ, τᵢ = θᵢ − θ₀ (divided by Σ wᵢ when ``normalize``)."""
    return TaskVectorMerger(weight=weight, lam=lam, sparsifiers=[Sparsifier() for _ in weight],
                            normalize=normalize)

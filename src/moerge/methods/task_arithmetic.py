"""Task arithmetic: add a scaled sum of task vectors to the base."""

from __future__ import annotations

import torch

from moerge.methods.base import LAMBDA, WEIGHT, Param, register


def weighted_delta_sum(base: torch.Tensor, models: list[torch.Tensor], weight: list[float],
                       masks: list[torch.Tensor | None] | None = None,
                       scales: list[float] | None = None) -> torch.Tensor:
    """Σ wᵢ·sᵢ·mᵢ⊙(θᵢ − θ₀), accumulated in place without materialising every delta at once."""
    out = torch.zeros_like(base)
    for i, (w, m) in enumerate(zip(weight, models)):
        d = m - base
        if masks is not None and masks[i] is not None:
            d.mul_(masks[i])
        s = w * (scales[i] if scales is not None else 1.0)
        out.add_(d, alpha=s)
    return out


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
def task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float],
                    lam: float, normalize: bool) -> torch.Tensor:
    """θ = θ₀ + λ·Σ wᵢτᵢ, τᵢ = θᵢ − θ₀ (divided by Σ wᵢ when ``normalize``)."""
    merged = weighted_delta_sum(base, models, weight)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("task_arithmetic: the weights sum to zero; set normalize: false")
        merged.div_(total)
    return base + lam * merged

"""Linear merge: the weighted average of models ("model soup")."""

from __future__ import annotations

import torch

from moerge.methods.base import WEIGHT, Param, register


@register(
    "linear",
    params=(
        WEIGHT,
        Param("normalize", bool, True, "divide by the sum of the weights"),
    ),
    summary="weighted average of the models (model soup)",
    citation="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned "
    "models improves accuracy without increasing inference time (arXiv:2203.05482)",
    needs_base=False,
    min_models=1,
)
def linear(models: list[torch.Tensor], *, weight: list[float], normalize: bool) -> torch.Tensor:
    """θ = Σ wᵢθᵢ (/ Σ wᵢ when ``normalize``)."""
    out = torch.zeros_like(models[0])
    for w, m in zip(weight, models):
        out.add_(m, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("linear: the weights sum to zero; set normalize: false or change them")
        out.div_(total)
    return out

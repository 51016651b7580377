"""Model Stock: move from the base toward the average of the experts by an angle-derived ratio."""

from __future__ import annotations

import itertools

import torch

from moerge.methods.base import Param, register


@register(
    "model_stock",
    params=(
        Param("filter_wise", bool, False, "compute the angle per row (output filter) instead of per "
              "tensor", gradient=False),
    ),
    summary="interpolate between the base and the expert average with t = N·cosθ / (1 + (N−1)·cosθ)",
    citation="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models "
    "(ECCV 2024, arXiv:2403.19522)",
    needs_base=True,
    min_models=2,
)
def model_stock(base: torch.Tensor, models: list[torch.Tensor], *, filter_wise: bool) -> torch.Tensor:
    """θ = t·mean(θᵢ) + (1−t)·θ₀ with cosθ the mean pairwise cosine of the task vectors.

    For more than two models the paper leaves the angle open; like mergekit and
    FusionBench we average the pairwise cosines. Zero task vectors count as
    orthogonal (t → 0, the base).
    """
    n = len(models)
    row_wise = filter_wise and base.dim() >= 2
    shape = (base.shape[0], -1) if row_wise else (1, -1)
    deltas = [(m - base).reshape(shape) for m in models]
    cos = torch.zeros(deltas[0].shape[0], dtype=torch.float64, device=base.device)
    for a, b in itertools.combinations(deltas, 2):
        cos += torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-8)
    cos /= n * (n - 1) / 2
    cos.clamp_(-1.0, 1.0)
    denom = 1.0 + (n - 1) * cos
    # cos = −1/(N−1) makes the ratio blow up; keep the base there (as mergekit does)
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), (n * cos) / torch.where(denom.abs() < 1e-6, 1.0, denom))
    mean = torch.zeros_like(base)
    for m in models:
        mean.add_(m)
    mean.div_(n)
    t = t.to(base.dtype).reshape((-1,) + (1,) * (base.dim() - 1)) if row_wise else t.to(base.dtype)
    return t * mean + (1.0 - t) * base

"""Passthrough: copy a tensor from one model unchanged (with ``slices``: frankenmerges)."""

from __future__ import annotations

import torch

from moerge.methods.base import Param, register


@register(
    "passthrough",
    params=(Param("scale", float, 1.0, "multiply the copied tensor by this"),),
    summary="copy each tensor from exactly one model; with slices, stack layer ranges of "
    "several models (frankenmerge)",
    citation="Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models "
    "(arXiv:2403.13257)",
    needs_base=False,
    min_models=1,
    max_models=1,
)
def passthrough(models: list[torch.Tensor], *, scale: float) -> torch.Tensor:
    """θ = scale·θ₁."""
    return models[0] if scale == 1.0 else models[0] * scale

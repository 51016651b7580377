"""Passthrough: copy a tensor from one model unchanged (with ``slices``: frankenmerges)."""

from __future__ import annotations

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger


class ScaleMerger(TensorMerger):
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def emit(self, start, base, models) -> torch.Tensor:
        return models[0] if self.scale == 1.0 else models[0] * self.scale


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
def passthrough(shape: tuple[int, ...], *, scale: float) -> ScaleMerger:
    """θ = scale·θ₁."""
    return ScaleMerger(scale)

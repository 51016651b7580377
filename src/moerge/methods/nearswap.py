"""NearSwap: take the other model's value where it is close to the base, keep the base elsewhere."""

from __future__ import annotations

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger


class NearSwapMerger(TensorMerger):
    def __init__(self, t: float) -> None:
        self.t = t

    def emit(self, start, base, models) -> torch.Tensor:
        b = models[0]
        w = (self.t / (base - b).abs().clamp_min(1e-6)).clamp(0.0, 1.0)
        return w * b + (1.0 - w) * base


@register(
    "nearswap",
    params=(Param("t", float, doc="similarity threshold: entries within t of the base take the other "
                  "model's value, farther ones move toward it by t/|Δ|", low=0.0),),
    summary="interpolate each entry toward the other model by min(1, t/|θ₁ − θ₀|)",
    citation="alchemonaut 2024, QuartetAnemoi-70B model card (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); "
    "as implemented by mergekit 0.1.5",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def nearswap(shape: tuple[int, ...], *, t: float) -> NearSwapMerger:
    """w = clamp(t / max(|θ₀ − θ₁|, 10⁻⁶), 0, 1); θ = w·θ₁ + (1 − w)·θ₀."""
    return NearSwapMerger(t)

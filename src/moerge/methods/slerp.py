"""SLERP: spherical linear interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math
from typing import Any

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger


class SlerpMerger(TensorMerger):
    """One statistics pass (norms and dot product, in float64), then a fixed linear combination."""

    passes = 1

    def __init__(self, t: float, dot_threshold: float, eps: float, notes: dict[str, Any] | None) -> None:
        self.t, self.dot_threshold, self.eps, self.notes = t, dot_threshold, eps, notes
        self.n0 = self.n1 = self.dot = 0.0
        self.c0, self.c1 = 1.0 - t, t

    def observe(self, p, start, base, models) -> None:
        v0, v1 = base.double(), models[0].double()
        self.n0 += float(v0.square().sum())
        self.n1 += float(v1.square().sum())
        self.dot += float((v0 * v1).sum())

    # native: the 2×2 Gram matrix of (base, model), then c₀·θ₀ + c₁·θ₁
    def native_ok(self) -> bool:
        return True

    def observe_native(self, p, start, base, models) -> int:
        from moerge import native

        g = torch.zeros(2, 2, dtype=torch.float64)
        nf = native.gram(None, [base, models[0]], g)
        self.n0 += float(g[0, 0])
        self.n1 += float(g[1, 1])
        self.dot += float(g[0, 1])
        return nf

    def emit_native(self, start, base, models, out, flags) -> int:
        from moerge import native

        return native.linear_emit([base, models[0]], [self.c0, self.c1], 1.0, out, flags)

    def end_pass(self, p: int) -> None:
        n0, n1 = math.sqrt(self.n0), math.sqrt(self.n1)
        dot = self.dot / ((n0 if n0 > self.eps else 1.0) * (n1 if n1 > self.eps else 1.0))
        dot = max(-1.0, min(1.0, dot))
        if abs(dot) > self.dot_threshold:
            if self.notes is not None:
                self.notes["lerp_fallback"] = self.notes.get("lerp_fallback", 0) + 1
            return  # nearly colinear: linear interpolation
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        self.c0 = math.sin((1.0 - self.t) * theta) / sin_theta
        self.c1 = math.sin(self.t * theta) / sin_theta

    def emit(self, start, base, models) -> torch.Tensor:
        if self.c1 == 0.0 and self.c0 == 1.0:
            return base.clone()
        if self.c0 == 0.0 and self.c1 == 1.0:
            return models[0].clone()
        return self.c0 * base + self.c1 * models[0]


@register(
    "slerp",
    params=(
        Param("t", float, 0.5, "interpolation position: 0 gives the base model, 1 the other model",
              low=0.0, high=1.0),
        Param("dot_threshold", float, 0.9995, "fall back to linear interpolation when the cosine "
              "of the two tensors exceeds this in absolute value (nearly colinear)",
              low=0.0, high=1.0, gradient=False),
        Param("eps", float, 1e-8, "norms below this are not normalised", low=0.0, gradient=False),
    ),
    summary="spherical interpolation between the base and one other model",
    citation="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH '85); "
    "popularised for LLM merging by mergekit (Goddard et al. 2024, arXiv:2403.13257)",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def slerp(shape: tuple[int, ...], *, t: float, dot_threshold: float, eps: float,
          notes: dict[str, Any] | None = None) -> SlerpMerger:
    """slerp(θ₀, θ₁; t) on whole tensors; linear when |cos| > ``dot_threshold``.

    The angle comes from the normalised tensors; the interpolation is of the
    original (unnormalised) tensors, as in mergekit.
    """
    return SlerpMerger(t, dot_threshold, eps, notes)

"""SLERP: spherical linear interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math
from typing import Any

import torch

from moerge.methods.base import Param, register


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
def slerp(base: torch.Tensor, models: list[torch.Tensor], *, t: float, dot_threshold: float,
          eps: float, notes: dict[str, Any] | None = None) -> torch.Tensor:
    """slerp(θ₀, θ₁; t) on whole tensors; linear when |cos| > ``dot_threshold``.

    The direction comes from the normalised tensors; the interpolation is of the
    original (unnormalised) tensors, as in mergekit.
    """
    v0, v1 = base, models[0]
    n0 = float(v0.norm(dtype=torch.float64))
    n1 = float(v1.norm(dtype=torch.float64))
    dot = float((v0.double() * v1.double()).sum())
    if n0 > eps:
        dot /= n0
    if n1 > eps:
        dot /= n1
    if abs(dot) > dot_threshold:
        if notes is not None:
            notes["lerp_fallback"] = notes.get("lerp_fallback", 0) + 1
        return torch.lerp(v0, v1, t) if t not in (0.0, 1.0) else (v0.clone() if t == 0.0 else v1.clone())
    theta0 = math.acos(max(-1.0, min(1.0, dot)))
    sin0 = math.sin(theta0)
    s0 = math.sin((1.0 - t) * theta0) / sin0
    s1 = math.sin(t * theta0) / sin0
    return s0 * v0 + s1 * v1

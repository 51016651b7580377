"""Spherical merges of several tensors: NuSLERP, Multi-SLERP and the Karcher mean.

Every one of them returns a linear combination of its input vectors whose
coefficients depend only on the inputs' norms and mutual dot products. So each
tensor takes one statistics pass (the Gram matrix of the inputs, in float64,
with the native kernels where present), the coefficients are computed from it
exactly as mergekit computes them on the whole tensors, and the output pass is
a weighted sum: memory holds one block per input, never a whole tensor.

NuSLERP with ``nuslerp_flatten: false`` interpolates each row (or column)
separately: its statistics are per vector (see :class:`VectorGram`).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger

MERGEKIT = "Goddard et al. 2024, Arcee's MergeKit (EMNLP 2024 industry track, arXiv:2403.13257)"


def _sym(g: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from an upper triangle (the native kernels fill only that)."""
    return torch.triu(g) + torch.triu(g, 1).T


class GramMerger(TensorMerger):
    """One pass for the Gram matrix G of the inputs xᵢ (mᵢ − base with ``deltas``, else mᵢ); then
    the output Σ cᵢxᵢ (+ base), the cᵢ from :meth:`coefficients`."""

    passes = 1

    def __init__(self, n: int, deltas: bool) -> None:
        self.n, self.deltas = n, deltas
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.coef: list[float] = []
        self._native = False  # the Gram matrix came from the native kernels (upper triangle only)

    @abstractmethod
    def coefficients(self, g: torch.Tensor) -> list[float]:
        """The cᵢ of the output Σ cᵢxᵢ, from the full Gram matrix of the xᵢ."""

    def _vectors(self, base, models) -> list[torch.Tensor]:
        return [(m - base).double() if self.deltas else m.double() for m in models]

    def observe(self, p, start, base, models) -> None:
        x = torch.stack([v.reshape(-1) for v in self._vectors(base, models)])
        self.gram += (x @ x.T).cpu()

    def end_pass(self, p: int) -> None:
        self.coef = [float(c) for c in self.coefficients(_sym(self.gram) if self._native else self.gram)]

    def emit(self, start, base, models) -> torch.Tensor:
        out = base.clone() if self.deltas else torch.zeros_like(models[0])
        for c, m in zip(self.coef, models):
            if c != 0.0:
                out.add_(m - base if self.deltas else m, alpha=c)
        return out

    def native_ok(self) -> bool:
        from moerge import native

        return self.n <= native.GRAM_MAX

    def observe_native(self, p, start, base, models) -> int:
        from moerge import native

        self._native = True
        return native.gram(base if self.deltas else None, models, self.gram)

    def emit_native(self, start, base, models, out, flags) -> int:
        from moerge import native

        if self.deltas:
            return native.linear_emit([base, *models], [1.0 - sum(self.coef), *self.coef], 1.0, out, flags)
        return native.linear_emit(models, self.coef, 1.0, out, flags)


# ---------------------------------------------------------------------------------------------
# NuSLERP

def nuslerp_coefficients(t: float, g00: float, g11: float, g01: float) -> tuple[float, float]:
    """(c₀, c₁) of NuSLERP's result c₀v₀ + c₁v₁, from ‖v₀‖², ‖v₁‖², v₀·v₁ (mergekit 0.1.5's rule).

    Norms are clamped at 1e-7 for the cosine; when 1 − cos² ≤ 1e-16 (colinear) the
    interpolation is linear, (1 − t, t).
    """
    n0, n1 = max(math.sqrt(max(g00, 0.0)), 1e-7), max(math.sqrt(max(g11, 0.0)), 1e-7)
    cos = max(-1.0, min(1.0, g01 / (n0 * n1)))
    if 1.0 - cos * cos <= 1e-16:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


class NuSlerpMerger(GramMerger):
    def __init__(self, t: float, deltas: bool) -> None:
        super().__init__(2, deltas)
        self.t = t

    def coefficients(self, g: torch.Tensor) -> list[float]:
        return list(nuslerp_coefficients(self.t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1])))


class VectorGram(TensorMerger):
    """NuSLERP per vector: along the last dimension (each row) or along the first (each column).

    The statistics are per vector: ‖v₀‖², ‖v₁‖², v₀·v₁ for each. Element f of the
    flattened tensor belongs to vector f // shape[-1] (last dimension) or
    f mod (numel / shape[0]) (first dimension).
    """

    passes = 1

    def __init__(self, shape: tuple[int, ...], t: float, deltas: bool, along_first: bool) -> None:
        numel = math.prod(shape)
        self.t, self.deltas, self.along_first = t, deltas, along_first
        if len(shape) < 2:
            self.count, self.width = 1, max(numel, 1)  # a 1-D tensor is one vector either way
            self.along_first = False
        elif along_first:
            self.count, self.width = numel // shape[0], shape[0]
        else:
            self.count, self.width = numel // shape[-1], shape[-1]
        self.stats = torch.zeros(3, self.count, dtype=torch.float64)
        self.c0: torch.Tensor | None = None
        self.c1: torch.Tensor | None = None

    def _ids(self, start: int, n: int, device: torch.device) -> torch.Tensor:
        f = torch.arange(start, start + n, device=device)
        return f % self.count if self.along_first else f // self.width

    def _pair(self, base, models) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deltas:
            return models[0] - base, models[1] - base
        return models[0], models[1]

    def observe(self, p, start, base, models) -> None:
        v0, v1 = (v.double() for v in self._pair(base, models))
        ids = self._ids(start, v0.numel(), v0.device)
        for k, prod in enumerate((v0 * v0, v1 * v1, v0 * v1)):
            self.stats[k].index_add_(0, ids.cpu(), prod.cpu())

    def end_pass(self, p: int) -> None:
        c = [nuslerp_coefficients(self.t, *(float(x) for x in self.stats[:, i])) for i in range(self.count)]
        self.c0 = torch.tensor([a for a, _ in c], dtype=torch.float32)
        self.c1 = torch.tensor([b for _, b in c], dtype=torch.float32)

    def emit(self, start, base, models) -> torch.Tensor:
        assert self.c0 is not None and self.c1 is not None
        v0, v1 = self._pair(base, models)
        ids = self._ids(start, v0.numel(), v0.device)
        out = self.c0.to(v0.device)[ids] * v0 + self.c1.to(v0.device)[ids] * v1
        return out + base if self.deltas else out


@register(
    "nuslerp",
    params=(
        Param("weight", float, doc="this model's share: t = w₂ / (w₁ + w₂) (0.5 when the sum is ~0)",
              per_model=True),
        Param("nuslerp_flatten", bool, True, "interpolate each tensor as one flat vector; false: row by "
              "row (or column by column, see nuslerp_row_wise)", gradient=False),
        Param("nuslerp_row_wise", bool, False, "with nuslerp_flatten false: vectors along the first "
              "dimension (true; mergekit's name for it) or along the last (false)", gradient=False),
    ),
    summary="spherical interpolation of two models, or of their task vectors when a base is given",
    citation=MERGEKIT + " (NuSLERP is mergekit's; no paper)",
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
)
def nuslerp(shape: tuple[int, ...], *, weight: list[float], nuslerp_flatten: bool, nuslerp_row_wise: bool,
            has_base: bool = False) -> TensorMerger:
    """slerp(v₀, v₁; t) with t = w₂/(w₁+w₂), vᵢ the models or, with a base, their task vectors
    (then θ₀ + slerp(τ₁, τ₂; t)). Linear where the two are colinear."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if nuslerp_flatten:
        return NuSlerpMerger(t, has_base)
    return VectorGram(shape, t, has_base, along_first=nuslerp_row_wise)


# ---------------------------------------------------------------------------------------------
# Multi-SLERP

class MultiSlerpMerger(GramMerger):
    """mergekit's multislerp, from the Gram matrix: units uᵢ = xᵢ/(‖xᵢ‖+ε), their weighted mean m,
    the tangent Σwᵢ(uᵢ − (uᵢ·m̂)m̂) at m̂ = m/‖m‖, one exponential-map step, scaled by Σwᵢ‖xᵢ‖.
    Where every task vector is zero (e.g. the embeddings of LoRA experts) the result is the base, not the
    antipodal-weights error of three or more models whose unit vectors cancel."""

    def __init__(self, weight: list[float], normalize: bool, eps: float, deltas: bool) -> None:
        super().__init__(len(weight), deltas)
        total = sum(weight)
        if normalize and abs(total) < 1e-12:
            raise ValueError("the weights sum to zero; set normalize_weights: false or change them")
        self.w = torch.tensor(weight, dtype=torch.float64) / (total if normalize else 1.0)
        self.eps = eps

    def coefficients(self, g: torch.Tensor) -> list[float]:
        w, eps = self.w, self.eps
        norms = g.diagonal().clamp_min(0).sqrt()
        inv = 1.0 / (norms + eps)
        u = g * inv[:, None] * inv[None, :]  # Gram matrix of the units
        m_norm = math.sqrt(max(float(w @ u @ w), 0.0))
        if not bool((norms > 0).any()):  # every model is the base here (a tensor no adapter touches): the base
            return [0.0] * self.n
        if m_norm < eps:
            if self.n == 2:  # mergekit: linear interpolation of the two
                return [float(x) for x in w]
            raise ValueError("the weighted mean of the normalised models is zero (antipodal models whose "
                             "weights cancel); change the weights")
        dots = (u @ w) / m_norm  # uᵢ·m̂
        t = w - float(w @ dots) * w / m_norm  # tangent, over the units
        t_norm = math.sqrt(max(float(t @ u @ t), 0.0)) + eps
        unit_coef = w / m_norm * math.cos(t_norm) + t * (math.sin(t_norm) / t_norm)
        scale = float((norms * w).sum())
        return [float(x) for x in unit_coef * inv * scale]


@register(
    "multislerp",
    params=(
        Param("weight", float, doc="this model's weight", per_model=True),
        Param("normalize_weights", bool, True, "divide the weights by their sum", gradient=False),
        Param("eps", float, 1e-8, "added to norms before dividing by them", low=0.0, gradient=False),
    ),
    summary="barycentric interpolation of several models on the hypersphere (of task vectors with a base)",
    citation="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); " + MERGEKIT,
    needs_base=False,
    optional_base=True,
    min_models=1,
)
def multislerp(shape: tuple[int, ...], *, weight: list[float], normalize_weights: bool, eps: float,
               has_base: bool = False) -> TensorMerger:
    """One model: itself. Otherwise the weighted spherical mean of the models (or task vectors), its
    norm the weighted mean of theirs."""
    if len(weight) == 1:
        from moerge.methods.linear import LinearMerger

        return LinearMerger([1.0], normalize=False)
    return MultiSlerpMerger(weight, normalize_weights, eps, has_base)


# ---------------------------------------------------------------------------------------------
# Karcher mean

class KarcherMerger(GramMerger):
    """The Karcher (Riemannian) mean of the inputs' directions, by mergekit's fixed-point iteration,
    carried out on coefficient vectors over the units (every iterate lies in their span)."""

    def __init__(self, n: int, max_iter: int, tol: float) -> None:
        super().__init__(n, deltas=False)
        self.max_iter, self.tol = max_iter, tol

    def coefficients(self, g: torch.Tensor) -> list[float]:
        n, tol = self.n, self.tol
        norms = g.diagonal().clamp_min(0).sqrt().float().double()  # mergekit: norms in float32
        alphas = [1.0 / n] * n
        valid = [i for i in range(n) if float(norms[i]) > tol]
        if not valid:
            return [0.0] * n
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), 0.0)
        u = g * inv[:, None] * inv[None, :]
        a = torch.zeros(n, dtype=torch.float64)
        total = sum(alphas[i] for i in valid)
        for i in valid:
            a[i] = alphas[i] / total

        def norm_of(c: torch.Tensor) -> float:
            return math.sqrt(max(float(c @ u @ c), 0.0))

        mean = a.clone()
        m_norm = norm_of(mean)
        if m_norm < tol:
            mean = torch.zeros(n, dtype=torch.float64)
            mean[valid[0]] = 1.0
        else:
            mean /= m_norm
        for _ in range(self.max_iter):
            tangent = torch.zeros(n, dtype=torch.float64)
            proj = u @ mean  # uᵢ·mean
            for i in valid:
                dot = max(-1.0, min(1.0, float(proj[i])))
                theta = math.acos(dot)
                if theta < tol:
                    continue
                e = torch.zeros(n, dtype=torch.float64)
                e[i] = 1.0
                tangent += a[i] * (theta / math.sin(theta)) * (e - dot * mean)
            t_norm = norm_of(tangent)
            if t_norm < tol:
                break
            mean = math.cos(t_norm) * mean + math.sin(t_norm) * (tangent / t_norm)
            unit_norm = norm_of(mean)
            if unit_norm > tol:
                mean /= unit_norm
        scale = sum(alphas[i] * float(norms[i]) for i in range(n))
        return [float(x) for x in mean * inv * scale]


@register(
    "karcher",
    params=(
        Param("max_iter", int, 10, "iterations of the fixed-point update at most", low=1, gradient=False),
        Param("tol", float, 1e-5, "stop when the tangent step is shorter than this; inputs whose norm is "
              "below it are left out of the mean", low=0.0, low_open=True, gradient=False),
    ),
    summary="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
    citation="Karcher 1977, Riemannian center of mass and mollifier smoothing (Comm. Pure Appl. Math.); "
    "for model merging: arXiv:2603.04972 (mergekit's reference); " + MERGEKIT,
    needs_base=False,
    min_models=1,
    base_joins=True,
)
def karcher(shape: tuple[int, ...], *, max_iter: int, tol: float, n_models: int) -> TensorMerger:
    """Uniform weights over the models. In mergekit's format a ``base_model`` not listed among the
    models is one more ordinary point of the mean, as in mergekit."""
    if n_models == 1:
        from moerge.methods.linear import LinearMerger

        return LinearMerger([1.0], normalize=False)
    return KarcherMerger(n_models, max_iter, tol)

"""MaTS: merging in the models' task subspace, by solving a linear system with conjugate gradient.

For each linear weight W (out × in) with statistics, find the W that solves

    Σᵢ cᵢ Cᵢ(W) = Σᵢ cᵢ Cᵢ(Wᵢ)

where Cᵢ is model i's curvature in the weight's space:

* ``gram`` statistics (the RegMean objective): Cᵢ(W) = W G̃ᵢ;
* ``kfac`` statistics (the blockwise, K-FAC Fisher): Cᵢ(W) = S̃ᵢ W G̃ᵢ, with G the input Gram and
  S the output-gradient Gram of the layer (``moerge stats kfac``);

M̃ = α·M + (1−α)·diag(M) for every factor (the paper's ``model_lambda``), plus ρ·W with ρ = ``ridge``
× the operator's mean diagonal entry. Plain conjugate gradient (matrix products in ``precision``,
float32 by default, inner products in float64) from ``init`` —
``average`` (Σcᵢθᵢ/Σcᵢ), ``task_arithmetic`` (θ₀ + λ Σ(θᵢ−θ₀), λ = ``init_lambda``, the paper's
recommended start; needs ``base_model``) or ``base`` — stops when the relative residual
‖b − Ax‖/‖b‖ falls below ``tolerance`` or after ``iterations`` steps. The residual and the number
of steps of every layer are reported. Stopping early is part of the method: from a good start,
a few steps move the merge only within the directions the statistics say matter. Tensors without
statistics are averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moerge.methods.base import Param, register
from moerge.methods.data_aware import ALPHA, RIDGE, STATS_WEIGHT, StatsSource, WholeTensorMerger, average, shrink


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ accumulated in float64 whatever the operands' precision."""
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                       tolerance: float, iterations: int) -> tuple[torch.Tensor, float, int]:
    """Solve A x = b for a symmetric positive (semi-)definite A given as ``apply``; returns
    (x, relative residual ‖b − Ax‖/‖b‖, steps taken)."""
    bnorm = _dot(b, b) ** 0.5
    if bnorm == 0.0:
        return torch.zeros_like(b), 0.0, 0
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = _dot(r, r)
    steps = 0
    while steps < iterations and rs ** 0.5 > tolerance * bnorm:
        ap = apply(p)
        curvature = _dot(p, ap)
        if curvature <= 0.0:  # p lies in the null space: nothing more to gain along it
            break
        a = rs / curvature
        x.add_(p, alpha=a)
        r.sub_(ap, alpha=a)
        rs_new = _dot(r, r)
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
        steps += 1
    final = b - apply(x)  # the true residual, not the recurrence's
    residual = _dot(final, final) ** 0.5 / bnorm
    return x, residual, steps


class MatsMerger(WholeTensorMerger):
    def __init__(self, shape: tuple[int, ...], weight: list[float], alpha: float, ridge: float, init: str,
                 init_lambda: float, tolerance: float, iterations: int, stats: StatsSource, name: str,
                 notes: dict[str, Any], precision: str = "float32") -> None:
        super().__init__(shape, len(weight))
        if len(shape) != 2:
            raise ValueError(f"mats statistics belong to 2-D weights, this tensor is {list(shape)}")
        self.weight, self.alpha, self.ridge = weight, alpha, ridge
        self.init, self.init_lambda = init, init_lambda
        self.tolerance, self.iterations = tolerance, iterations
        self.stats, self.name, self.notes = stats, name, notes
        self.dtype = torch.float64 if precision == "float64" else torch.float32

    def _factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        out_dim, in_dim = self.shape
        grams = [shrink(self.stats.whole(k, 0).to(self.dtype), self.alpha) for k in range(self.n)]
        if any(g.shape != (in_dim, in_dim) for g in grams):
            raise ValueError(f"its input Gram matrices should be {in_dim}×{in_dim}, got {list(grams[0].shape)}")
        if self.stats.kind != "kfac":
            return grams, None
        outs = [shrink(self.stats.whole(k, 1).to(self.dtype), self.alpha) for k in range(self.n)]
        if any(s.shape != (out_dim, out_dim) for s in outs):
            raise ValueError(f"its output-gradient Grams should be {out_dim}×{out_dim}, got {list(outs[0].shape)}")
        return grams, outs

    def solve(self, base: torch.Tensor | None, models: list[torch.Tensor]) -> torch.Tensor:
        grams, outs = self._factors()
        c = self.weight
        ws = [m.to(self.dtype) for m in models]
        if outs is None:
            total = sum(ci * g for ci, g in zip(c, grams))
            rho = self.ridge * float(total.diagonal().mean())
            total.diagonal().add_(rho)

            def apply(x: torch.Tensor) -> torch.Tensor:
                return x @ total

            b = sum(ci * (w @ g) for ci, w, g in zip(c, ws, grams))
        else:
            rho = self.ridge * sum(ci * float(g.diagonal().mean()) * float(s.diagonal().mean())
                                   for ci, g, s in zip(c, grams, outs))

            def apply(x: torch.Tensor) -> torch.Tensor:
                y = sum(ci * (s @ x @ g) for ci, g, s in zip(c, grams, outs))
                return y.add_(x, alpha=rho) if rho else y

            b = sum(ci * (s @ w @ g) for ci, w, g, s in zip(c, ws, grams, outs))
        x, residual, steps = conjugate_gradient(apply, b, self._start(base, ws), self.tolerance, self.iterations)
        self.notes.setdefault("cg_residual", {})[self.name] = residual
        self.notes.setdefault("cg_steps", {})[self.name] = steps
        self.notes["solved_layers"] = self.notes.get("solved_layers", 0) + 1
        return x

    def _start(self, base: torch.Tensor | None, ws: list[torch.Tensor]) -> torch.Tensor:
        if self.init == "average":
            return sum(ci * w for ci, w in zip(self.weight, ws)) / sum(self.weight)
        assert base is not None  # the planner requires a base model for these starts
        b0 = base.to(self.dtype)
        if self.init == "base":
            return b0
        return b0 + self.init_lambda * sum(w - b0 for w in ws)


def _needs_base(params: dict[str, Any]) -> str | None:
    if params.get("init") in ("task_arithmetic", "base"):
        return f"init: {params['init']} starts from the base model"
    return None


@register(
    "mats",
    params=(
        STATS_WEIGHT,
        Param("init", str, "task_arithmetic", "where conjugate gradient starts: the average of the models, "
              "the task-arithmetic merge (needs base_model) or the base model", choices=("average",
              "task_arithmetic", "base"), constant=True),
        Param("init_lambda", float, 0.3, "λ of the task-arithmetic start", constant=True),
        Param("iterations", int, 100, "at most this many conjugate-gradient steps per layer", low=0,
              constant=True),
        Param("tolerance", float, 1e-5, "stop when ‖b − Ax‖/‖b‖ is below this", low=0.0, constant=True),
        ALPHA.with_default(1.0),
        RIDGE,
        Param("precision", str, "float32", "precision of the solver's matrix products (inner products are "
              "always float64); float64 costs about twice the time", choices=("float32", "float64"), constant=True),
    ),
    summary="per linear layer, conjugate gradient on the models' curvature (RegMean Grams or K-FAC "
    "Fisher blocks; needs `moerge stats gram|kfac` per model)",
    citation="Tam et al. 2024, Merging by matching models in task parameter subspaces (arXiv:2312.04339)",
    needs_base=False,
    optional_base=True,
    min_models=1,
    stats=("kfac", "gram"),
    requires_base=_needs_base,
)
def mats(shape: tuple[int, ...], *, weight: list[float], init: str, init_lambda: float, iterations: int,
         tolerance: float, alpha: float, ridge: float, precision: str, stats: StatsSource | None = None,
         name: str = "", notes: dict[str, Any] | None = None) -> Any:
    """Conjugate gradient on Σ cᵢCᵢ(W) = Σ cᵢCᵢ(Wᵢ) for linear weights with statistics; averages the rest."""
    notes = notes if notes is not None else {}
    if stats is None:
        return average(weight, notes)
    return MatsMerger(shape, weight, alpha, ridge, init, init_lambda, tolerance, iterations, stats, name, notes,
                      precision)

"""WUDI merging: the merged task vector that interferes least with each task's own inputs, data-free.

For a linear layer, the rows of a task vector τᵢ span (approximately) the inputs its task
feeds the layer. WUDI therefore asks the merged τ to act on them as τᵢ does, minimising

    L(τ) = Σᵢ ‖(τ − τᵢ)·τᵢᵀ‖²_F / ‖τᵢ‖²_F

per 2-D weight, from τ = Σ τᵢ. The reference code runs Adam (lr 1e-5, 300 steps) through
autograd, which forms T products of m×m per step. Here the gradient is computed in closed
form, ∇L = 2·(τ·A − B) with A = Σ τᵢᵀτᵢ/‖τᵢ‖² (n×n) and B = Σ τᵢ·τᵢᵀτᵢ/‖τᵢ‖², formed once,
and fed to the same torch Adam: one m×n by n×n product per step. ``solver: exact`` goes
straight to the minimiser that gradient descent from the same start converges to,
τ* = τ₀ + (B − τ₀A)·A⁺ (the start's part outside A's range is kept). A task vector that is
exactly zero has no inputs to protect and is left out of L (the reference divides by zero).
Other tensors take the mean of the task vectors, as the reference does.
"""

from __future__ import annotations

import torch

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.subspace import EXCLUDE, SubspaceMerger, total


def wudi_system(taus: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of the loss's gradient 2·(τ·A − B); None when every task vector is zero."""
    a = b = None
    for t in taus:
        sq = float((t * t).sum())
        if sq == 0.0:
            continue
        g = (t.T @ t) / sq
        a = g if a is None else a.add_(g)
        tb = t @ g
        b = tb if b is None else b.add_(tb)
    return None if a is None or b is None else (a, b)


def wudi_loss(x: torch.Tensor, taus: list[torch.Tensor]) -> float:
    """L(x) as the paper writes it (for reports and tests)."""
    total = 0.0
    for t in taus:
        sq = float((t * t).sum())
        if sq:
            total += float((((x - t) @ t.T) ** 2).sum()) / sq
    return total


def wudi_merge(taus: list[torch.Tensor], iterations: int = 300, lr: float = 1e-5, solver: str = "adam") -> torch.Tensor:
    start = total(taus)
    system = wudi_system(taus)
    if system is None:
        return start
    a, b = system
    if solver == "exact":
        a64 = a.double()
        step = (b.double() - start.double() @ a64) @ torch.linalg.pinv(a64, hermitian=True)
        return (start.double() + step).to(start.dtype)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    with torch.no_grad():
        for _ in range(iterations):
            x.grad = torch.addmm(b, x, a, beta=-2.0, alpha=2.0)  # 2·(x·A − B)
            opt.step()
    return x.detach()


COMPUTE_DTYPE = Param("compute_dtype", str, "float32", "precision of the optimisation", choices=("float32", "float64"),
                      gradient=False, constant=True)


class WudiMerger(SubspaceMerger):
    def __init__(self, shape, weight, lam, exclude, svd_dtype, iterations: int, lr: float, solver: str) -> None:
        super().__init__(shape, weight, lam, exclude, svd_dtype)
        self.iterations, self.lr, self.solver = iterations, lr, solver

    def merge_matrix(self, taus: list[torch.Tensor]) -> torch.Tensor:
        return wudi_merge(self.weighted(taus), self.iterations, self.lr, self.solver) * self.lam


@register(
    "wudi",
    params=(WEIGHT, LAMBDA,
            Param("solver", str, "adam", "Adam from the sum of the task vectors, as the reference code; or the "
                  "exact minimiser gradient descent from that start converges to", choices=("adam", "exact"),
                  gradient=False, constant=True),
            Param("iterations", int, 300, "Adam steps per matrix", low=0, gradient=False, constant=True),
            Param("lr", float, 1e-5, "Adam learning rate", low=0.0, low_open=True, gradient=False, constant=True),
            EXCLUDE, COMPUTE_DTYPE),
    summary="per matrix, the task vector closest to each τᵢ on the inputs τᵢ's own rows span "
    "(min Σ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖², data-free)",
    citation="Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model Merging "
    "via Task Vectors (ICML 2025, arXiv:2503.08099); reference code in FusionBench (method/wudi)",
    needs_base=True,
    whole_tensor=lambda params: True,
)
def wudi(shape: tuple[int, ...], *, weight: list[float], lam: float, solver: str, iterations: int, lr: float,
         exclude: bool, compute_dtype: str) -> WudiMerger:
    """θ₀ + λ·argmin_τ Σᵢ ‖(τ − τᵢ)·τᵢᵀ‖²/‖τᵢ‖² (Adam from Σ τᵢ, or exactly)."""
    return WudiMerger(shape, weight, lam, exclude, compute_dtype, iterations, lr, solver)

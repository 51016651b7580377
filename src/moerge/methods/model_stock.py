"""Model Stock: move from the base toward the average of the experts by an angle-derived ratio."""

from __future__ import annotations

import itertools
import math

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger


class ModelStockMerger(TensorMerger):
    """One statistics pass (pairwise dot products and norms of the task vectors), then interpolation."""

    passes = 1

    def __init__(self, shape: tuple[int, ...], n_models: int, filter_wise: bool, conventions: str = "paper") -> None:
        self.n = n_models
        self.conventions = conventions
        self.row_aligned = filter_wise and len(shape) >= 2
        numel = math.prod(shape)
        self.rows = shape[0] if self.row_aligned else 1
        self.row_len = numel // self.rows if self.rows else 0
        self.pairs = list(itertools.combinations(range(n_models), 2))
        self.dots = torch.zeros(len(self.pairs), self.rows, dtype=torch.float64)
        self.sq = torch.zeros(n_models, self.rows, dtype=torch.float64)
        self.t: torch.Tensor | None = None

    def _rows(self, start: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        if not self.row_aligned:
            return 0, x.reshape(1, -1)
        return start // self.row_len, x.reshape(-1, self.row_len)

    def observe(self, p, start, base, models) -> None:
        r0, _ = self._rows(start, base)
        deltas = [self._rows(start, (m - base).double())[1] for m in models]
        r1 = r0 + deltas[0].shape[0]
        for i, d in enumerate(deltas):
            self.sq[i, r0:r1] += d.square().sum(1).cpu()
        for k, (i, j) in enumerate(self.pairs):
            self.dots[k, r0:r1] += (deltas[i] * deltas[j]).sum(1).cpu()

    # native: one Gram matrix of the task vectors per tensor, then Σ wᵢθᵢ with wᵢ = t/N, w₀ = 1 − t
    def native_ok(self) -> bool:
        from moerge import native

        return not self.row_aligned and self.n <= native.GRAM_MAX

    def observe_native(self, p, start, base, models) -> int:
        from moerge import native

        if not hasattr(self, "_gram"):
            self._gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        return native.gram(base, models, self._gram)

    def emit_native(self, start, base, models, out, flags) -> int:
        from moerge import native

        t = float(self.t[0])
        return native.linear_emit([base, *models], [1.0 - t] + [t / self.n] * self.n, 1.0, out, flags)

    def end_pass(self, p: int) -> None:
        if hasattr(self, "_gram"):  # the native statistics
            self.sq[:, 0] = self._gram.diagonal()
            for k, (i, j) in enumerate(self.pairs):
                self.dots[k, 0] = self._gram[i, j]
        norms = self.sq.sqrt()
        cos = torch.zeros(self.rows, dtype=torch.float64)
        for k, (i, j) in enumerate(self.pairs):
            if self.conventions == "mergekit":
                # mergekit floors the product of the norms at 1e-6, which shrinks the cosine of small
                # task vectors toward 0 (and t toward the base)
                denom = (norms[i] * norms[j]).clamp_min(1e-6)
            else:
                denom = norms[i].clamp_min(1e-8) * norms[j].clamp_min(1e-8)
            cos += (self.dots[k] / denom).clamp(-1.0, 1.0)
        cos /= len(self.pairs)
        denom = 1.0 + (self.n - 1) * cos
        # cos = −1/(N−1) makes the ratio blow up; keep the base there (as mergekit does)
        safe = denom.abs() >= 1e-6
        self.t = torch.where(safe, self.n * cos / torch.where(safe, denom, 1.0), 0.0).float()

    def emit(self, start, base, models) -> torch.Tensor:
        mean = torch.zeros_like(base)
        for m in models:
            mean.add_(m)
        mean.div_(self.n)
        r0, b = self._rows(start, base)
        t = self.t[r0:r0 + b.shape[0]].to(base.device).unsqueeze(1)
        return (t * self._rows(start, mean)[1] + (1.0 - t) * b).reshape(-1)


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
def model_stock(shape: tuple[int, ...], *, filter_wise: bool, n_models: int,
                conventions: str = "paper") -> ModelStockMerger:
    """θ = t·mean(θᵢ) + (1−t)·θ₀ with cosθ the mean pairwise cosine of the task vectors.

    For more than two models the paper leaves the angle open; like mergekit and
    FusionBench we average the pairwise cosines. Zero task vectors count as
    orthogonal (t = 0, the base).
    """
    return ModelStockMerger(shape, n_models, filter_wise, conventions)

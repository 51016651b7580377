"""SCE (FuseChat 2.0): Select salient entries by variance across models, Calculate per-model
weights from task-vector energy, Erase entries of minority sign.

Per tensor, streaming, as mergekit 0.1.5 computes it (FuseChat's authors contributed it there):

1. *select* (``select_topk`` < 1): keep the k = ⌊select_topk·#{var ≠ 0}⌋ entries with the
   largest population variance of the task vectors across models (one mask for all models;
   ties at the boundary broken by position);
2. *calculate*: wᵢ = mean(τᵢ²) over the tensor (after the selection), normalised to sum 1
   (uniform when the sum is below 10⁻⁶);
3. *erase*: per entry elect the sign of Σᵢ τᵢ (unweighted; 0 elects +) and drop disagreeing
   entries (zeros never agree);
4. θ = θ₀ + Σ wᵢτᵢ[agree] / max(Σ wᵢ[agree], 10⁻⁶).

Passes: one to count non-zero variances, the exact selection's (two), one for the weights.
"""

from __future__ import annotations

import math

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger
from moerge.methods.select import RankWindowMask


def variance(tvs: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models, per entry."""
    mean = sum(tvs) / len(tvs)
    return sum((t - mean).square() for t in tvs) / len(tvs)


class SceMerger(TensorMerger):
    def __init__(self, n_elements: int, n_models: int, select_topk: float) -> None:
        self.numel, self.n, self.topk = n_elements, n_models, select_topk
        self.window: RankWindowMask | None = None
        self.nonzero = 0
        self.energy = torch.zeros(n_models, dtype=torch.float64)
        self.weights: list[float] = []
        # the stages of the statistics passes, extended once the count is known
        self.stages = ["count", "weights"] if select_topk < 1.0 else ["weights"]

    @property
    def passes(self) -> int:  # type: ignore[override]
        return len(self.stages)

    def _tvs(self, start: int, base, models) -> list[torch.Tensor]:
        tvs = [m - base for m in models]
        if self.topk < 1.0:
            if self.window is None or self.window.empty:
                return [torch.zeros_like(t) for t in tvs]
            keep = self.window.mask(variance(tvs))
            if keep is not None:
                tvs = [t * keep for t in tvs]
        return tvs

    def observe(self, p, start, base, models) -> None:
        stage = self.stages[p]
        if stage == "count":
            self.nonzero += int(torch.count_nonzero(variance([m - base for m in models])))
        elif stage == "select":
            assert self.window is not None
            self.window.observe(p - 1, variance([m - base for m in models]))
        else:
            for i, t in enumerate(self._tvs(start, base, models)):
                self.energy[i] += float(t.double().square().sum())

    def end_pass(self, p: int) -> None:
        stage = self.stages[p]
        if stage == "count":
            k = int(self.nonzero * self.topk)
            self.window = RankWindowMask(self.numel, self.numel - k, self.numel) if k > 0 else \
                RankWindowMask(self.numel, 0, 0)
            self.stages = ["count"] + ["select"] * self.window.passes + ["weights"]
        elif stage == "select":
            assert self.window is not None
            self.window.end_pass(p - 1)
        else:
            mean = self.energy / max(self.numel, 1)
            total = float(mean.sum())
            self.weights = [1.0 / self.n] * self.n if abs(total) < 1e-6 else [float(x) / total for x in mean]
        if self.window is not None and stage != "count" and p + 1 >= self.stages.index("weights"):
            self.window.restart()  # the weights pass and the output pass ask for masks from the start

    def emit(self, start, base, models) -> torch.Tensor:
        tvs = self._tvs(start, base, models)
        vote = sum(tvs)
        elected = torch.where(vote >= 0, 1.0, -1.0)
        num = torch.zeros_like(base)
        den = torch.zeros_like(base)
        for w, t in zip(self.weights, tvs):
            agree = (torch.sign(t) == elected).to(t.dtype)
            num += t * (w * agree)
            den += w * agree
        return base + num / den.clamp_min(1e-6)


@register(
    "sce",
    params=(Param("select_topk", float, 1.0, "fraction of entries kept, those of largest variance across "
                  "the models' task vectors (1 keeps all)", low=0.0, high=1.0),),
    summary="select high-variance entries, weight models by task-vector energy, erase minority signs",
    citation="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging; arXiv:2408.07990)",
    needs_base=True,
    min_models=1,
)
def sce(shape: tuple[int, ...], *, select_topk: float, n_models: int) -> SceMerger:
    """θ₀ + Σ wᵢτᵢ[agree]/Σ wᵢ[agree] over the selected entries (see the module)."""
    return SceMerger(math.prod(shape), n_models, select_topk)

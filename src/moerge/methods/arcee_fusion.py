"""Arcee Fusion: keep only the fine-tuned entries whose change matters most.

importance = |θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀)), the divergence taken per
row (along the last dimension; a 1-D tensor is one row) with 10⁻⁸ added to both
distributions. An entry is taken from θ₁ when its importance reaches the
threshold median + 1.5·(Q₃ − Q₁) of the tensor's importances, else from θ₀.

Quantiles are index quantiles of the sorted importances, the value at
⌊q·(n−1)⌋, as mergekit computes them. mergekit sorts all of them up to 10⁶
entries and a random sample of 10⁶ (with replacement) above that; moerge
finds the exact ones by streaming selection (``quantiles: exact``, the
default), or, with ``quantiles: sampled``, samples as mergekit does, seeded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moerge.methods.base import Param, register
from moerge.methods.masks import sample_indices
from moerge.methods.protocol import TensorMerger
from moerge.methods.select import RankSelect

SAMPLE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)


def row_divergence(base: torch.Tensor, model: torch.Tensor, row: int) -> torch.Tensor:
    """KL(softmax(model row) ‖ softmax(base row)) of whole rows of ``row`` elements, one value per row."""
    b, m = base.reshape(-1, row), model.reshape(-1, row)
    p = F.softmax(m, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    return (p * torch.log(p / q)).sum(dim=-1)


def importance(base: torch.Tensor, model: torch.Tensor, row: int, kl: torch.Tensor | None = None) -> torch.Tensor:
    """The flat importances |Δ|·KL of whole rows of ``row`` elements (float32); ``kl``: the rows'
    divergences when already known."""
    if kl is None:
        kl = row_divergence(base, model, row)
    return ((model - base).reshape(-1, row).abs() * kl.unsqueeze(1)).reshape(-1)


def quantile_ranks(n: int) -> list[int]:
    """The 0-based ranks of Q₁, the median and Q₃ among n sorted values (⌊q·(n−1)⌋)."""
    return [int(q * (n - 1)) for q in QUANTILES]


def fusion_threshold(q1: float, median: float, q3: float) -> float:
    """median + 1.5·(Q₃ − Q₁), in float32 as mergekit computes it."""
    t = torch.tensor([q1, median, q3], dtype=torch.float32)
    return float(t[1] + 1.5 * (t[2] - t[0]))


class ArceeFusionMerger(TensorMerger):
    row_aligned = True

    def __init__(self, shape: tuple[int, ...], sampled: bool, seed: int) -> None:
        n = self.n = math.prod(shape)
        self.row = shape[-1] if len(shape) >= 2 else max(n, 1)
        self.whole_block = len(shape) < 2
        self.threshold: float | None = None
        self.sample: torch.Tensor | None = None
        # each row's divergence, computed once (the softmaxes are most of the cost) and reused by every pass
        self.kl = torch.full((max(n // self.row, 1),), float("nan"))
        if sampled and n > SAMPLE:
            idx = sample_indices(SAMPLE, n, seed)
            self.sample_at, self.sample_order = torch.sort(idx)
            self.sample = torch.empty(SAMPLE, dtype=torch.float32)
            self.passes = 1
            self.select = None
        else:
            self.select = RankSelect(quantile_ranks(n))
            self.passes = self.select.passes

    def _importance(self, start: int, base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        r0 = start // self.row
        r1 = r0 + max(model.numel() // self.row, 1)
        kl = self.kl[r0:r1]
        if bool(torch.isnan(kl[0])):
            kl = row_divergence(base, model, self.row)
            self.kl[r0:r1] = kl.cpu()
        else:
            kl = kl.to(model.device)
        return importance(base, model, self.row, kl)

    def observe(self, p, start, base, models) -> None:
        imp = self._importance(start, base, models[0])
        if self.select is not None:
            # the selection takes non-negative floats: a divergence rounded below zero (or −0.0) counts
            # as 0 here, which moves a quartile by that rounding at most
            self.select.observe(p, imp.clamp_min(0.0) + 0.0)
            return
        assert self.sample is not None
        lo, hi = (int(x) for x in torch.searchsorted(self.sample_at, torch.tensor([start, start + imp.numel()])))
        self.sample[self.sample_order[lo:hi]] = imp.cpu()[self.sample_at[lo:hi] - start]

    def end_pass(self, p: int) -> None:
        if self.select is not None:
            self.select.end_pass(p)
            if p == self.select.passes - 1:
                self.threshold = fusion_threshold(*self.select.value)
            return
        assert self.sample is not None
        ordered = torch.sort(self.sample).values
        self.threshold = fusion_threshold(*(float(ordered[r]) for r in quantile_ranks(SAMPLE)))
        self.sample = None

    def emit(self, start, base, models) -> torch.Tensor:
        assert self.threshold is not None
        m = models[0]
        keep = self._importance(start, base, m) >= self.threshold
        return base + (m - base) * keep


@register(
    "arcee_fusion",
    params=(Param("quantiles", str, "exact", "the quartiles of the importances: exact (streaming selection) "
                  "or from a seeded sample of 10⁶ entries with replacement when the tensor is larger "
                  "(mergekit's approximation)", choices=("exact", "sampled"), defaults={"mergekit": "sampled"},
                  gradient=False, in_mergekit=False),),
    summary="take the fine-tuned entries whose importance |Δ|·KL exceeds median + 1.5·IQR, else the base",
    citation="Arcee AI 2025, Arcee Fusion (arcee.ai; mergekit 0.1.5's arcee_fusion, no paper)",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def arcee_fusion(shape: tuple[int, ...], *, quantiles: str, seed: int = 0) -> ArceeFusionMerger:
    """θ₀ + (θ₁ − θ₀)·[importance ≥ median + 1.5·IQR]."""
    return ArceeFusionMerger(shape, quantiles == "sampled", seed)

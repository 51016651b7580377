"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Any

import torch

from moerge.methods.base import DENSITY, LAMBDA, WEIGHT, Param, register
from moerge.methods.consensus import CONSENSUS, DIVISOR, SIGN_ELECTION, combine
from moerge.methods.sparsify import magnitude_mask

TRIM_SCOPE = ("model", "tensor")

TIES_CONVENTIONS = (
    Param("trim_scope", str, "model", "trim over the whole task vector of each model (TIES "
          "reference code) or per tensor (mergekit, PEFT)", choices=TRIM_SCOPE,
          defaults={"mergekit": "tensor"}, gradient=False, in_mergekit=False),
    Param("sign_election", str, "unweighted", "elect signs from the trimmed task vectors "
          "(paper, PEFT) or from the weighted ones (mergekit)", choices=SIGN_ELECTION,
          defaults={"mergekit": "weighted"}, gradient=False, in_mergekit=False),
    Param("consensus_method", str, "sum", "sign election by summed values ('mass' in the paper) "
          "or by counting signs", choices=CONSENSUS, gradient=False, in_mergekit=False),
    Param("divisor", str, "count", "disjoint mean divides by the number of agreeing models "
          "(paper, PEFT) or by their summed weight (mergekit)", choices=DIVISOR,
          defaults={"mergekit": "weight_sum"}, gradient=False, in_mergekit=False),
)


def paper_threshold_mask(delta: torch.Tensor, density: float, threshold: float | None) -> torch.Tensor | None:
    """TIES reference trim: keep |τ| ≥ the k-th smallest |τ|, k = n − ⌊n·density⌋.

    ``threshold`` is that value computed over the whole model by the pre-pass;
    without it the tensor itself is the population.
    """
    if density >= 1.0:
        return None
    mag = delta.abs()
    if threshold is None:
        n = mag.numel()
        k = n - int(n * density)
        threshold = float(torch.kthvalue(mag.reshape(-1), max(k, 1)).values)
    return mag >= threshold


class GlobalTrimThreshold:
    """Pre-pass: the exact per-model magnitude threshold over a whole task vector.

    Radix selection on the float32 bit patterns of |τ| (which order like the
    values): pass 0 histograms the high 16 bits, pass 1 the low 16 bits inside
    the bin that holds the k-th smallest. Memory: two 64 Ki-entry histograms per
    model, whatever the model size.
    """

    passes = 2

    def __init__(self, params: dict[str, Any]) -> None:
        self.n_models = 0
        self.total = 0
        self.hist: list[torch.Tensor] = []
        self.density: list[float | None] = []
        self.bin: list[int] = []
        self.rank: list[int] = []
        self.thresholds: list[float | None] = []

    def update(self, pass_idx: int, name: str, base: torch.Tensor, models: list[torch.Tensor],
               model_params: list[dict[str, Any]]) -> None:
        if not self.hist:
            self.n_models = len(models)
            self.hist = [torch.zeros(1 << 16, dtype=torch.int64) for _ in models]
            self.density = [None] * len(models)
        if pass_idx == 0:
            self.total += base.numel()
        for i, m in enumerate(models):
            dens = float(model_params[i]["density"])
            if pass_idx == 0:
                if self.density[i] is None:
                    self.density[i] = dens
                elif self.density[i] != dens:
                    raise ValueError(
                        f"trim_scope: model needs one density per model, but model {i} has "
                        f"{self.density[i]} and {dens} (at {name}); use trim_scope: tensor for "
                        "per-tensor densities"
                    )
            if dens >= 1.0:
                continue
            bits = (m.float() - base).abs_().view(torch.int32).reshape(-1)
            if pass_idx == 0:
                hi = (bits >> 16).to(torch.int64)
                self.hist[i] += torch.bincount(hi, minlength=1 << 16).cpu()
            else:
                if self.rank[i] <= 0:
                    continue
                sel = bits[(bits >> 16) == self.bin[i]]
                lo = (sel & 0xFFFF).to(torch.int64)
                self.hist[i] += torch.bincount(lo, minlength=1 << 16).cpu()

    def finish_pass(self, pass_idx: int) -> None:
        if pass_idx == 0:
            for i in range(self.n_models):
                dens = self.density[i]
                if dens is None or dens >= 1.0:
                    self.bin.append(-1)
                    self.rank.append(0)
                    continue
                k = max(self.total - int(self.total * dens), 1)
                cum = torch.cumsum(self.hist[i], 0)
                b = int(torch.searchsorted(cum, k))
                before = int(cum[b - 1]) if b > 0 else 0
                self.bin.append(b)
                self.rank.append(k - before)
                self.hist[i].zero_()
        else:
            for i in range(self.n_models):
                if self.rank[i] <= 0:
                    self.thresholds.append(None)
                    continue
                cum = torch.cumsum(self.hist[i], 0)
                lo = int(torch.searchsorted(cum, self.rank[i]))
                bits = torch.tensor([(self.bin[i] << 16) | lo], dtype=torch.int32)
                self.thresholds.append(float(bits.view(torch.float32)[0]))

    def result(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds}


def _ties_prepass(params: dict[str, Any]) -> GlobalTrimThreshold | None:
    return GlobalTrimThreshold(params) if params.get("trim_scope") == "model" else None


@register(
    "ties",
    params=(
        WEIGHT,
        Param("density", float, 0.2, DENSITY.doc, per_model=True, low=0.0, high=1.0, low_open=True,
              defaults={"mergekit": 1.0}),
        LAMBDA,
        Param("normalize", bool, True, "disjoint mean (true) or disjoint sum (false)"),
        *TIES_CONVENTIONS,
    ),
    summary="trim small task-vector entries, elect a sign per entry, average the agreeing ones",
    citation="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models "
    "(NeurIPS 2023, arXiv:2306.01708)",
    needs_base=True,
    prepass=_ties_prepass,
)
def ties(base: torch.Tensor, models: list[torch.Tensor], *, weight: list[float],
         density: list[float], lam: float, normalize: bool, trim_scope: str, sign_election: str,
         consensus_method: str, divisor: str, thresholds: list[float | None] | None = None) -> torch.Tensor:
    """θ₀ + λ·disjoint-merge(elect(trim(τᵢ))). See :func:`moerge.methods.consensus.combine`."""

    def trim(i: int, d: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        if trim_scope == "tensor":
            return (None if density[i] >= 1.0 else magnitude_mask(d, density[i])), 1.0
        thr = thresholds[i] if thresholds is not None else None
        return paper_threshold_mask(d, density[i], thr), 1.0

    return combine(base, models, weight=weight, lam=lam, sparsify=trim,
                   consensus=consensus_method, sign_election=sign_election,
                   normalize=normalize, divisor=divisor,
                   zero_sign="plus" if sign_election == "weighted" else "majority")

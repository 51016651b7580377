"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from moerge.methods.base import DENSITY, LAMBDA, WEIGHT, Param, register
from moerge.methods.masks import topk_window
from moerge.methods.select import RankSelect
from moerge.methods.task_vector import (
    CONSENSUS,
    DIVISOR,
    SIGN_ELECTION,
    RankWindowSparsifier,
    Sparsifier,
    TaskVectorMerger,
    ThresholdSparsifier,
)

TRIM_SCOPE = ("model", "tensor")

TIES_CONVENTIONS = (
    Param("trim_scope", str, "model", "trim over the whole task vector of each model (TIES "
          "reference code) or per tensor (mergekit, PEFT)", choices=TRIM_SCOPE,
          defaults={"mergekit": "tensor"}, gradient=False, in_mergekit=False, constant=True),
    Param("sign_election", str, "unweighted", "elect signs from the trimmed task vectors "
          "(paper, PEFT) or from the weighted ones (mergekit)", choices=SIGN_ELECTION,
          defaults={"mergekit": "weighted"}, gradient=False, in_mergekit=False),
    Param("consensus_method", str, "sum", "sign election by summed values ('mass' in the paper) "
          "or by counting signs", choices=CONSENSUS, gradient=False, in_mergekit=False),
    Param("divisor", str, "count", "disjoint mean divides by the number of agreeing models "
          "(paper, PEFT) or by their summed weight (mergekit)", choices=DIVISOR,
          defaults={"mergekit": "weight_sum"}, gradient=False, in_mergekit=False),
)


def zero_sign_rule(sign_election: str) -> str:
    """The TIES reference breaks exact ties by the majority sign; mergekit elects +."""
    return "plus" if sign_election == "weighted" else "majority"


class GlobalTrimThreshold:
    """Pre-pass: each model's exact magnitude threshold over its whole task vector.

    The TIES reference code flattens each model's task vector and keeps entries
    with |τ| ≥ its k-th smallest |τ|, k = d − ⌊d·density⌋. We find that value
    exactly without holding the task vector: a radix selection over every
    tensor (:class:`~moerge.methods.select.RankSelect`), two streaming passes,
    two 64 Ki-entry histograms per model.
    """

    passes = 2

    def __init__(self) -> None:
        self.select: list[RankSelect | None] = []
        self.density: list[float] = []
        self.total = 0
        self._lock = threading.Lock()

    def _start(self, p: int, base: torch.Tensor, model_params: list[dict[str, Any]]) -> None:
        with self._lock:  # blocks may come from several threads
            if not self.density:
                # one density per model across all tensors is checked by the planner
                self.density = [float(mp["density"]) for mp in model_params]
                self.select = [RankSelect([], shared=True) if d < 1.0 else None for d in self.density]
            if p == 0:
                self.total += base.numel()

    def observe(self, p: int, name: str, start: int, base: torch.Tensor, models: list[torch.Tensor],
                model_params: list[dict[str, Any]]) -> None:
        self._start(p, base, model_params)
        for sel, m in zip(self.select, models):
            if sel is not None:
                sel.observe(p, (m - base).abs_())

    def observe_native(self, p: int, name: str, start: int, base: torch.Tensor, models: list[torch.Tensor],
                       model_params: list[dict[str, Any]]) -> int:
        """:meth:`observe` for raw blocks (native kernels); returns #non-finite inputs."""
        self._start(p, base, model_params)
        return sum(sel.observe_native(p, base, m) for sel, m in zip(self.select, models) if sel is not None)

    def end_pass(self, p: int) -> None:
        for sel, d in zip(self.select, self.density):
            if sel is None:
                continue
            if p == 0:
                k = max(self.total - int(self.total * d), 1)
                sel.ranks = [k - 1]
            sel.end_pass(p)

    def result(self) -> dict[str, Any]:
        return {"thresholds": [None if s is None else s.value[0] for s in self.select]}


def _ties_prepass(params: dict[str, Any]) -> GlobalTrimThreshold | None:
    return GlobalTrimThreshold() if params.get("trim_scope") == "model" else None


def trim_sparsifiers(n: int, density: list[float], trim_scope: str,
                     thresholds: list[float | None] | None) -> list[Sparsifier]:
    out: list[Sparsifier] = []
    for i, d in enumerate(density):
        if d >= 1.0:
            out.append(Sparsifier())
        elif trim_scope == "tensor":
            out.append(RankWindowSparsifier(n, *topk_window(n, d)))
        else:
            out.append(ThresholdSparsifier(n, d, thresholds[i] if thresholds else None))
    return out


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
def ties(shape: tuple[int, ...], *, weight: list[float], density: list[float], lam: float, normalize: bool,
         trim_scope: str, sign_election: str, consensus_method: str, divisor: str,
         thresholds: list[float | None] | None = None) -> TaskVectorMerger:
    """θ₀ + λ·disjoint-merge(elect(trim(τᵢ))). See :class:`~moerge.methods.task_vector.TaskVectorMerger`.

    ``trim_scope="tensor"`` keeps exactly max(1, ⌊density·n⌋) entries per tensor
    (ties in magnitude broken by position). ``"model"`` keeps |τ| ≥ the model's
    threshold from the whole-model pre-pass (without one, this tensor is the population).
    """
    n = math.prod(shape)
    return TaskVectorMerger(weight=weight, lam=lam, sparsifiers=trim_sparsifiers(n, density, trim_scope, thresholds),
                            consensus=consensus_method, sign_election=sign_election, normalize=normalize,
                            divisor=divisor, zero_sign=zero_sign_rule(sign_election))

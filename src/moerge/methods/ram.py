"""RAM and RAM+: keep what one expert alone changed, average what several changed.

An entry of model i's task vector is *active* when |τᵢ| > ε. Entries active in
exactly one model keep that model's value (RAM+ scales them up by λᵢ); entries
active in several get the mean over the active ones. Elementwise, so blocks
stream; RAM+ adds one counting pass (per tensor, as mergekit's ``ramplus_tl``,
or over the whole model with ``rho_scope: model``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from moerge.methods.base import Param, register
from moerge.methods.protocol import TensorMerger

CITATION = "Reinforced Agent Merging (arXiv:2601.13572), as implemented by mergekit 0.1.5"
EPSILON = Param("epsilon", float, 1e-5, "a task-vector entry counts as changed when |τ| exceeds this",
                low=0.0, gradient=False)


def _active(base: torch.Tensor, models: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    tvs = [m - base for m in models]
    act = [t.abs() > epsilon for t in tvs]
    count = torch.zeros_like(base, dtype=torch.int32)
    for a in act:
        count += a
    return tvs, act, count


def shared_unique_counts(base: torch.Tensor, models: list[torch.Tensor], epsilon: float) -> list[tuple[int, int]]:
    """Per model: (active entries also active in another model, active entries active in it alone)."""
    _, act, count = _active(base, models, epsilon)
    shared, unique = count > 1, count == 1
    return [(int((a & shared).sum()), int((a & unique).sum())) for a in act]


class RamMerger(TensorMerger):
    """θ₀ + Σᵢ λᵢ·τᵢ·[i alone active] + mean of the active τᵢ where several are active."""

    def __init__(self, n: int, epsilon: float, r: float | None = None, alpha: float = 0.0,
                 counts: list[tuple[int, int]] | None = None) -> None:
        self.epsilon, self.r, self.alpha = epsilon, r, alpha
        self.lam = [1.0] * n
        self.counts = [[0, 0] for _ in range(n)]
        if r is not None and counts is None:
            self.passes = 1  # RAM+ per tensor: count first
        elif r is not None and counts is not None:
            self._set_lambda(counts)

    def _set_lambda(self, counts: list[tuple[int, int]] | list[list[int]]) -> None:
        assert self.r is not None
        # mergekit: ρᵢ = shared / max(unique, ε) (so no unique entry gives ρ = shared/ε), clamped to [0, α]
        self.lam = [1.0 + self.r * min(max(s / max(u, self.epsilon), 0.0), self.alpha) for s, u in counts]

    def observe(self, p, start, base, models) -> None:
        for c, (s, u) in zip(self.counts, shared_unique_counts(base, models, self.epsilon)):
            c[0] += s
            c[1] += u

    def end_pass(self, p: int) -> None:
        self._set_lambda(self.counts)

    def emit(self, start, base, models) -> torch.Tensor:
        tvs, act, count = _active(base, models, self.epsilon)
        unique = count == 1
        shared = count > 1
        out = torch.zeros_like(base)
        for lam, t, a in zip(self.lam, tvs, act):
            out += t * (a & unique) * lam
        share = torch.zeros_like(base)
        for t, a in zip(tvs, act):
            share += t * (a & shared)
        out += share / count.clamp_min(1)
        return base + out


@register(
    "ram",
    params=(EPSILON,),
    summary="keep task-vector entries changed by one model alone; average those changed by several",
    citation=CITATION,
    needs_base=True,
)
def ram(shape: tuple[int, ...], *, epsilon: float, n_models: int) -> RamMerger:
    """θ₀ + Σ τᵢ·[only i active] + (Σ active τᵢ)/#active where several are."""
    return RamMerger(n_models, epsilon)


class RamCounts:
    """Pre-pass of ``rho_scope: model``: each model's shared and unique active entries over all tensors."""

    passes = 1

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon
        self.counts: list[list[int]] = []
        self._lock = threading.Lock()

    def observe(self, p: int, name: str, start: int, base: torch.Tensor, models: list[torch.Tensor],
                model_params: list[dict[str, Any]]) -> None:
        got = shared_unique_counts(base.float(), [m.float() for m in models], self.epsilon)
        with self._lock:
            if not self.counts:
                self.counts = [[0, 0] for _ in models]
            for c, (s, u) in zip(self.counts, got):
                c[0] += s
                c[1] += u

    def observe_native(self, p: int, name: str, start: int, base: torch.Tensor, models: list[torch.Tensor],
                       model_params: list[dict[str, Any]]) -> int:
        bad = int((~torch.isfinite(base)).sum()) + sum(int((~torch.isfinite(m)).sum()) for m in models)
        self.observe(p, name, start, base, models, model_params)
        return bad

    def end_pass(self, p: int) -> None:
        pass

    def result(self) -> dict[str, Any]:
        return {"ram_counts": [tuple(c) for c in self.counts]}


def _ram_prepass(params: dict[str, Any]) -> RamCounts | None:
    return RamCounts(params["epsilon"]) if params.get("rho_scope") == "model" else None


@register(
    "ramplus_tl",
    params=(
        Param("r", float, 0.1, "how much unique entries are amplified: λᵢ = 1 + r·clamp(ρᵢ, 0, α)", low=0.0),
        Param("alpha", float, 0.2, "upper clamp of the overlap ratio ρᵢ = shared/unique", low=0.0),
        EPSILON,
        Param("rho_scope", str, "tensor", "count shared and unique entries per tensor (mergekit's "
              "ramplus_tl, 'tensor-local') or over each model's whole task vector", choices=("tensor", "model"),
              gradient=False, in_mergekit=False, constant=True),
    ),
    summary="RAM, with each model's unique entries amplified by its overlap ratio",
    citation=CITATION,
    needs_base=True,
    prepass=_ram_prepass,
)
def ramplus_tl(shape: tuple[int, ...], *, r: float, alpha: float, epsilon: float, rho_scope: str, n_models: int,
               ram_counts: list[tuple[int, int]] | None = None) -> RamMerger:
    """RAM with unique entries × λᵢ, λᵢ = 1 + r·clamp(sharedᵢ / max(uniqueᵢ, ε), 0, α)."""
    return RamMerger(n_models, epsilon, r, alpha, ram_counts if rho_scope == "model" else None)

"""DELLA: drop task-vector entries with probabilities ranked by magnitude (MagPrune), rescale, merge.

Each entry of τᵢ is kept with probability pₖ = density + s·(2ρ − 1), where ρ ∈ [0, 1] is its
normalised magnitude rank (larger entries are kept more often) and s the half-width of the
range. The two implementations differ in three ways, each a parameter here:

==================  ===========================================  =============================================
                    paper (DELLA reference code, PaddleNLP)       mergekit 0.1.5
==================  ===========================================  =============================================
``rank_scope``      ``tensor``: ranks over the flattened tensor,  ``row``: ranks along dimension 1 (each row of
                    ρ = (a + 1)/n for ascending rank a            a matrix; a 1-D tensor is one row),
                                                                  ρ = a/(m − 1)
``epsilon_spread``  ``half``: p ∈ [density − ε/2, density + ε/2]  ``full``: p ∈ [density − ε, density + ε]
``rescale_norm``    ``inverse_probability``: each kept entry ÷ pₖ ``l1``: one factor per tensor restoring its L1
                    (unbiased: E[τ̂] = τ)                          norm
==================  ===========================================  =============================================

Masks come from moerge's counter-based stream (``moerge.methods.masks``), seeded per
(recipe seed, tensor, model): reproducible in any block order, never mergekit's global torch RNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moerge.methods.base import LAMBDA, WEIGHT, Param, register
from moerge.methods.masks import keep_with_probability, tensor_seed
from moerge.methods.task_vector import Sparsifier, TaskVectorMerger
from moerge.methods.ties import TIES_CONVENTIONS, zero_sign_rule

CITATION = ("Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
            "Magnitude-Based Sampling (arXiv:2406.11617)")


def _ranks(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Ascending ranks along ``dim`` (ties by position): one stable sort and a scatter."""
    order = torch.argsort(x, dim=dim, stable=True)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    positions = torch.arange(x.shape[dim], device=x.device).view(shape).expand_as(order)
    return torch.empty_like(order).scatter_(dim, order, positions)


def della_probabilities(magnitude: torch.Tensor, density: float, half_width: float, rank_scope: str,
                        shape: tuple[int, ...]) -> torch.Tensor:
    """Keep probabilities of a block of whole rows (``row``) or of the whole tensor (``tensor``)."""
    flat = magnitude.reshape(-1)
    if rank_scope == "tensor":
        n = flat.numel()
        rank = _ranks(flat, 0).to(torch.float64)
        rho = (rank + 1.0) / n
    else:
        d1 = shape[1] if len(shape) >= 2 else flat.numel()
        rest = math.prod(shape[2:]) if len(shape) >= 2 else 1
        m = flat.view(-1, d1, rest)
        rank = _ranks(m, 1).to(torch.float64)
        # mergekit divides by (m − 1): NaN for rows of one entry, which moerge keeps at ρ = ½ (p = density)
        rho = (rank / (d1 - 1)).reshape(-1) if d1 > 1 else torch.full_like(flat, 0.5, dtype=torch.float64)
    return (density + half_width * (2.0 * rho - 1.0)).clamp(0.0, 1.0)


class MagPruneSparsifier(Sparsifier):
    """DELLA's MagPrune on one model's task vector (see the module for the conventions)."""

    def __init__(self, shape: tuple[int, ...], density: float, half_width: float, seed: int, rescale: bool,
                 rescale_norm: str, rank_scope: str) -> None:
        self.shape, self.density, self.half_width, self.seed = shape, density, half_width, seed
        self.rank_scope = rank_scope
        self.inverse = rescale and rescale_norm == "inverse_probability"
        self.passes = 1 if rescale and rescale_norm == "l1" else 0
        self.before = self.after = 0.0
        # the L1 pass's keep-masks, bit-packed per block, so the output pass need not rank again
        self.bits: dict[int, np.ndarray] = {}

    def _keep(self, start: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = della_probabilities(delta.abs(), self.density, self.half_width, self.rank_scope, self.shape)
        return keep_with_probability(start, p, self.seed).view(delta.shape), p.view(delta.shape)

    def observe(self, p: int, start: int, delta: torch.Tensor) -> None:
        keep, _ = self._keep(start, delta)
        a = delta.abs().double()
        self.before += float(a.sum())
        self.after += float((a * keep).sum())
        if not self.inverse:
            self.bits[start] = np.packbits(keep.reshape(-1).cpu().numpy())

    def end_pass(self, p: int) -> None:
        if self.before >= 1e-7 and self.after >= 1e-7:  # mergekit: skipped when either L1 norm is ~0
            self.scale = self.before / self.after

    def mask(self, start: int, delta: torch.Tensor) -> torch.Tensor | None:
        bits = self.bits.pop(start, None)
        if bits is not None:
            unpacked = np.unpackbits(bits, count=delta.numel()).astype(bool)
            return torch.from_numpy(unpacked).to(delta.device).view(delta.shape)
        keep, p = self._keep(start, delta)
        if self.inverse:
            return torch.where(keep, 1.0 / p.clamp_min(1e-12), 0.0).to(delta.dtype)
        return keep


class DellaMerger(TaskVectorMerger):
    def native_ok(self) -> bool:
        return False


def spread_error(density: list[float], epsilon: list[float], epsilon_spread: str) -> str | None:
    """Why these keep probabilities would leave (0, 1), or None (density 1 prunes nothing: always fine)."""
    for i, (d, eps) in enumerate(zip(density, epsilon)):
        half = eps if epsilon_spread == "full" else eps / 2.0
        if d < 1.0 and (d + half >= 1.0 or d - half <= 0.0):
            width = "epsilon" if epsilon_spread == "full" else "epsilon/2"
            return (f"model {i + 1}: density ± {width} must lie inside (0, 1); got density {d:g}, epsilon {eps:g} "
                    f"(epsilon_spread: {epsilon_spread})")
    return None


def _check(model_params: list[dict], params: dict) -> str | None:
    return spread_error([mp["density"] for mp in model_params], [mp["epsilon"] for mp in model_params],
                        params["epsilon_spread"])


def _sparsifiers(shape: tuple[int, ...], density: list[float], epsilon: list[float], seed: int, rescale: bool,
                 rescale_norm: str, rank_scope: str, epsilon_spread: str) -> list[Sparsifier]:
    if (why := spread_error(density, epsilon, epsilon_spread)) is not None:
        raise ValueError(why)
    out: list[Sparsifier] = []
    for i, (d, eps) in enumerate(zip(density, epsilon)):
        half = eps if epsilon_spread == "full" else eps / 2.0
        if d >= 1.0:
            out.append(Sparsifier())
            continue
        out.append(MagPruneSparsifier(shape, d, half, tensor_seed(seed, i), rescale, rescale_norm, rank_scope))
    return out


def _merger(shape: tuple[int, ...], rank_scope: str, **kw) -> DellaMerger:
    m = DellaMerger(**kw)
    m.row_aligned = rank_scope == "row"
    m.whole_block = rank_scope == "tensor" or len(shape) < 2
    return m


DELLA_PARAMS = (
    WEIGHT,
    Param("density", float, 0.5, "mean probability that a task-vector entry is kept", per_model=True,
          low=0.0, high=1.0, low_open=True, defaults={"mergekit": 1.0}),
    Param("epsilon", float, 0.15, "spread of the keep probabilities around the density (see epsilon_spread)",
          per_model=True, low=0.0),
    LAMBDA,
    Param("rescale", bool, True, "rescale the kept entries (see rescale_norm)"),
    Param("rescale_norm", str, "inverse_probability", "divide each kept entry by its keep probability "
          "(paper) or restore each tensor's L1 norm with one factor (mergekit)",
          choices=("inverse_probability", "l1"), defaults={"mergekit": "l1"}, gradient=False, in_mergekit=False),
    Param("rank_scope", str, "tensor", "rank magnitudes over the whole tensor (paper) or along each row, "
          "dimension 1 (mergekit)", choices=("tensor", "row"), defaults={"mergekit": "row"}, gradient=False,
          in_mergekit=False),
    Param("epsilon_spread", str, "half", "keep probabilities in density ± epsilon/2 (paper) or density ± "
          "epsilon (mergekit)", choices=("half", "full"), defaults={"mergekit": "full"}, gradient=False,
          in_mergekit=False),
)


def _whole(params: dict) -> bool:
    return params.get("rank_scope") == "tensor"


@register(
    "della",
    params=(*DELLA_PARAMS,
            Param("normalize", bool, True, "disjoint mean (true) or disjoint sum (false)"),
            *[p for p in TIES_CONVENTIONS if p.name != "trim_scope"]),
    summary="drop task-vector entries with magnitude-ranked probabilities, rescale, then TIES sign "
    "election and disjoint merge",
    citation=CITATION,
    needs_base=True,
    whole_tensor=_whole,
    check=_check,
)
def della(shape: tuple[int, ...], *, weight: list[float], density: list[float], epsilon: list[float], lam: float,
          rescale: bool, rescale_norm: str, rank_scope: str, epsilon_spread: str, normalize: bool,
          sign_election: str, consensus_method: str, divisor: str, seed: int = 0) -> DellaMerger:
    """θ₀ + λ·disjoint-merge(elect(MagPrune(τᵢ)))."""
    sp = _sparsifiers(shape, density, epsilon, seed, rescale, rescale_norm, rank_scope, epsilon_spread)
    return _merger(shape, rank_scope, weight=weight, lam=lam, sparsifiers=sp, consensus=consensus_method,
                   sign_election=sign_election, normalize=normalize, divisor=divisor,
                   zero_sign=zero_sign_rule(sign_election))


@register(
    "della_linear",
    params=(*DELLA_PARAMS, Param("normalize", bool, False, "divide by the sum of the weights")),
    summary="drop task-vector entries with magnitude-ranked probabilities, rescale, then task arithmetic",
    citation=CITATION,
    needs_base=True,
    whole_tensor=_whole,
    check=_check,
)
def della_linear(shape: tuple[int, ...], *, weight: list[float], density: list[float], epsilon: list[float],
                 lam: float, rescale: bool, rescale_norm: str, rank_scope: str, epsilon_spread: str,
                 normalize: bool, seed: int = 0) -> DellaMerger:
    """θ₀ + λ·Σ wᵢ·MagPrune(τᵢ)."""
    sp = _sparsifiers(shape, density, epsilon, seed, rescale, rescale_norm, rank_scope, epsilon_spread)
    return _merger(shape, rank_scope, weight=weight, lam=lam, sparsifiers=sp, normalize=normalize)

"""The shared core of TIES, DARE and Breadcrumbs: sparsify task vectors, elect signs, combine.

Each method supplies a *sparsifier* that turns model i's task vector into a
keep-mask and a rescale factor; this module does the rest, touching one task
vector at a time so that memory holds the inputs, one fp32 temporary, the
accumulators and one boolean mask per model (never all task vectors in fp32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sparsifier = Callable[[int, torch.Tensor], tuple[torch.Tensor | None, float]]

SIGN_ELECTION = ("unweighted", "weighted")
CONSENSUS = ("sum", "count")
DIVISOR = ("count", "weight_sum")


def combine(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    weight: list[float],
    lam: float,
    sparsify: Sparsifier | None,
    consensus: str | None,
    sign_election: str = "unweighted",
    normalize: bool = False,
    divisor: str = "count",
    zero_sign: str = "plus",
) -> torch.Tensor:
    """θ₀ + λ·merge of sparsified task vectors.

    Without ``consensus``: merged = Σ wᵢτ̂ᵢ (÷ Σ wᵢ when ``normalize``).
    With ``consensus`` (``sum`` or ``count``), TIES-style:
      1. elect γ = sign(Σᵢ cᵢ) per entry, where cᵢ = τ̂ᵢ (``unweighted``) or wᵢτ̂ᵢ
         (``weighted``); with ``count`` the signs of cᵢ are summed instead.
         An exact tie elects + (``zero_sign="plus"``), or the sign that wins over
         the whole tensor (``"majority"``, the TIES reference code);
      2. keep entries whose cᵢ has sign γ (zeros never agree);
      3. merged = Σ agreeing wᵢτ̂ᵢ, divided (when ``normalize``) by the number of
         agreeing models (``divisor="count"``) or their summed weight
         (``"weight_sum"``), a zero divisor counting as 1.
    """
    masks: list[torch.Tensor | None] = []
    scales: list[float] = []

    def task_vector(i: int) -> torch.Tensor:
        d = models[i] - base
        if masks[i] is not None:
            d.mul_(masks[i])
        if scales[i] != 1.0:
            d.mul_(scales[i])
        return d

    if consensus is None:
        out = torch.zeros_like(base)
        for i in range(len(models)):
            d = models[i] - base
            mask, scale = sparsify(i, d) if sparsify else (None, 1.0)
            if mask is not None:
                d.mul_(mask)
            out.add_(d, alpha=weight[i] * scale)
        if normalize:
            total = sum(weight)
            out.div_(total if total != 0 else 1.0)
        return base + lam * out

    # pass 1: sparsify and vote
    vote = torch.zeros_like(base)
    for i in range(len(models)):
        d = models[i] - base
        mask, scale = sparsify(i, d) if sparsify else (None, 1.0)
        masks.append(mask)
        scales.append(scale)
        if mask is not None:
            d.mul_(mask)
        sign_factor = weight[i] * scale if sign_election == "weighted" else scale
        if consensus == "sum":
            vote.add_(d, alpha=sign_factor)
        else:
            vote.add_(d.sign_(), alpha=1.0 if sign_factor >= 0 else -1.0)
    elected = torch.sign(vote)
    del vote
    if zero_sign == "majority":
        majority = torch.sign(elected.sum())
        tie = 1.0 if majority == 0 else float(majority)
    else:
        tie = 1.0
    elected[elected == 0] = tie

    # pass 2: disjoint merge of the agreeing entries
    num = torch.zeros_like(base)
    den = torch.zeros_like(base) if normalize else None
    for i in range(len(models)):
        d = task_vector(i)
        sign_factor = weight[i] if sign_election == "weighted" else 1.0
        s = d.sign()
        if sign_factor < 0:
            s.neg_()
        agree = s == elected
        d.mul_(agree)
        num.add_(d, alpha=weight[i])
        if den is not None:
            den.add_(agree.to(den.dtype), alpha=weight[i] if divisor == "weight_sum" else 1.0)
    if den is not None:
        den[den == 0] = 1.0
        num.div_(den)
    return base + lam * num

"""Arrow (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs",
arXiv:2405.11157): each expert's prototype in a module is the top right singular vector of its
ΔW = s · B · A (a unit vector of the input space); a token is routed by |x · p_e|.

The prototype is computed exactly from a small core, never forming ΔW: with the thin QR factorisations
Aᵀ = Q_A R_A and B = Q_B R_B, ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the right singular vectors of ΔW are Q_A times
those of the r×r core. PEFT 0.21 runs 15 steps of power iteration from a random start instead, which
converges as (σ₂/σ₁)^30 and so differs from the exact vector when the two top singular values are close;
mttl's ``_low_rank_svd`` is exact like this one. The sign of a singular vector is arbitrary; every score
that uses it takes |·|.

GenKnowSub (ACL 2025 short paper, aclanthology.org/2025.acl-short.54, as PEFT cites it), as an option: the mean
ΔW of general-knowledge adapters is subtracted from every task expert before prototypes are taken and in
the routed forward. ``gks: exact`` subtracts the mean of the products, mean_g(s_g B_g A_g), a rank ≤ G·r
update; ``gks: factors`` reproduces PEFT's code, which subtracts the mean A and the mean B from each
expert's factors ((B − B̄)(A − Ā), which is not ΔW minus the mean ΔW).
"""

from __future__ import annotations

import torch

GKS_MODES = ("none", "exact", "factors")


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(unit top right singular vector [in], its singular value) of B·A for A [r, in], B [out, r], computed
    in float64 from the r×r core. The sign is fixed so that the largest-magnitude entry is positive."""
    a64, b64 = a.double(), b.double()
    q_a, r_a = torch.linalg.qr(a64.T)  # Aᵀ = Q_A R_A, Q_A: [in, r]
    q_b, r_b = torch.linalg.qr(b64)  # B = Q_B R_B
    _, s, vh = torch.linalg.svd(r_b @ r_a.T)
    v = q_a @ vh[0]
    v = v * torch.sign(v[v.abs().argmax()])
    return v, float(s[0])


def arrow_rows(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, list[float]]:
    """Router rows [E, in] (float32 unit prototypes) and each expert's top singular value (of s·B·A)."""
    rows, sigmas = [], []
    for a, b, scale in factors:
        v, sigma = top_right_singular_vector(a, b)
        rows.append(v.float())
        sigmas.append(sigma * abs(scale))
    return torch.stack(rows), sigmas


def subtract_general(factors: list[tuple[torch.Tensor, torch.Tensor, float]],
                     general: list[tuple[torch.Tensor, torch.Tensor, float]],
                     mode: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Each expert with the general adapters' mean removed (GenKnowSub). ``exact``: the factors of
    s_e B_e A_e − mean_g s_g B_g A_g as one adapter of rank r_e + Σ r_g (A stacked, B concatenated), scale
    1; ``factors``: PEFT's (B_e − B̄)(A_e − Ā) with the expert's scale (all ranks must then agree)."""
    if mode == "none" or not general:
        return factors
    g = len(general)
    if mode == "exact":
        a_g = torch.cat([a for a, _, _ in general])
        b_g = torch.cat([b * (s / g) for _, b, s in general], dim=1)
        return [(torch.cat([a, a_g]), torch.cat([b * s, -b_g], dim=1), 1.0) for a, b, s in factors]
    if mode == "factors":
        ranks = {a.shape[0] for a, _, _ in factors + general}
        if len(ranks) > 1:
            raise ValueError(f"gks: factors subtracts mean factors, which needs one rank for every adapter "
                             f"(found ranks {sorted(ranks)}); use gks: exact")
        mean_a = torch.stack([a for a, _, _ in general]).mean(0)
        mean_b = torch.stack([b for _, b, _ in general]).mean(0)
        return [(a - mean_a, b - mean_b, s) for a, b, s in factors]
    raise ValueError(f"gks must be one of {', '.join(GKS_MODES)}; got {mode!r}")

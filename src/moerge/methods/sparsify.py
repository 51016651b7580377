"""Masks that sparsify a task vector: magnitude top-k, rank windows, seeded Bernoulli.

All masks are deterministic. Ties in magnitude are broken by position (the
later element ranks higher), so the number of kept entries is exact, which is
what mergekit's per-tensor top-k does (by sorting) at a fraction of the cost.
"""

from __future__ import annotations

import hashlib

import torch

RNG_BLOCK = 1 << 20  # elements per independently seeded random block


def top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``magnitude`` (ties: later index wins)."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view(magnitude.shape)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).view(magnitude.shape)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        equal = flat == threshold
        # keep the `missing` equal entries with the highest index
        from_end = torch.flip(torch.cumsum(torch.flip(equal, [0]).to(torch.int64), 0), [0])
        mask |= equal & (from_end <= missing)
    return mask.view(magnitude.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` largest-magnitude entries of one tensor (TIES trim)."""
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    return top_mask(delta.abs(), k)


def rank_window_mask(delta: torch.Tensor, drop_low: int, drop_high: int) -> torch.Tensor:
    """Drop the ``drop_low`` smallest and the ``drop_high`` largest-magnitude entries."""
    n = delta.numel()
    mag = delta.abs()
    keep = top_mask(mag, n - drop_low)
    if drop_high > 0:
        keep &= ~top_mask(mag, drop_high)
    return keep


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries dropped at the bottom, entries dropped at the top) for Model Breadcrumbs.

    ``gamma`` is the fraction of largest entries dropped; ``density`` the fraction
    kept overall. When the two overlap, the top drop is reduced (as in mergekit).
    """
    if density >= 1.0 and gamma <= 0:
        return 0, 0
    n_top = int(gamma * n)
    n_bot = n - int(density * n) - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def tensor_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (recipe seed, tensor name, model index...)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def bernoulli_keep(shape: torch.Size | tuple[int, ...], density: float, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-mask with P(keep) = density, reproducible from ``seed`` alone.

    The stream is cut into fixed blocks of :data:`RNG_BLOCK` elements, each with
    its own generator, so the mask does not depend on processing order, chunk
    size or thread count.
    """
    n = 1
    for d in shape:
        n *= d
    out = torch.empty(n, dtype=torch.bool, device=device)
    gen = torch.Generator(device="cpu")
    for i, start in enumerate(range(0, n, RNG_BLOCK)):
        stop = min(n, start + RNG_BLOCK)
        gen.manual_seed(tensor_seed(seed, i))
        u = torch.rand(stop - start, generator=gen)
        out[start:stop] = (u < density).to(device)
    return out.view(tuple(shape))


def elect_sign(contributions: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Elected sign per entry (+1 or -1) from stacked contributions ``[N, ...]``.

    ``sum``: sign of the summed contributions (TIES "mass"); ``count``: sign of
    the summed signs. An exact tie elects +1.
    """
    if method == "sum":
        total = contributions.sum(0)
    elif method == "count":
        total = contributions.sign().sum(0)
    else:  # pragma: no cover - validated by the schema
        raise ValueError(method)
    return torch.where(total >= 0, 1.0, -1.0).to(contributions.dtype)

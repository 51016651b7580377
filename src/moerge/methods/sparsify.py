"""Seeds and random keep-masks that do not depend on processing order or block size."""

from __future__ import annotations

import hashlib
import math

import torch

RNG_BLOCK = 1 << 20  # elements per independently seeded random block


def tensor_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (recipe seed, tensor name, model index...)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def bernoulli_keep_range(start: int, stop: int, density: float, seed: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements [start, stop) of a keep-mask with P(keep) = density, reproducible from ``seed``.

    The random stream is cut into fixed blocks of :data:`RNG_BLOCK` elements,
    each drawn from its own generator seeded by (seed, block index), so any
    range of the mask is the same whether the tensor is processed whole, in
    blocks of any size, or in any order.
    """
    out = torch.empty(stop - start, dtype=torch.bool)
    gen = torch.Generator(device="cpu")
    first, last = start // RNG_BLOCK, (stop - 1) // RNG_BLOCK if stop > start else start // RNG_BLOCK - 1
    for b in range(first, last + 1):
        b0 = b * RNG_BLOCK
        lo, hi = max(start, b0), min(stop, b0 + RNG_BLOCK)
        gen.manual_seed(tensor_seed(seed, b))
        u = torch.rand(hi - b0, generator=gen)[lo - b0:]
        out[lo - start:hi - start] = u < density
    return out.to(device)


def bernoulli_keep(shape: torch.Size | tuple[int, ...], density: float, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """A whole keep-mask of ``shape`` (see :func:`bernoulli_keep_range`)."""
    n = math.prod(shape)
    return bernoulli_keep_range(0, n, density, seed, device).view(tuple(shape))


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries dropped at the bottom, entries dropped at the top) for Model Breadcrumbs.

    ``gamma`` is the fraction of largest entries dropped; ``density`` the fraction
    kept overall. When the two overlap, the top drop is reduced (as in mergekit).
    """
    if density >= 1.0:
        return 0, 0
    n_top = int(gamma * n)
    n_bot = n - int(density * n) - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def topk_window(n: int, density: float) -> tuple[int, int]:
    """The ascending-rank window [lo, hi) of a top-k trim keeping max(1, ⌊density·n⌋) entries."""
    if density >= 1.0:
        return 0, n
    k = max(1, int(density * n))
    return n - k, n

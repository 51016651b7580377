"""Seeds and random keep-masks that do not depend on processing order or block size."""

from __future__ import annotations

import hashlib
import math

import torch

M32 = 0xFFFFFFFF


def tensor_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (recipe seed, tensor name, model index...)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x·c) mod 2³² for x in [0, 2³²) held in int64, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash (C. Wellons), on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def bernoulli_keep_range(start: int, stop: int, density: float, seed: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements [start, stop) of a keep-mask with P(keep) = density, reproducible from ``seed``.

    Counter-based: element i is kept iff the top 24 bits of
    h(i) = mix(mix(i_lo ^ s_lo) ^ s_hi ^ i_hi) are below ⌈density·2²⁴⌉, where
    mix is the lowbias32 hash and s the 64-bit seed. Any range of the mask is the
    same whether the tensor is processed whole, in blocks of any size, in any
    order, on any device, or by the native kernel (``moerge.native``).
    """
    return uniform24_range(start, stop, seed, device) < min(1 << 24, math.ceil(density * (1 << 24)))


def uniform24_range(start: int, stop: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements [start, stop) of a seeded stream of integers uniform in [0, 2²⁴) (int64).

    Element i is the top 24 bits of h(i) = mix(mix(i_lo ^ s_lo) ^ s_hi ^ i_hi).
    Keeping i iff its value is below ⌈p·2²⁴⌉ keeps it with probability p (to
    2⁻²⁴); ``p`` may differ per element (DELLA's magnitude-ranked probabilities).
    """
    if torch.device(device).type == "cpu" and stop - start >= 4096:
        from moerge import native

        if native.available():
            return native.uniform24(start, stop - start, seed).to(torch.int64)
    return uniform24_torch(start, stop, seed, device)


def uniform24_torch(start: int, stop: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`uniform24_range` in torch arithmetic (any device; the reference of the C kernel)."""
    idx = torch.arange(start, stop, dtype=torch.int64, device=device)
    h = _mix32((idx & M32) ^ (seed & M32))
    h = _mix32(h ^ ((seed >> 32) & M32) ^ (idx >> 32))
    return h >> 8


def keep_with_probability(start: int, p: torch.Tensor, seed: int) -> torch.Tensor:
    """Keep-mask of the elements [start, start + p.numel()) of a flat tensor, element i with
    probability p[i] (clipped to [0, 1]), from the stream of :func:`uniform24_range`."""
    u = uniform24_range(start, start + p.numel(), seed, p.device).view(p.shape)
    return u < torch.ceil(p.double().clamp(0.0, 1.0) * (1 << 24)).to(torch.int64)


def sample_indices(count: int, n: int, seed: int) -> torch.Tensor:
    """``count`` positions in [0, n) drawn uniformly with replacement, reproducible from ``seed``
    (a 48-bit draw modulo n per position: the bias is below n·2⁻⁴⁸)."""
    hi = uniform24_range(0, count, seed)
    lo = uniform24_range(count, 2 * count, seed)
    return ((hi << 24) | lo) % n


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

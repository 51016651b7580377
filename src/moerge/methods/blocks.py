"""The block protocol: how a method merges one tensor, a flat block of elements at a time.

A method builds a :class:`TensorMerger` for one output tensor. The executor
then makes ``passes`` *statistics passes* over the tensor's blocks (norms,
dot products, exact magnitude thresholds...), calling :meth:`observe` per block
and :meth:`end_pass` after each pass, and finally one *output pass* calling
:meth:`emit` per block. Blocks are contiguous ranges of the flattened tensor,
in order, as float32 on the compute device; ``start`` is the block's first
element index. A merger's result never depends on the block size (tests check
this), so the executor is free to pick blocks that fit in cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

BLOCK = 1 << 20  # default elements per block (4 MiB of float32)


class TensorMerger(ABC):
    """Base class: no statistics pass by default; subclasses define the output pass."""

    passes = 0
    row_aligned = False  # blocks must hold whole rows (dim 0) of the tensor

    def observe(self, p: int, start: int, base: torch.Tensor | None, models: list[torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Accumulate statistics of pass ``p`` from one block."""

    def end_pass(self, p: int) -> None:  # noqa: B027 - optional hook
        """Called once after every block was observed in pass ``p``."""

    @abstractmethod
    def emit(self, start: int, base: torch.Tensor | None, models: list[torch.Tensor]) -> torch.Tensor:
        """The merged values of one block."""


def block_ranges(numel: int, shape: tuple[int, ...], block: int, row_aligned: bool) -> list[tuple[int, int]]:
    """[start, stop) ranges covering ``numel`` elements; whole rows when ``row_aligned``."""
    if numel == 0:
        return []
    if row_aligned and len(shape) >= 2 and shape[0] > 0:
        row = numel // shape[0]
        block = max(1, block // row) * row
    return [(s, min(numel, s + block)) for s in range(0, numel, block)]


def run_whole(merger: TensorMerger, base: torch.Tensor | None, models: list[torch.Tensor],
              block: int = BLOCK) -> torch.Tensor:
    """Run a merger over whole in-memory tensors (used by tests and small merges)."""
    shape = tuple(models[0].shape)
    flat_b = base.reshape(-1) if base is not None else None
    flat_m = [m.reshape(-1) for m in models]
    ranges = block_ranges(flat_m[0].numel(), shape, block, merger.row_aligned)
    for p in range(merger.passes):
        for s, e in ranges:
            merger.observe(p, s, flat_b[s:e] if flat_b is not None else None, [m[s:e] for m in flat_m])
        merger.end_pass(p)
    out = torch.empty_like(flat_m[0])
    for s, e in ranges:
        out[s:e] = merger.emit(s, flat_b[s:e] if flat_b is not None else None, [m[s:e] for m in flat_m])
    return out.view(shape)


class RankSelect:
    """Exact order statistics of a stream of non-negative floats, in two passes and O(1) memory.

    Radix selection on the float32 bit patterns (which order like the values):
    pass 0 histograms the high 16 bits; pass 1 the low 16 bits inside the bins
    that hold the wanted ranks. Afterwards, for each wanted rank r (0-based, in
    ascending order) we know its value, how many elements are smaller, and how
    many are equal.
    """

    passes = 2

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks
        self.hist_hi = torch.zeros(1 << 15, dtype=torch.int64)
        self.bins: list[int] = []
        self.below_bin: list[int] = []
        self.hist_lo: list[torch.Tensor] = []
        self.value: list[float] = []
        self.less: list[int] = []
        self.equal: list[int] = []

    def observe(self, p: int, values: torch.Tensor) -> None:
        bits = values.reshape(-1).view(torch.int32)
        hi = bits >> 16
        if p == 0:
            # |x| has a clear sign bit, so the high half-word is in [0, 2^15)
            self.hist_hi += torch.bincount(hi, minlength=1 << 15).cpu()
            return
        for b, hist in zip(self.bins, self.hist_lo):
            sel = bits[hi == b] & 0xFFFF
            if sel.numel():
                hist += torch.bincount(sel, minlength=1 << 16).cpu()

    def end_pass(self, p: int) -> None:  # noqa: B027 - optional hook
        if p == 0:
            cum = torch.cumsum(self.hist_hi, 0)
            for r in self.ranks:
                b = int(torch.searchsorted(cum, r, right=True))
                self.bins.append(b)
                self.below_bin.append(int(cum[b - 1]) if b > 0 else 0)
                self.hist_lo.append(torch.zeros(1 << 16, dtype=torch.int64))
            return
        for r, b, below, hist in zip(self.ranks, self.bins, self.below_bin, self.hist_lo):
            cum = torch.cumsum(hist, 0)
            lo = int(torch.searchsorted(cum, r - below, right=True))
            bits = torch.tensor([(b << 16) | lo], dtype=torch.int32)
            self.value.append(float(bits.view(torch.float32)[0]))
            self.less.append(below + (int(cum[lo - 1]) if lo > 0 else 0))
            self.equal.append(int(hist[lo]))


class RankWindowMask:
    """Keep the elements whose stable ascending rank by value lies in [lo, hi).

    Ties in value are ranked by position (earlier = lower rank), so exactly
    ``hi - lo`` elements are kept whatever the ties. Used for TIES's top-k trim
    (window [n−k, n)) and Breadcrumbs' window. Two statistics passes (exact
    radix selection), then :meth:`mask` per block in order.
    """

    passes = 2

    def __init__(self, n: int, lo: int, hi: int) -> None:
        self.n, self.lo, self.hi = n, lo, hi
        wanted = []
        if lo > 0:
            wanted.append(lo)  # rank of the first kept element
        if hi < n:
            wanted.append(hi - 1)  # rank of the last kept element
        self.select = RankSelect(wanted) if wanted else None
        self.passes = 2 if self.select else 0
        self.seen_lo_eq = 0
        self.seen_hi_eq = 0

    def observe(self, p: int, values: torch.Tensor) -> None:
        if self.select is not None:
            self.select.observe(p, values)

    def end_pass(self, p: int) -> None:  # noqa: B027 - optional hook
        if self.select is not None:
            self.select.end_pass(p)

    def restart(self) -> None:
        """Start a new pass of :meth:`mask` calls from the first block."""
        self.seen_lo_eq = 0
        self.seen_hi_eq = 0

    def mask(self, values: torch.Tensor) -> torch.Tensor | None:
        """Keep-mask of the next block (blocks must come in order)."""
        if self.select is None:
            return None
        keep: torch.Tensor | None = None
        k = 0
        if self.lo > 0:
            v, less = self.select.value[k], self.select.less[k]
            # among elements equal to v, the first (lo − less) by position fall below the window
            part, self.seen_lo_eq = _boundary(values, v, self.lo - less, self.seen_lo_eq, above=True)
            keep = part
            k += 1
        if self.hi < self.n:
            v, less = self.select.value[k], self.select.less[k]
            # among elements equal to v, the first (hi − less) by position are inside the window
            part, self.seen_hi_eq = _boundary(values, v, self.hi - less, self.seen_hi_eq, above=False)
            keep = part if keep is None else keep & part
        return keep


def _boundary(values: torch.Tensor, v: float, cut: int, seen: int, above: bool) -> tuple[torch.Tensor, int]:
    """Elements on the kept side of a rank boundary at value ``v``.

    ``above``: keep values > v and the equal ones after the first ``cut`` (by
    position, counting ``seen`` equal elements in earlier blocks); otherwise keep
    values < v and the first ``cut`` equal ones.
    """
    eq = values == v
    n_eq = int(eq.sum())
    strict = values > v if above else values < v
    if n_eq == 0:
        return strict, seen
    order = torch.cumsum(eq, 0, dtype=torch.int64) + seen  # 1-based position among the equal elements
    tie_kept = eq & ((order > cut) if above else (order <= cut))
    return strict | tie_kept, seen + n_eq

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

import math
import threading
from abc import ABC, abstractmethod

import numpy as np
import torch

BLOCK = 1 << 20  # default elements per block (4 MiB of float32)


class TensorMerger(ABC):
    """Base class: no statistics pass by default; subclasses define the output pass."""

    passes = 0
    row_aligned = False  # blocks must hold whole rows (dim 0) of the tensor

    def observe(self, p: int, start: int, base: torch.Tensor | None, models: list[torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Accumulate statistics of pass ``p`` from one block."""

    def end_pass(self, p: int) -> None:  # noqa: B027 - optional hook
        """Called once after every block was observed in pass ``p``. ``passes`` is read again after
        each pass: a merger may find it needs more (e.g. a sampled guess that missed)."""

    # Sampling (optional, native path): before the first pass the executor may hand the merger an
    # evenly spread sample of each raw input, to plan its passes (see :class:`RankSelect`).
    def sample_wanted(self) -> bool:
        return False

    def observe_sample(self, base: torch.Tensor | None, models: list[torch.Tensor]) -> None:  # noqa: B027
        """A sample (raw dtype, CPU) of the same positions of every input."""

    @abstractmethod
    def emit(self, start: int, base: torch.Tensor | None, models: list[torch.Tensor]) -> torch.Tensor:
        """The merged values of one block."""

    # The native protocol (optional): the same passes over *raw* blocks (stored dtype, CPU), run by the
    # fused kernels of moerge.native, which also round into the output block. Both return the number
    # of non-finite input values they saw.
    def native_ok(self) -> bool:
        """Whether :meth:`observe_native` and :meth:`emit_native` are implemented for this tensor."""
        return False

    def observe_native(self, p: int, start: int, base: torch.Tensor | None, models: list[torch.Tensor]) -> int:
        raise NotImplementedError

    def emit_native(self, start: int, base: torch.Tensor | None, models: list[torch.Tensor], out: torch.Tensor,
                    flags: object) -> int:
        """Merge one raw block into ``out`` (bfloat16/float32); ``flags`` counts non-finite results."""
        raise NotImplementedError


def block_ranges(numel: int, shape: tuple[int, ...], block: int, row_aligned: bool) -> list[tuple[int, int]]:
    """[start, stop) ranges covering ``numel`` elements; whole rows when ``row_aligned``."""
    if numel == 0:
        return []
    if row_aligned and len(shape) >= 2 and shape[0] > 0:
        row = numel // shape[0]
        block = max(1, block // row) * row
    return [(s, min(numel, s + block)) for s in range(0, numel, block)]


def run_whole(merger: TensorMerger, base: torch.Tensor | None, models: list[torch.Tensor],
              block: int = BLOCK, native: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run a merger over whole in-memory tensors (used by tests and small merges).

    ``native`` runs the native protocol on the tensors as they are (bfloat16 or
    float32) into ``out_dtype`` (default: the models' dtype); otherwise blocks
    go through the torch path as float32.
    """
    shape = tuple(models[0].shape)
    flat_b = base.reshape(-1) if base is not None else None
    flat_m = [m.reshape(-1) for m in models]
    ranges = block_ranges(flat_m[0].numel(), shape, block, merger.row_aligned)

    def blk(s: int, e: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return (flat_b[s:e] if flat_b is not None else None), [m[s:e] for m in flat_m]

    if native and merger.sample_wanted():
        merger.observe_sample(*sample_of(flat_b, flat_m))
    p = 0
    while p < merger.passes:
        for s, e in ranges:
            if native:
                merger.observe_native(p, s, *blk(s, e))
            else:
                merger.observe(p, s, *blk(s, e))
        merger.end_pass(p)
        p += 1
    if native:
        from moerge.native import new_flags

        out = torch.empty(flat_m[0].numel(), dtype=out_dtype or flat_m[0].dtype)
        flags = new_flags()
        for s, e in ranges:
            merger.emit_native(s, *blk(s, e), out[s:e], flags)
        return out.view(shape)
    out = torch.empty_like(flat_m[0])
    for s, e in ranges:
        out[s:e] = merger.emit(s, *blk(s, e))
    return out.view(shape)


SAMPLE_CHUNKS, SAMPLE_CHUNK = 64, 1024  # an evenly spread sample: 64 runs of 1024 elements


def sample_positions(numel: int) -> list[tuple[int, int]]:
    """[start, stop) runs of the sample of a tensor of ``numel`` elements."""
    if numel <= SAMPLE_CHUNKS * SAMPLE_CHUNK:
        return [(0, numel)]
    last = numel - SAMPLE_CHUNK
    return [(last * c // (SAMPLE_CHUNKS - 1), last * c // (SAMPLE_CHUNKS - 1) + SAMPLE_CHUNK)
            for c in range(SAMPLE_CHUNKS)]


def sample_of(base: torch.Tensor | None, models: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The sample runs of flat in-memory tensors, concatenated."""
    runs = sample_positions(models[0].numel())

    def take(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[s:e] for s, e in runs])

    return (take(base) if base is not None else None), [take(m) for m in models]


class RankSelect:
    """Exact order statistics of a stream of non-negative floats, in O(1) passes and small memory.

    Radix selection on the float32 bit patterns (which order like the values):
    pass 0 histograms the high 16 bits; pass 1 the low 16 bits inside the bins
    that hold the wanted ranks. Afterwards, for each wanted rank r (0-based, in
    ascending order) we know its value, how many elements are smaller, and how
    many are equal. With ``shared``, blocks may be observed from several threads at once.

    Native path, large tensors: given a sample first (:meth:`observe_sample`), each wanted rank is
    bracketed by sample quantiles ± six standard errors, and *one* pass counts the elements above each
    bracket and collects those inside it (about 2% of the tensor); the exact answer is then read from
    the sorted bracket. A bracket that misses its rank (or overflows) adds the two radix passes, so
    the result is always exact.
    """

    SAMPLE_MIN = 1 << 18  # smaller tensors: radix passes (a bracket pass would not save much)
    SAMPLE_MIN_VALUES = 4096  # a sample with fewer finite values brackets nothing
    MAX_SHARE = 0.05  # a bracket expected to gather more of the tensor than this is not worth its memory

    def __init__(self, ranks: list[int], shared: bool = False) -> None:
        self.passes = 2
        self.offset = 0  # radix pass p is pass p + offset (1 after a bracket pass that missed)
        self.bracket: tuple[list[int], list[int]] | None = None
        self.ranks = ranks
        self.shared = shared  # observed from several threads at once (else one thread, in order)
        self.hist_hi = torch.zeros(1 << 15, dtype=torch.int64)
        self.bins: list[int] = []
        self.below_bin: list[int] = []
        self.hist_lo = torch.zeros(0, 1 << 16, dtype=torch.int64)
        self.value: list[float] = []
        self.less: list[int] = []
        self.equal: list[int] = []
        self._lock = threading.Lock()

    def _add(self, p: int, hist: torch.Tensor) -> None:
        with self._lock:
            (self.hist_hi if p == 0 else self.hist_lo).add_(hist)

    def observe(self, p: int, values: torch.Tensor) -> None:
        bits = values.reshape(-1).view(torch.int32)
        hi = bits >> 16
        if p == 0:
            # |x| has a clear sign bit, so the high half-word is in [0, 2^15)
            self._add(0, torch.bincount(hi, minlength=1 << 15).cpu())
            return
        if self.bins:
            self._add(1, torch.stack([torch.bincount(bits[hi == b] & 0xFFFF, minlength=1 << 16).cpu()
                                      for b in self.bins]))

    # -- sampled bracket (native path) ---------------------------------------------------------
    def wants_sample(self, n: int) -> bool:
        return not self.shared and n >= self.SAMPLE_MIN and bool(self.ranks)

    def observe_sample(self, values: torch.Tensor, n: int) -> None:
        """Bracket each wanted rank of the ``n`` streamed values from a sample of them (float32)."""
        # numpy: its sort of float32 is vectorised, about 50x torch's on a 64 Ki sample
        a = values.detach().reshape(-1).float().cpu().numpy()
        if not np.isfinite(a).all():
            a = a[np.isfinite(a)]
        m = a.size
        if m < self.SAMPLE_MIN_VALUES:
            return
        bits = np.sort(a).view(np.int32)  # non-negative floats order like their bit patterns
        lo, hi, share = [], [], 0
        for r in self.ranks:
            q = (r + 0.5) / n
            d = 6.0 * math.sqrt(q * (1.0 - q) / m) + 16.0 / m  # six standard errors of a sample quantile
            i_lo, i_hi = math.floor((q - d) * m), math.ceil((q + d) * m)
            # Widen each bound to the next distinct sample value outside it. Quantised magnitudes (bf16
            # task vectors) come in long runs of one value; a bracket inside such a run would have no
            # margin at all, and a rank just beside the run would miss.
            if i_lo > 0:
                i_lo = int(np.searchsorted(bits, bits[min(i_lo, m - 1)], side="left")) - 1
            if i_hi < m - 1:
                i_hi = int(np.searchsorted(bits, bits[max(i_hi, 0)], side="right"))
            lo.append(0 if i_lo <= 0 else int(bits[i_lo]))
            hi.append(0x7F800000 if i_hi >= m - 1 else int(bits[i_hi]))  # +inf: nothing above
            # sample values strictly inside: what the pass will gather, in proportion
            share = max(share, int(np.searchsorted(bits, hi[-1], side="left"))
                        - int(np.searchsorted(bits, lo[-1], side="right")))
        if share > self.MAX_SHARE * m:  # one value fills a large part of the tensor: radix passes instead
            return
        self.bracket = (lo, hi)
        self.cap = min(n, int(2 * n * share / m) + 4096)  # twice the expected share, then fall back
        self.counts = torch.zeros(len(lo), 4, dtype=torch.int64)  # above hi, at hi, at lo, strictly inside
        self.members = [torch.empty(self.cap + 1, dtype=torch.int32) for _ in lo]
        self.n = n
        self.passes = 1

    def _end_bracket(self) -> None:
        assert self.bracket is not None
        found = []
        for k, r in enumerate(self.ranks):
            lo, hi = self.bracket[0][k], self.bracket[1][k]
            above, at_hi, at_lo, inside = (int(x) for x in self.counts[k])
            if lo == hi:
                at_lo = 0  # one value: counted once, as "at hi"
            below = self.n - above - at_hi - at_lo - inside
            i = r - below  # the rank within the bracket: at_lo × lo, then the inside ones sorted, then at_hi × hi
            if inside > self.cap or not 0 <= i < at_lo + inside + at_hi:
                break
            if i < at_lo:
                found.append((lo, below, at_lo))
            elif i < at_lo + inside:
                cand = np.sort(self.members[k][:inside].numpy())  # bit patterns of non-negative floats
                v = cand[i - at_lo]
                left = int(np.searchsorted(cand, v, side="left"))
                right = int(np.searchsorted(cand, v, side="right"))
                found.append((int(v), below + at_lo + left, right - left))
            else:
                found.append((hi, below + at_lo + inside, at_hi))
        self.members = []
        if len(found) == len(self.ranks):
            as_float = torch.tensor([f[0] for f in found], dtype=torch.int64).to(torch.int32).view(torch.float32)
            self.value = [float(v) for v in as_float]
            self.less = [f[1] for f in found]
            self.equal = [f[2] for f in found]
        else:  # a miss: the exact radix passes follow
            self.offset, self.passes = 1, 3

    def observe_native(self, p: int, base: torch.Tensor | None, model: torch.Tensor) -> int:
        """:meth:`observe` of |model − base| for raw blocks, by the native kernels; returns #non-finite inputs."""
        from moerge import native

        if self.bracket is not None:
            if p == 0:
                return native.bracket(base, model, *self.bracket, self.counts, self.members)
            p -= self.offset
        if p == 1 and not self.bins:
            return 0
        if not self.shared:  # the kernels add into the histograms themselves
            if p == 0:
                return native.hist_hi(base, model, self.hist_hi)
            return native.hist_lo(base, model, self.bins, self.hist_lo)
        if p == 0:
            hist = torch.zeros(1 << 15, dtype=torch.int64)
            nf = native.hist_hi(base, model, hist)
        else:
            hist = torch.zeros(len(self.bins), 1 << 16, dtype=torch.int64)
            nf = native.hist_lo(base, model, self.bins, hist)
        self._add(p, hist)
        return nf

    def end_pass(self, p: int) -> None:  # noqa: B027 - optional hook
        if self.bracket is not None:
            if p == 0:
                self._end_bracket()
                return
            p -= self.offset
        if p == 0:
            cum = torch.cumsum(self.hist_hi, 0)
            for r in self.ranks:
                b = int(torch.searchsorted(cum, r, right=True))
                self.bins.append(b)
                self.below_bin.append(int(cum[b - 1]) if b > 0 else 0)
            self.hist_lo = torch.zeros(len(self.bins), 1 << 16, dtype=torch.int64)
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

    def __init__(self, n: int, lo: int, hi: int) -> None:
        self.n, self.lo, self.hi = n, lo, hi
        self.empty = hi <= lo  # nothing kept
        wanted = []
        if self.empty:
            pass
        elif lo > 0:
            wanted.append(lo)  # rank of the first kept element
        if hi < n:
            wanted.append(hi - 1)  # rank of the last kept element
        self.select = RankSelect(wanted) if wanted else None
        self.seen_lo_eq = 0
        self.seen_hi_eq = 0

    @property
    def passes(self) -> int:
        return self.select.passes if self.select is not None else 0

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
        if self.empty:
            return torch.zeros_like(values, dtype=torch.bool)
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

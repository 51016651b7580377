"""Exact selection by magnitude over a tensor streamed in blocks: order statistics and rank windows.

TIES's top-k trim, Breadcrumbs' two-sided window and DARE's thresholds need the
exact k-th largest magnitude of a tensor too large to sort in memory.
:class:`RankSelect` finds it in a fixed number of histogram passes over the
float32 bit patterns; :class:`RankWindowMask` then keeps exactly the elements
whose rank lies in a window, ties broken by position.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch


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

    def end_pass(self, p: int) -> None:
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
        if not self.empty:  # an empty window needs no statistics (and its ranks may not exist)
            if lo > 0:
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

    def end_pass(self, p: int) -> None:
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

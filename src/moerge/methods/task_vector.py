"""The shared core of task arithmetic, TIES, DARE and Breadcrumbs.

Each model's task vector τᵢ = θᵢ − θ₀ goes through a *sparsifier* (a keep-mask
and a rescale factor, possibly after statistics passes of its own), then the
sparsified task vectors are combined, with or without TIES sign election.
Everything happens block by block, so memory holds one block per model.
"""

from __future__ import annotations

import ctypes

import torch

from moerge import native
from moerge.methods.masks import bernoulli_keep_range, tensor_seed
from moerge.methods.protocol import TensorMerger
from moerge.methods.select import RankSelect, RankWindowMask

TVModel = native.TVModel
SIGN_ELECTION = ("unweighted", "weighted")
CONSENSUS = ("sum", "count")
DIVISOR = ("count", "weight_sum")


class Sparsifier:
    """Keep everything (task arithmetic)."""

    passes = 0
    scale = 1.0

    def observe(self, p: int, start: int, delta: torch.Tensor) -> None:
        pass

    def end_pass(self, p: int) -> None:
        pass

    def restart(self) -> None:
        """Called before each pass that asks for masks block by block from the start."""

    def mask(self, start: int, delta: torch.Tensor) -> torch.Tensor | None:
        return None

    # native protocol: statistics of raw blocks, and the kernel's description of the mask
    def observe_native(self, p: int, start: int, base: torch.Tensor, model: torch.Tensor) -> int:
        return 0

    def native_spec(self, spec: TVModel) -> None:
        spec.mask = native.MASK_NONE
        spec.scale = self.scale

    def native_block(self, spec: TVModel, start: int) -> None:
        """Per-block fields of the kernel's description, before the block at ``start`` is combined."""

    def block_done(self, start: int) -> None:
        """The block at ``start`` is emitted: its per-block state may go."""

    def sample_wanted(self) -> bool:
        """Whether a sample of |τ| before the first pass saves passes (see RankSelect)."""
        return False

    def observe_sample(self, base: torch.Tensor | None, model: torch.Tensor) -> None:
        pass


def _abs_delta(base: torch.Tensor | None, model: torch.Tensor) -> torch.Tensor:
    m = model.to(torch.float32)
    return (m - base.to(torch.float32)).abs_() if base is not None else m.abs_()


class RankWindowSparsifier(Sparsifier):
    """Keep the entries whose magnitude rank lies in [lo, hi) (exact count; ties by position)."""

    def __init__(self, n: int, lo: int, hi: int) -> None:
        self.n = n
        self.window = RankWindowMask(n, lo, hi)

    @property
    def passes(self) -> int:  # type: ignore[override]
        return self.window.passes

    def sample_wanted(self) -> bool:
        return self.window.select is not None and self.window.select.wants_sample(self.n)

    def observe_sample(self, base: torch.Tensor | None, model: torch.Tensor) -> None:
        assert self.window.select is not None
        self.window.select.observe_sample(_abs_delta(base, model), self.n)

    def observe(self, p: int, start: int, delta: torch.Tensor) -> None:
        self.window.observe(p, delta.abs())

    def end_pass(self, p: int) -> None:
        self.window.end_pass(p)

    def restart(self) -> None:
        self.window.restart()

    def mask(self, start: int, delta: torch.Tensor) -> torch.Tensor | None:
        return self.window.mask(delta.abs())

    def observe_native(self, p: int, start: int, base: torch.Tensor, model: torch.Tensor) -> int:
        sel = self.window.select
        return sel.observe_native(p, base, model) if sel is not None else 0

    def native_spec(self, spec: TVModel) -> None:
        w = self.window
        spec.mask = native.MASK_DROP_ALL if w.empty else native.MASK_NONE if w.select is None else native.MASK_WINDOW
        spec.scale = self.scale
        k = 0
        if w.select is not None and w.lo > 0:
            spec.has_lo, spec.lo, spec.cut_lo = 1, w.select.value[0], w.lo - w.select.less[0]
            k = 1
        if w.select is not None and w.hi < w.n:
            spec.has_hi, spec.hi, spec.cut_hi = 1, w.select.value[k], w.hi - w.select.less[k]


class ThresholdSparsifier(Sparsifier):
    """Keep |τ| ≥ a threshold: given (from a whole-model pre-pass), or the k-th smallest |τ| of this tensor."""

    def __init__(self, n: int, density: float, threshold: float | None) -> None:
        self.n = n
        self.threshold = threshold
        self.select: RankSelect | None = None
        if threshold is None:
            k = max(n - int(n * density), 1)  # TIES reference: k-th smallest, k = n − ⌊n·density⌋
            self.select = RankSelect([k - 1])

    @property
    def passes(self) -> int:  # type: ignore[override]
        return self.select.passes if self.select is not None else 0

    def sample_wanted(self) -> bool:
        return self.select is not None and self.select.wants_sample(self.n)

    def observe_sample(self, base: torch.Tensor | None, model: torch.Tensor) -> None:
        assert self.select is not None
        self.select.observe_sample(_abs_delta(base, model), self.n)

    def observe(self, p: int, start: int, delta: torch.Tensor) -> None:
        if self.select is not None:
            self.select.observe(p, delta.abs())

    def end_pass(self, p: int) -> None:
        if self.select is not None:
            self.select.end_pass(p)
            if p == self.select.passes - 1 and self.select.value:
                self.threshold = self.select.value[0]

    def mask(self, start: int, delta: torch.Tensor) -> torch.Tensor | None:
        return delta.abs() >= self.threshold

    def observe_native(self, p: int, start: int, base: torch.Tensor, model: torch.Tensor) -> int:
        return self.select.observe_native(p, base, model) if self.select is not None else 0

    def native_spec(self, spec: TVModel) -> None:
        spec.mask, spec.lo, spec.scale = native.MASK_THRESHOLD, float(self.threshold), self.scale


class DropSparsifier(Sparsifier):
    """DARE: keep each entry with probability p (seeded by position), rescale by 1/p or by L1 norm."""

    def __init__(self, n: int, density: float, seed: int, rescale: bool, rescale_norm: str) -> None:
        self.n, self.density, self.seed = n, density, seed
        self.scale = 1.0 / density if rescale and rescale_norm == "inverse_density" else 1.0
        self.passes = 1 if rescale and rescale_norm == "l1" else 0
        self.before = 0.0
        self.after = 0.0
        # native path: each block's keep bits from the L1 pass (n/8 bytes in all), so that the emit
        # pass need not hash every element again (the hash is about a third of DARE's time)
        self.bits: dict[int, torch.Tensor] = {}

    def _keep(self, start: int, delta: torch.Tensor) -> torch.Tensor:
        return bernoulli_keep_range(start, start + delta.numel(), self.density, self.seed, delta.device)

    def observe(self, p: int, start: int, delta: torch.Tensor) -> None:
        keep = self._keep(start, delta)
        a = delta.abs()
        self.before += float(a.sum(dtype=torch.float64))
        self.after += float((a * keep).sum(dtype=torch.float64))

    def end_pass(self, p: int) -> None:
        # mergekit's L1 matching; skipped when either norm is ~0
        if self.before >= 1e-7 and self.after >= 1e-7:
            self.scale = self.before / self.after

    def mask(self, start: int, delta: torch.Tensor) -> torch.Tensor | None:
        return self._keep(start, delta)

    def observe_native(self, p: int, start: int, base: torch.Tensor, model: torch.Tensor) -> int:
        bits = self.bits[start] = torch.empty((model.numel() + 7) // 8, dtype=torch.uint8)
        before, after, nf = native.dare_l1(base, model, start, self.seed, self.density, bits)
        self.before += before
        self.after += after
        return nf

    def native_spec(self, spec: TVModel) -> None:
        spec.mask, spec.seed, spec.t24 = native.MASK_BERNOULLI, self.seed, native.t24(self.density)
        spec.scale = self.scale

    def native_block(self, spec: TVModel, start: int) -> None:
        bits = self.bits.get(start)
        spec.keep_bits = bits.data_ptr() if bits is not None else None

    def block_done(self, start: int) -> None:
        self.bits.pop(start, None)


def drop_sparsifiers(n: int, density: list[float], seed: int, rescale: bool, rescale_norm: str) -> list[Sparsifier]:
    return [Sparsifier() if p >= 1.0 else DropSparsifier(n, p, tensor_seed(seed, i), rescale, rescale_norm)
            for i, p in enumerate(density)]


class TaskVectorMerger(TensorMerger):
    """θ₀ + λ·merge of sparsified task vectors.

    Without ``consensus``: merged = Σ wᵢτ̂ᵢ (÷ Σ wᵢ when ``normalize``).
    With ``consensus`` (``sum`` or ``count``), TIES-style:
      1. elect γ = sign(Σᵢ cᵢ) per entry, where cᵢ = τ̂ᵢ (``unweighted``) or wᵢτ̂ᵢ
         (``weighted``); with ``count`` the signs of the cᵢ are summed instead.
         An exact tie elects + (``zero_sign="plus"``), or the sign elected most
         often over the whole tensor (``"majority"``, as the TIES reference code
         does over the whole model);
      2. keep entries whose cᵢ has sign γ (zeros never agree);
      3. merged = Σ agreeing wᵢτ̂ᵢ, divided (when ``normalize``) by the number of
         agreeing models (``divisor="count"``) or their summed weight
         (``"weight_sum"``), a zero divisor counting as 1.
    """

    def __init__(self, *, weight: list[float], lam: float, sparsifiers: list[Sparsifier],
                 consensus: str | None = None, sign_election: str = "unweighted", normalize: bool = False,
                 divisor: str = "count", zero_sign: str = "plus") -> None:
        self.weight, self.lam, self.sparsifiers = weight, lam, sparsifiers
        self.consensus, self.sign_election = consensus, sign_election
        self.normalize, self.divisor = normalize, divisor
        self.needs_majority = consensus is not None and zero_sign == "majority"
        self.tie = 1.0
        self.sign_count = 0.0
        self._spec: ctypes.Array[TVModel] | None = None  # native: per-model masks, window counters

    # statistics (a sparsifier may need more passes once it has seen the data: read these afresh)
    @property
    def sparse_passes(self) -> int:
        return max((s.passes for s in self.sparsifiers), default=0)

    @property
    def passes(self) -> int:  # type: ignore[override]
        return self.sparse_passes + (1 if self.needs_majority else 0)

    def sample_wanted(self) -> bool:
        return any(sp.sample_wanted() for sp in self.sparsifiers)

    def observe_sample(self, base, models) -> None:
        for sp, m in zip(self.sparsifiers, models):
            if sp.sample_wanted():
                sp.observe_sample(base, m)

    def observe(self, p: int, start: int, base, models) -> None:
        if p < self.sparse_passes:
            for sp, m in zip(self.sparsifiers, models):
                if p < sp.passes:
                    sp.observe(p, start, m - base)
            return
        vote = self._vote(self._task_vectors(start, base, models))  # majority pass
        self.sign_count += float(torch.sign(vote).sum(dtype=torch.float64))

    def end_pass(self, p: int) -> None:
        if p < self.sparse_passes:
            for sp in self.sparsifiers:
                if p < sp.passes:
                    sp.end_pass(p)
        else:
            # the reference fills exact ties with sign(Σ elected signs); when that is 0 too its mask
            # keeps the negative entries, i.e. elects −
            self.tie = 1.0 if self.sign_count > 0 else -1.0
        if p == self.passes - 1 or p == self.sparse_passes - 1:
            for sp in self.sparsifiers:
                sp.restart()
            self._spec = None

    # output ----------------------------------------------------------------------------------
    def _task_vectors(self, start: int, base, models) -> list[torch.Tensor]:
        out = []
        for sp, m in zip(self.sparsifiers, models):
            d = m - base
            mask = sp.mask(start, d)
            if mask is not None:
                d.mul_(mask)
            if sp.scale != 1.0:
                d.mul_(sp.scale)
            out.append(d)
        return out

    def _contribution_sign(self, i: int) -> float:
        return -1.0 if self.sign_election == "weighted" and self.weight[i] < 0 else 1.0

    def _vote(self, tvs: list[torch.Tensor]) -> torch.Tensor:
        vote = torch.zeros_like(tvs[0])
        for i, d in enumerate(tvs):
            if self.consensus == "sum":
                vote.add_(d, alpha=self.weight[i] if self.sign_election == "weighted" else 1.0)
            else:
                vote.add_(torch.sign(d), alpha=self._contribution_sign(i))
        return vote

    def emit(self, start: int, base, models) -> torch.Tensor:
        tvs = self._task_vectors(start, base, models)
        if self.consensus is None:
            out = torch.zeros_like(base)
            for w, d in zip(self.weight, tvs):
                out.add_(d, alpha=w)
            if self.normalize:
                total = sum(self.weight)
                out.div_(total if abs(total) >= 1e-8 else 1.0)
            return base + self.lam * out
        vote = self._vote(tvs)
        elected = torch.sign(vote)
        elected[elected == 0] = self.tie
        num = torch.zeros_like(base)
        den = torch.zeros_like(base) if self.normalize else None
        for i, d in enumerate(tvs):
            s = torch.sign(d)
            if self._contribution_sign(i) < 0:
                s.neg_()
            agree = s == elected
            num.add_(d * agree, alpha=self.weight[i])
            if den is not None:
                den.add_(agree.to(den.dtype), alpha=self.weight[i] if self.divisor == "weight_sum" else 1.0)
        if den is not None:
            den[den == 0] = 1.0
            num.div_(den)
        return base + self.lam * num

    # native protocol ---------------------------------------------------------------------------
    def native_ok(self) -> bool:
        return True

    def _native_spec(self) -> ctypes.Array[TVModel]:
        if self._spec is None:
            spec = (TVModel * len(self.sparsifiers))()
            for i, (sp, m) in enumerate(zip(self.sparsifiers, spec)):
                sp.native_spec(m)
                m.weight = self.weight[i]
                m.vote_weight = self.weight[i] if self.sign_election == "weighted" else 1.0
                m.sign = self._contribution_sign(i)
                m.div_weight = self.weight[i] if self.divisor == "weight_sum" else 1.0
            self._spec = spec
        return self._spec

    def _native_combine(self, base, models, start: int, out, flags) -> tuple[int, float]:
        if self.consensus is None:
            total = sum(self.weight)
            divide = (total if abs(total) >= 1e-8 else 1.0) if self.normalize else 1.0
            combine = native.COMBINE_SUM
        else:
            divide = 1.0
            combine = native.COMBINE_CONSENSUS_SUM if self.consensus == "sum" else native.COMBINE_CONSENSUS_COUNT
        spec = self._native_spec()
        for sp, m in zip(self.sparsifiers, spec):
            sp.native_block(m, start)
        return native.tv_emit(base, models, spec, start, combine=combine, lam=self.lam,
                              divide=divide, normalize=self.normalize, tie=self.tie, out=out, flags=flags)

    def observe_native(self, p: int, start: int, base, models) -> int:
        if p < self.sparse_passes:
            return sum(sp.observe_native(p, start, base, m)
                       for sp, m in zip(self.sparsifiers, models) if p < sp.passes)
        nf, signs = self._native_combine(base, models, start, None, native.new_flags())  # majority pass
        self.sign_count += signs
        return nf

    def emit_native(self, start: int, base, models, out, flags) -> int:
        nf = self._native_combine(base, models, start, out, flags)[0]
        for sp in self.sparsifiers:
            sp.block_done(start)
        return nf

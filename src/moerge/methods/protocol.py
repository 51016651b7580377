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
    whole_block = False  # one block holds the whole tensor (a rank or a softmax over all of it)

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


def block_ranges(numel: int, shape: tuple[int, ...], block: int, row_aligned: bool,
                 whole: bool = False) -> list[tuple[int, int]]:
    """[start, stop) ranges covering ``numel`` elements; whole rows when ``row_aligned``; one range
    when ``whole``."""
    if numel == 0:
        return []
    if whole:
        return [(0, numel)]
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
    in_dtype = models[0].dtype
    if not native:  # the torch path computes in float32, as the executor's does
        base = base.float() if base is not None else None
        models = [m.float() for m in models]
    flat_b = base.reshape(-1) if base is not None else None
    flat_m = [m.reshape(-1) for m in models]
    ranges = block_ranges(flat_m[0].numel(), shape, block, merger.row_aligned, merger.whole_block)

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
    out = torch.empty(flat_m[0].numel(), dtype=out_dtype or in_dtype)
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

"""What data-aware methods (fisher, regmean, mats) share: how they see statistics, and their fallbacks.

A data-aware method never opens a statistics folder. For each tensor that has
statistics, the executor hands its merger factory a :class:`StatsSource`: for
model ``k`` (in recipe order) the statistic's tensors (``part`` 0, or 1 for the
second K-FAC factor; see :mod:`moerge.stats.format`), whole or as a flat range, in float32 on the compute device,
already checked for NaN/Inf. Tensors without statistics (biases, norms,
embeddings when the statistics cover linear layers only) get ``stats=None`` and
are averaged.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Protocol

import torch

from moerge.methods.base import Param
from moerge.methods.protocol import TensorMerger


class StatsSource(Protocol):
    """One tensor's statistics, per model."""

    kind: str

    def whole(self, model: int, part: int = 0) -> torch.Tensor:
        """The statistic of model ``model``, whole and shaped, float32 on the compute device."""
        ...

    def block(self, model: int, start: int, stop: int, part: int = 0) -> torch.Tensor:
        """Elements [start, stop) of the flattened statistic, float32 on the compute device."""
        ...

    def norm(self, model: int) -> float:
        """The global L2 norm of model ``model``'s statistic over all its tensors (Fisher normalisation)."""
        ...


STATS_WEIGHT = Param("weight", float, 1.0, "this model's weight: its statistics (and, where a tensor has "
                     "none, its parameters) count this many times", per_model=True, low=0.0, low_open=True)
ALPHA = Param("alpha", float, 0.95, "off-diagonal scale of every Gram / K-FAC factor, "
              "M ← α·M + (1−α)·diag(M) (RegMean's reduce_non_diagonal_ratio; 1 keeps them whole)",
              low=0.0, high=1.0, constant=True)
RIDGE = Param("ridge", float, 1e-6, "added to every linear system's diagonal, relative to its mean "
              "diagonal entry, so singular statistics (unused input features) still solve; reported",
              low=0.0, constant=True)


def shrink(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·M + (1−α)·diag(M): scale the off-diagonal entries by α."""
    if alpha == 1.0:
        return m
    out = m * alpha
    out.diagonal().add_(m.diagonal(), alpha=1.0 - alpha)
    return out


def average(weight: list[float], notes: dict | None) -> TensorMerger:
    """Σ cᵢθᵢ / Σ cᵢ (the linear merge, native kernels included): the rule for tensors without
    statistics, counted in ``notes["averaged_tensors"]``."""
    from moerge.methods.linear import LinearMerger

    if notes is not None:
        notes["averaged_tensors"] = notes.get("averaged_tensors", 0) + 1
    return LinearMerger(weight, normalize=True)


class WholeTensorMerger(TensorMerger):
    """A merger that needs each input whole (e.g. an iterative solver): one statistics pass gathers
    the blocks, :meth:`solve` computes the result, and the output pass hands it out block by block."""

    passes = 1

    def __init__(self, shape: tuple[int, ...], n_models: int) -> None:
        self.shape = shape
        self.n = n_models
        self.base: torch.Tensor | None = None
        self.models: list[torch.Tensor] = []
        self.result: torch.Tensor | None = None

    def observe(self, p, start, base, models) -> None:
        if not self.models:
            numel = math.prod(self.shape)
            self.models = [torch.empty(numel, dtype=models[0].dtype, device=models[0].device) for _ in models]
            if base is not None:
                self.base = torch.empty(numel, dtype=base.dtype, device=base.device)
        stop = start + models[0].numel()
        for buf, m in zip(self.models, models):
            buf[start:stop] = m
        if base is not None and self.base is not None:
            self.base[start:stop] = base

    def end_pass(self, p: int) -> None:
        shaped = [m.view(self.shape) for m in self.models]
        base = self.base.view(self.shape) if self.base is not None else None
        self.result = self.solve(base, shaped).reshape(-1).to(torch.float32)
        self.models, self.base = [], None

    @abstractmethod
    def solve(self, base: torch.Tensor | None, models: list[torch.Tensor]) -> torch.Tensor:
        """The merged tensor from whole, shaped inputs (float32)."""

    def emit(self, start, base, models) -> torch.Tensor:
        assert self.result is not None
        return self.result[start:start + models[0].numel()]

"""A PEFT LoRA adapter read as the full model it stands for: ``W = W_base + scale · B · A``.

Each adapted weight is expanded one tensor (or one block of rows) at a time when
it is read. Merging adapters this way merges the low-rank products, never A and
B separately (averaging As and Bs apart gives ``mean(B)·mean(A)``, which is not
the mean of the products). Adapted tensors are reported in float32, so a small
ΔW is not rounded away on a bf16 base; every other tensor comes from the base
unchanged, except those the adapter stores in full (``modules_to_save``,
trained biases).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import CheckpointError
from moerge.io.peft import LoraPair, PeftAdapter
from moerge.io.sources import NamedTensors, TensorInfo, TensorSource, read_runs_one_by_one

if TYPE_CHECKING:
    import torch

    from moerge.io.safetensors_format import TensorEntry

# ΔW is computed in fixed chunks of this many rows, so an element's value does not depend on which
# range of the tensor was asked for (a matmul over other rows may round differently)
DELTA_ROWS = 64


class LoraView(NamedTensors):
    """A :class:`moerge.io.sources.TensorSource` over an adapter and its (already opened) base."""

    def __init__(self, ref: str, adapter: PeftAdapter, base: TensorSource) -> None:
        self.ref = ref
        self.adapter = adapter
        self.base = base
        self.root = base.root
        self.allow_external_files = base.allow_external_files
        self.folder = adapter.folder
        self.infos = self._infos()

    def _infos(self) -> dict[str, TensorInfo]:
        weights, base = self.adapter.weights, self.base
        infos: dict[str, TensorInfo] = dict(base.infos)
        for target, pair in self.adapter.pairs.items():
            if target not in infos:
                raise CheckpointError(f"{weights}: adapts {target!r}, which the base model {base.ref} does not have")
            bi = infos[target]
            a, b = self.adapter.factor_shapes(target)
            if len(bi.shape) != 2 or len(a) != 2 or len(b) != 2 or a[0] != b[1] or \
                    (b[0], a[1]) != (bi.shape[::-1] if pair.transpose else bi.shape):
                raise CheckpointError(f"{weights}: LoRA factors of {target!r} have shapes B {list(b)}, A {list(a)}, "
                                      f"which do not fit the base weight {list(bi.shape)}")
            if a[0] != pair.rank:  # the scale alpha / r would be wrong: a silently different model
                raise CheckpointError(f"{weights}: LoRA factors of {target!r} have rank {a[0]}, but "
                                      f"{self.adapter.folder / 'adapter_config.json'} gives r = {pair.rank} "
                                      "(r, or its rank_pattern entry)")
            infos[target] = TensorInfo(target, "float32", bi.shape, weights)
        for target, name in self.adapter.full.items():
            e = self.adapter.reader.entries[name]
            if target not in base.infos:  # PEFT would drop it as an unexpected key
                raise CheckpointError(f"{weights}: holds {name!r}, which is neither a LoRA factor nor a tensor of "
                                      f"the base model {base.ref} (a damaged or foreign name?)")
            if tuple(infos[target].shape) != tuple(e.shape):
                raise CheckpointError(f"{weights}: {name!r} has shape {list(e.shape)}, the base's {target!r} "
                                      f"{list(infos[target].shape)}")
            infos[target] = TensorInfo(target, e.dtype, tuple(e.shape), weights)
        return infos

    # -- the source protocol ----------------------------------------------------------------
    @property
    def pairs(self) -> dict[str, LoraPair]:
        return self.adapter.pairs

    @property
    def files(self) -> list[Path]:
        return [self.adapter.weights, *self.base.files]

    @property
    def config(self) -> dict[str, Any] | None:
        return self.base.config

    def entry(self, name: str) -> TensorEntry | None:
        if name in self.adapter.pairs:
            return None
        if name in self.adapter.full:
            return self.adapter.reader.entries[self.adapter.full[name]]
        return self.base.entry(name)

    def delta(self, name: str, row0: int = 0, row1: int | None = None) -> torch.Tensor:
        """``scale · B · A`` for rows [row0, row1) of the adapted weight, float32."""
        import torch

        pair = self.adapter.pairs[name]
        rows = self.infos[name].shape[0]
        row1 = rows if row1 is None else row1
        a = self.adapter.reader.read(pair.a).float()
        b = self.adapter.reader.read(pair.b).float()
        c0 = row0 // DELTA_ROWS * DELTA_ROWS
        chunks = []
        for k0 in range(c0, row1, DELTA_ROWS):
            k1 = min(k0 + DELTA_ROWS, rows)
            if pair.transpose:  # W is (in, out): rows of ΔW are columns of B·A
                chunks.append(a[:, k0:k1].T @ b.T)  # (k1 - k0, out)
            else:
                chunks.append(b[k0:k1] @ a)  # (k1 - k0, in)
        return (torch.cat(chunks)[row0 - c0: row1 - c0]) * pair.scale

    def read(self, name: str, start: int = 0, count: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        if name in self.adapter.full:
            return self.adapter.reader.read(self.adapter.full[name], start, count, buffer)
        if name not in self.adapter.pairs:
            return self.base.read(name, start, count, buffer)
        rows, cols = self.infos[name].shape
        end = rows * cols if count is None else start + count
        r0, r1 = start // cols, -(-end // cols)
        w = self.base.read(name, r0 * cols, (r1 - r0) * cols).float().reshape(r1 - r0, cols)
        w += self.delta(name, r0, r1)
        flat = w.reshape(-1)[start - r0 * cols: end - r0 * cols]
        return flat.reshape(rows, cols) if (start, count) == (0, None) else flat

    def read_runs(self, name: str, runs: list[tuple[int, int]]) -> torch.Tensor:
        return read_runs_one_by_one(self, name, runs)  # adapted weights are computed, not read raw

    def mappable(self, name: str) -> bool:
        return False  # adapted weights are computed, not stored

    def map(self, name: str) -> torch.Tensor:
        raise TypeError(f"{self.ref}: tensor {name!r} is computed from a LoRA adapter, not stored raw")

    def check_unchanged(self) -> None:
        self.adapter.reader.check_unchanged()
        self.base.check_unchanged()

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __repr__(self) -> str:
        return f"LoraView({self.ref!r}, {len(self.adapter.pairs)} adapted tensors, base {self.base.ref!r})"

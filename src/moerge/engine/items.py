"""The work items a plan is made of: how to produce one output tensor, and which input tensors it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moerge.io.safetensors_format import tensor_nbytes


@dataclass(frozen=True)
class InputRef:
    """One input tensor: which checkpoint (index into ``Plan.checkpoints``) and which name."""

    model: int
    tensor: str


@dataclass
class WorkItem:
    """How to produce one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype
    base: InputRef | None
    inputs: list[InputRef]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int
    copy_from: InputRef | None = None  # non-float tensors are copied, not merged
    row_fix: bool = False  # inputs may need crop/pad of rows to ``shape[0]`` (vocab policy)
    align: bool = False  # rows follow the plan's vocabulary alignment (one row per output token)
    pad_from: InputRef | None = None  # rows missing from an input come from here (default: base or first input)
    stats: list[tuple[InputRef, ...]] | None = None  # data-aware methods: each input's statistics (None: none)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

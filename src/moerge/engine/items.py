"""The work items a plan is made of: how to produce one output tensor, and which input tensors it reads.

Four kinds: *merge* (a method over the inputs, block by block), *copy* (one input unchanged),
*stack* (whole input matrices concatenated and stacked: an MoE layer's fused experts, or one
expert's matrix with its scale and noise) and *computed* (a small tensor computed before the
plan runs: router rows, zero biases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moerge.io.safetensors_format import tensor_nbytes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class InputRef:
    """One input tensor: which checkpoint (index into ``Plan.checkpoints``) and which name."""

    model: int
    tensor: str


@dataclass(frozen=True)
class Piece:
    """One input matrix of a stacked output, as mergekit-moe treats an expert's MLP weight:
    ``θ·scale + noise·N(0, 1)`` (noise drawn from a generator seeded by the item's seed and the
    piece's position), transposed first when the output stores it that way."""

    ref: InputRef
    scale: float = 1.0
    noise: float = 0.0
    transpose: bool = False
    # a part of the input: ``shape`` elements from flat offset ``start`` (one expert of a fused tensor)
    start: int = 0
    shape: tuple[int, ...] | None = None
    term: int = 0  # pieces of one term are concatenated; a group's terms are added (a weighted merge of experts)


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
    # stack: output = stack over groups of (the sum over terms of the term's pieces concatenated along
    # ``cat_dim``); without a new leading dimension when ``stacked`` is False (then exactly one group)
    groups: list[list[Piece]] | None = None
    cat_dim: int = 0
    stacked: bool = True
    value: torch.Tensor | None = None  # computed: the tensor itself (rounded to ``dtype`` when written)

    @property
    def kind(self) -> str:
        if self.value is not None:
            return "computed"
        if self.groups is not None:
            return "stack"
        return "copy" if self.copy_from is not None else "merge"

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

"""Linear merge: the weighted average of models ("model soup")."""

from __future__ import annotations

import torch

from moerge.methods.base import WEIGHT, Param, register
from moerge.methods.protocol import TensorMerger


class LinearMerger(TensorMerger):
    def __init__(self, weight: list[float], normalize: bool) -> None:
        self.weight = weight
        total = sum(weight)
        if normalize and abs(total) < 1e-8:
            raise ValueError("the weights sum to zero; set normalize: false or change them")
        self.divide = total if normalize else 1.0

    def emit(self, start, base, models) -> torch.Tensor:
        out = torch.zeros_like(models[0])
        for w, m in zip(self.weight, models):
            out.add_(m, alpha=w)
        return out.div_(self.divide) if self.divide != 1.0 else out

    def native_ok(self) -> bool:
        return True

    def emit_native(self, start, base, models, out, flags) -> int:
        from moerge import native

        return native.linear_emit(models, self.weight, self.divide, out, flags)


@register(
    "linear",
    params=(
        WEIGHT,
        Param("normalize", bool, True, "divide by the sum of the weights"),
    ),
    summary="weighted average of the models (model soup)",
    citation="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned "
    "models improves accuracy without increasing inference time (arXiv:2203.05482)",
    needs_base=False,
    min_models=1,
)
def linear(shape: tuple[int, ...], *, weight: list[float], normalize: bool) -> LinearMerger:
    """θ = Σ wᵢθᵢ (/ Σ wᵢ when ``normalize``)."""
    return LinearMerger(weight, normalize)

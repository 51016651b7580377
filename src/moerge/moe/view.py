"""Reading an MoE checkpoint in either layout: which class, how many experts, each expert's matrices.

The layout is read from the tensor names (``mlp.experts.gate_up_proj`` present: fused; else one tensor
per expert matrix) and the orientation of fused tensors from their shapes against the config's sizes
(an [E, 2I, H] and an [E, H, 2I] ``gate_up_proj`` differ unless I = H/2, which the config disambiguates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.arch.moe_layouts import ARCHITECTURES, MoeArchitecture
from moerge.errors import CheckpointError
from moerge.io.checkpoint import open_source
from moerge.io.sources import TensorSource


@dataclass
class MoeView:
    """An opened MoE checkpoint (close it, or use it as a context manager)."""

    source: TensorSource
    arch: MoeArchitecture
    layers: int
    experts: int
    top_k: int
    width: int  # an expert's intermediate size
    hidden: int
    layout: str
    transposed: bool
    norm_topk_prob: bool
    shared: bool

    def __enter__(self) -> MoeView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    def router(self, layer: int) -> torch.Tensor:
        """(E, H) router rows of ``layer``."""
        name = self.arch.router(layer, self.layout)
        return self.source.read(name).reshape(self.source.info(name).shape)

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e``'s (gate, up, down) of ``layer`` as nn.Linear weights: [I, H], [I, H], [H, I]."""
        i, h = self.width, self.hidden
        if self.layout == "per-expert":
            names = self.arch.per_expert(layer, e)
            gate, up, down = (self.source.read(n).reshape(self.source.info(n).shape) for n in names)
            return gate, up, down
        gate_up, down = self.arch.fused(layer)
        gu = self.source.read(gate_up, e * 2 * i * h, 2 * i * h)  # expert e is one contiguous slab
        dn = self.source.read(down, e * h * i, h * i)
        if self.transposed:
            gu, dn = gu.reshape(h, 2 * i).T, dn.reshape(i, h).T
        else:
            gu, dn = gu.reshape(2 * i, h), dn.reshape(h, i)
        return gu[:i].contiguous(), gu[i:].contiguous(), dn.contiguous()


def _arch_of(cfg: dict[str, Any], where: Path) -> MoeArchitecture:
    for a in ARCHITECTURES:
        if cfg.get("model_type") == a.model_type:
            return a
    known = ", ".join(a.model_type for a in ARCHITECTURES)
    raise CheckpointError(f"{where}: model_type {cfg.get('model_type')!r} is not an MoE moerge reads ({known})")


def open_moe(path: str | Path, *, allow_external_files: bool = False) -> MoeView:
    """Open the MoE checkpoint at ``path`` (a Hugging Face folder), checking its tensors against its config."""
    src = open_source(path, allow_external_files=allow_external_files)
    try:
        cfg = src.config or {}
        arch = _arch_of(cfg, Path(path))
        experts = int(cfg[arch.experts_key])
        width = int(cfg[arch.intermediate_key] if arch.intermediate_key else cfg["intermediate_size"])
        hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        gate_up, _ = arch.fused(0)
        if gate_up in src:
            shape = tuple(src.info(gate_up).shape)
            if shape not in ((experts, 2 * width, hidden), (experts, hidden, 2 * width)):
                raise CheckpointError(f"{path}: {gate_up} has shape {list(shape)}; the config's sizes give "
                                      f"[{experts}, {2 * width}, {hidden}] or [{experts}, {hidden}, {2 * width}]")
            layout, transposed = "fused", shape == (experts, hidden, 2 * width) and 2 * width != hidden
        elif arch.per_expert(0, 0)[0] in src:
            layout, transposed = "per-expert", False
        else:
            raise CheckpointError(f"{path}: neither {gate_up} nor {arch.per_expert(0, 0)[0]} is there; "
                                  f"not a {arch.class_name} checkpoint moerge can read")
        view = MoeView(src, arch, layers, experts, int(cfg.get("num_experts_per_tok", 2)), width, hidden, layout,
                       transposed, bool(cfg.get("norm_topk_prob", arch.model_type == "mixtral")),
                       arch.shared(0)[0] in src)
        for layer in range(layers):
            if view.arch.router(layer, layout) not in src:
                raise CheckpointError(f"{path}: no router {view.arch.router(layer, layout)}")
        return view
    except BaseException:
        src.close()
        raise

"""A PEFT LoRA adapter folder read as the full model it stands for.

For each adapted linear layer the weight is ``W = W_base + scale · B · A``
(``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA), expanded
one tensor (or one block of rows) at a time when the executor reads it. Merging
adapters this way merges the low-rank products, never A and B separately
(averaging As and Bs apart gives ``mean(B)·mean(A)``, which is not the mean of
the products). Adapted tensors are reported in float32, so a small ΔW is not
rounded away on a bf16 base; all other tensors come from the base unchanged,
except the ones the adapter stores in full (``modules_to_save``, trained biases).

The base is the adapter's ``base_model_name_or_path``, which must be a local
folder or a model in the local Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import CheckpointError
from moerge.io.checkpoint import Checkpoint, TensorInfo, resolve_reference
from moerge.io.safetensors_format import SafetensorsReader, TensorEntry

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    a: str  # tensor names in the adapter file
    b: str
    scale: float
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D) and embeddings: ΔW = (B·A)ᵀ


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module's name (suffix or regex)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """A :class:`moerge.io.checkpoint.Checkpoint` for a PEFT LoRA adapter folder."""

    def __init__(self, ref: str, folder: Path, *, allow_pickle: bool = False):
        cfg_path = folder / ADAPTER_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable adapter config ({e})") from e
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise CheckpointError(f"{cfg_path}: PEFT type {kind} is not supported (only LoRA adapters)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (their magnitude vector rescales "
                                  "whole columns, so ΔW is not B·A)")
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            bin_file = folder / "adapter_model.bin"
            hint = "convert it to safetensors" if bin_file.exists() else None
            raise CheckpointError(f"{folder}: adapter has no {ADAPTER_WEIGHTS}", hint=hint)
        base_ref = cfg.get("base_model_name_or_path")
        if not base_ref:
            raise CheckpointError(f"{cfg_path}: no base_model_name_or_path; cannot expand the adapter")
        try:
            base_path = resolve_reference(base_ref)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: the adapter's base model {base_ref!r} is not available locally",
                                  hint=e.hint) from None
        self.base: Checkpoint = Checkpoint.open(base_path, allow_pickle=allow_pickle)
        self.adapter = SafetensorsReader(weights)
        self.folder = folder
        r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rs = bool(cfg.get("use_rslora"))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))

        self.pairs: dict[str, LoraPair] = {}
        self.full: dict[str, str] = {}  # base tensor name -> adapter tensor stored in full
        names = set(self.adapter.entries)
        for name in sorted(names):
            if not name.startswith(PREFIX):
                raise CheckpointError(f"{weights}: unexpected tensor {name!r} (PEFT names start with {PREFIX!r})")
            key = name[len(PREFIX):]
            m = re.fullmatch(r"(.+)\.lora_(A|embedding_A)(?:\.[^.]+)?(\.weight)?", key)
            if m:
                module = m.group(1)
                b_name = name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
                if b_name not in names:
                    raise CheckpointError(f"{weights}: {name!r} has no matching {b_name!r}")
                r = int(_pattern_value(rank_pat, module, r0))
                alpha = float(_pattern_value(alpha_pat, module, alpha0))
                scale = alpha / (math.sqrt(r) if rs else r)
                embedding = m.group(2) == "embedding_A"
                self.pairs[module + ".weight"] = LoraPair(name, b_name, scale, embedding or fan_in_fan_out)
            elif re.search(r"\.lora_(B|embedding_B)", key):
                continue
            elif "lora_magnitude" in key:
                raise CheckpointError(f"{weights}: {name!r} is a DoRA magnitude; DoRA is not supported")
            else:  # modules_to_save / trained bias: a full replacement tensor
                self.full[key.replace(".modules_to_save.default", "")] = name
        infos: dict[str, TensorInfo] = dict(self.base.infos)
        for target, pair in self.pairs.items():
            if target not in infos:
                raise CheckpointError(f"{weights}: adapts {target!r}, which the base model {base_path} does not have")
            bi = infos[target]
            a, b = self.adapter.entries[pair.a].shape, self.adapter.entries[pair.b].shape
            if len(bi.shape) != 2 or len(a) != 2 or len(b) != 2 or a[0] != b[1] or \
                    (b[0], a[1]) != (bi.shape[::-1] if pair.transpose else bi.shape):
                raise CheckpointError(f"{weights}: LoRA factors of {target!r} have shapes B {list(b)}, A {list(a)}, "
                                      f"which do not fit the base weight {list(bi.shape)}")
            infos[target] = TensorInfo(target, "float32", bi.shape, weights)
        for target, name in self.full.items():
            e = self.adapter.entries[name]
            if target in infos and tuple(infos[target].shape) != tuple(e.shape):
                raise CheckpointError(f"{weights}: {name!r} has shape {list(e.shape)}, the base's {target!r} "
                                      f"{list(infos[target].shape)}")
            infos[target] = TensorInfo(target, e.dtype, tuple(e.shape), weights)
        super().__init__(ref, self.base.root, infos, {})

    # -- what differs from a plain checkpoint ---------------------------------------------
    @property
    def files(self) -> list[Path]:
        return [self.folder / ADAPTER_WEIGHTS, *self.base.files]

    def entry(self, name: str) -> TensorEntry | None:
        if name in self.pairs:
            return None
        if name in self.full:
            return self.adapter.entries[self.full[name]]
        return self.base.entry(name)

    def delta(self, name: str, row0: int = 0, row1: int | None = None) -> torch.Tensor:
        """``scale · B · A`` for rows [row0, row1) of the adapted weight, float32."""
        import torch

        pair = self.pairs[name]
        a = self.adapter.read(pair.a).float()
        b = self.adapter.read(pair.b).float()
        if pair.transpose:  # W is (in, out): rows of ΔW are columns of B·A
            return (a[:, row0:row1].T @ b.T) * pair.scale
        return torch.matmul(b[row0:row1], a) * pair.scale

    def read(self, name: str, start: int = 0, count: int | None = None,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        if name in self.full:
            return self.adapter.read(self.full[name], start, count, buffer)
        if name not in self.pairs:
            return self.base.read(name, start, count, buffer)
        rows, cols = self.infos[name].shape
        end = rows * cols if count is None else start + count
        r0, r1 = start // cols, -(-end // cols)
        w = self.base.read(name, r0 * cols, (r1 - r0) * cols).float().reshape(r1 - r0, cols)
        w += self.delta(name, r0, r1)
        flat = w.reshape(-1)[start - r0 * cols: end - r0 * cols]
        return flat.reshape(rows, cols) if (start, count) == (0, None) else flat

    def read_runs(self, name: str, runs: list[tuple[int, int]]) -> torch.Tensor:
        return self._read_runs_one_by_one(name, runs)  # adapted weights are computed, not read raw

    def mappable(self, name: str) -> bool:
        return False  # adapted weights are computed, not stored

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.ref!r}, {len(self.pairs)} adapted tensors, base {self.base.ref!r})"

"""Writing a (merged) model back as a LoRA adapter: truncated SVD of each linear layer's ΔW.

For every 2-D weight that differs from the base, ``ΔW = model − base`` is
factorised as ``U S Vᵀ`` and the top ``rank`` singular directions are kept:
``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (scale 1: ``lora_alpha = r``). The share of
‖ΔW‖² that the truncation discards is reported per tensor and in total, so a
user sees what the adapter loses. Tensors an adapter cannot carry (changed
norms, biases, embeddings unless asked) are reported, not silently dropped.
One tensor is in memory at a time; the adapter appears atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from moerge.arch.names import is_embedding_name
from moerge.errors import MoergeError
from moerge.io.checkpoint import open_source
from moerge.io.publish import Publication, check_not_an_input, output_error
from moerge.methods.finite import first_nonfinite

if TYPE_CHECKING:
    import torch

    from moerge.io.sources import TensorSource


@dataclass
class ExtractReport:
    rank: int
    tensors: dict[str, float] = field(default_factory=dict)  # name -> share of ‖ΔW‖² discarded
    energy_total: float = 0.0  # Σ‖ΔW‖² over adapted tensors
    energy_kept: float = 0.0
    not_representable: dict[str, float] = field(default_factory=dict)  # changed, but not a LoRA target: ‖Δ‖
    output: Path | None = None

    @property
    def discarded(self) -> float:
        return 1.0 - self.energy_kept / self.energy_total if self.energy_total else 0.0


def extract_lora(model: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 rank: int = 16, include_embeddings: bool = False, force: bool = False,
                 allow_external_files: bool = False, source: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> ExtractReport:
    """Write ``out`` as a PEFT LoRA adapter approximating ``model − base`` at ``rank`` (the models' files
    inside their folders unless ``allow_external_files``). ``source``: what ``moerge_extract.json`` records as
    the model (default: ``model``)."""
    if rank < 1:
        raise MoergeError(f"rank must be at least 1 (got {rank})")
    out = Path(out)
    if out.exists() and not force:
        raise MoergeError(f"{out} already exists", hint="pass --force to replace it")
    with open_source(model, allow_external_files=allow_external_files) as m, \
            open_source(base, allow_external_files=allow_external_files) as b:
        check_not_an_input(out, m.files + b.files)
        check_rank(rank, [i.shape for i in b.infos.values()], str(base))
        report, tensors, targets = _factorise_all(m, b, model, base, rank, include_embeddings, progress)
        m.check_unchanged()
        b.check_unchanged()
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": str(Path(base).resolve()) if Path(base).exists() else str(base),
    }
    record = {"source": source or str(model), "base": str(base), "rank": rank, "discarded_energy": report.discarded,
              "per_tensor_discarded": report.tensors, "not_representable_l2": report.not_representable}
    with Publication(out, force=force) as pub:
        try:
            save_file(tensors, str(pub.tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (pub.tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            (pub.tmp / "moerge_extract.json").write_text(json.dumps(record, indent=1))
        except OSError as e:
            raise output_error(e, out) from e
        report.output = pub.commit()
    return report


def check_rank(rank: int, shapes: list[tuple[int, ...]], where: str) -> None:
    """Refuse a rank above every layer's full rank: the factors would only be zero-padded (PEFT builds every
    layer at the adapter's rank), and an absurd rank would fill memory and disk with zeros."""
    if rank < 1:
        raise MoergeError(f"rank must be at least 1 (got {rank})")
    full = max((min(s) for s in shapes if len(s) == 2), default=0)
    if full == 0:
        raise MoergeError(f"{where} has no matrix to factorise (no two-dimensional tensor)")
    if rank > full:
        raise MoergeError(f"rank {rank} is above the full rank of every layer of {where} (the largest is {full}); "
                          f"a rank-{full} adapter already holds the change exactly", hint=f"use a rank of {full} or less")


def _factorise_all(m: TensorSource, b: TensorSource, model: object, base: object, rank: int,
                   include_embeddings: bool, progress: Callable[[str, int, int], None] | None,
                   ) -> tuple[ExtractReport, dict[str, torch.Tensor], list[str]]:
    """Every changed linear layer of ``m − b`` as LoRA factors (PEFT names), with the report."""
    report = ExtractReport(rank)
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    missing = sorted(set(m.tensor_names) ^ set(b.tensor_names))
    if missing:
        raise MoergeError(f"{model} and {base} do not hold the same tensors (e.g. {missing[0]!r})")
    names = b.tensor_names
    for k, name in enumerate(names):
        if progress:
            progress(name, k, len(names))
        if m.info(name).shape != b.info(name).shape:
            raise MoergeError(f"shape mismatch in {name!r}: {list(m.info(name).shape)} in {model} but "
                              f"{list(b.info(name).shape)} in {base}")
        if not m.info(name).dtype.startswith(("float", "bfloat")):
            continue
        delta = m.read(name).float() - b.read(name).float()
        norm = float(delta.norm())
        if norm == 0.0:
            continue
        if (bad := first_nonfinite(delta)) is not None:
            raise MoergeError(f"{name!r}: non-finite values in {model} or {base} (first at flat index {bad})")
        is_embedding = is_embedding_name(name)
        if delta.dim() != 2 or not name.endswith(".weight") or (is_embedding and not include_embeddings):
            report.not_representable[name] = norm
            continue
        module = name[: -len(".weight")]
        factors, energy, kept = _factorise(delta, rank, is_embedding)
        tensors.update({f"base_model.model.{module}.{part}": t for part, t in factors.items()})
        report.tensors[name] = 1.0 - kept / energy
        report.energy_total += energy
        report.energy_kept += kept
        targets.append(module)
    if not targets:
        raise MoergeError(f"{model} does not differ from {base} in any linear layer; there is nothing to extract")
    return report, tensors, targets


def _factorise(delta: torch.Tensor, rank: int, is_embedding: bool) -> tuple[dict[str, torch.Tensor], float, float]:
    """LoRA factors of one ΔW by truncated SVD (PEFT's tensor names after the module), its energy
    ‖ΔW‖² and the part of it the factors keep."""
    import torch

    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    # factors are zero-padded to the adapter's rank where the layer is thinner than it (PEFT builds
    # every adapted layer at rank ``r``); the padding adds nothing to B·A
    down = _pad_rows(root[:, None] * vh[:r], rank)  # (rank, cols)
    up = _pad_rows((u[:, :r] * root).T, rank).T  # (rows, rank)
    if is_embedding:  # PEFT's embedding LoRA: ΔW = (B·A)ᵀ with A (r, num_embeddings), B (dim, r)
        factors = {"lora_embedding_A": up.T.contiguous().float(), "lora_embedding_B": down.T.contiguous().float()}
    else:
        factors = {"lora_A.weight": down.contiguous().float(), "lora_B.weight": up.contiguous().float()}
    return factors, float((s**2).sum()), float((s[:r] ** 2).sum())


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    import torch

    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])

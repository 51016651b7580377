"""The experts of a routed model: PEFT LoRA adapters of one base, read module by module.

Every adapter must adapt the same linear modules of the same base model (the router has one row per expert
in each module); ranks and ``lora_alpha`` may differ (each expert keeps its own scale, the factors are
zero-padded to the largest rank when stacked). Refused with the adapter and module named: another base,
other target modules, factors that do not fit the base's weight, layers that are not linear (embeddings,
GPT-2's Conv1D), tensors stored in full (``modules_to_save``, trained biases: they cannot be routed), DoRA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.errors import CheckpointError
from moerge.io.checkpoint import open_source
from moerge.io.peft import PeftAdapter
from moerge.io.sources import TensorSource


@dataclass(frozen=True)
class Expert:
    name: str
    folder: Path


def expert_names(folders: list[Path]) -> list[str]:
    """One name per adapter folder: its folder name, made unique with -2, -3 … ."""
    names: list[str] = []
    for f in folders:
        stem = f.resolve().name or "expert"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


class ExpertSet:
    """Open adapters over an open base; :meth:`factors` gives one module's (A, B, scale) per expert."""

    def __init__(self, base: str | os.PathLike[str], folders: list[Path], *, names: list[str] | None = None,
                 allow_external_files: bool = False) -> None:
        if not folders:
            raise CheckpointError("no expert adapters given")
        self.base_ref = str(base)
        self.experts = [Expert(n, Path(f)) for n, f in zip(names or expert_names(folders), folders, strict=True)]
        self.adapters: list[PeftAdapter] = []
        self.base: TensorSource = open_source(base, allow_external_files=allow_external_files)
        try:
            for f in folders:
                self.adapters.append(PeftAdapter(Path(f), allow_external_files=allow_external_files))
            self.modules = self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> list[str]:
        first = self.adapters[0]
        wanted = set(first.pairs)
        bases = {os.path.realpath(a.base_ref) if os.path.exists(a.base_ref) else a.base_ref for a in self.adapters}
        if len(bases) > 1:
            listing = "; ".join(f"{e.folder}: {a.base_ref}" for e, a in zip(self.experts, self.adapters))
            raise CheckpointError(f"the adapters were trained on different base models ({listing})",
                                  hint="route only among adapters of one base model")
        for adapter in self.adapters:
            where = adapter.folder / "adapter_model.safetensors"
            if adapter.full:
                name = sorted(adapter.full)[0]
                raise CheckpointError(f"{where}: stores {name!r} in full (modules_to_save or a trained bias); "
                                      "only LoRA factors can be routed",
                                      hint="merge this adapter instead (moerge merge), or retrain it without "
                                      "modules_to_save / bias")
            if set(adapter.pairs) != wanted:
                extra = sorted(set(adapter.pairs) - wanted) or sorted(wanted - set(adapter.pairs))
                raise CheckpointError(
                    f"{adapter.folder}: adapts other modules than {first.folder} (first difference: "
                    f"{extra[0].removesuffix('.weight')!r}); every expert of a routed model must adapt the same "
                    "modules", hint="retrain with the same target_modules, or route the adapters that agree")
            for target, pair in adapter.pairs.items():
                if pair.transpose:
                    raise CheckpointError(f"{where}: {target.removesuffix('.weight')!r} is not a linear layer "
                                          "(an embedding or a Conv1D adapter); only nn.Linear modules are routed")
                if target not in self.base:
                    raise CheckpointError(f"{where}: adapts {target!r}, which the base model {self.base_ref} "
                                          "does not have", hint="was this adapter trained on another base?")
                shape = tuple(self.base.info(target).shape)
                a, b = adapter.factor_shapes(target)
                if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != shape:
                    raise CheckpointError(f"{where}: LoRA factors of {target!r} (B {list(b)}, A {list(a)}) do "
                                          f"not fit the base weight {list(shape)}")
                if a[0] != pair.rank:
                    raise CheckpointError(f"{where}: {target!r} has rank {a[0]}, but its adapter_config.json "
                                          f"gives r = {pair.rank}")
        return sorted(t.removesuffix(".weight") for t in wanted)

    def factors(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(A [r, in], B [out, r], scale) of every expert for one module, float32."""
        out = []
        for adapter in self.adapters:
            pair = adapter.pairs[module + ".weight"]
            out.append((adapter.reader.read(pair.a).float(), adapter.reader.read(pair.b).float(), pair.scale))
        return out

    def ranks(self) -> list[int]:
        return [max(p.rank for p in a.pairs.values()) for a in self.adapters]

    def close(self) -> None:
        for a in self.adapters:
            a.close()
        self.base.close()

    def __enter__(self) -> ExpertSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

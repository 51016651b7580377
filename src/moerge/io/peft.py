"""A PEFT LoRA adapter folder as data: its factors, scales, targets and fully stored tensors.

Reads ``adapter_config.json`` and the names and shapes of ``adapter_model.safetensors``;
no tensor bytes until asked. :mod:`moerge.io.lora_view` turns an adapter and its
base model into the full model it stands for.

Conventions (PEFT's): ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
rsLoRA; ``rank_pattern`` and ``alpha_pattern`` override ``r`` and ``lora_alpha``
for the first key that matches a module (its name, a dotted suffix, or a regex);
``fan_in_fan_out`` (GPT-2's Conv1D) and embedding adapters store ΔW transposed.
DoRA and other PEFT types are refused: their ΔW is not B·A.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moerge.errors import CheckpointError
from moerge.io.containment import member
from moerge.io.safetensors_format import SafetensorsReader
from moerge.io.sources import ADAPTER_CONFIG
from moerge.io.untrusted import expect, read_json_object

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    a: str  # tensor names in the adapter file
    b: str
    scale: float
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D) and embeddings: ΔW = (B·A)ᵀ
    rank: int  # the rank the config gives this module (its scale depends on it)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module's name (suffix or regex)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or _fullmatch(key, module):
            return value
    return default


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error as e:
        raise CheckpointError(f"the adapter's pattern {pattern!r} is not a valid regular expression ({e})") from None


def _names(value: Any, where: str, what: str) -> str | list[str] | None:
    """``target_modules`` / ``exclude_modules``: None, a regular expression, or a list of names."""
    if value is None or isinstance(value, str):
        return value
    names = expect(value, list, where, what)
    for n in names:
        expect(n, str, where, f"an entry of {what}")
    return names


def targeted(cfg: dict[str, Any], module: str) -> bool:
    """Whether PEFT would put a LoRA layer on ``module`` under this config (PEFT 0.21's
    ``check_target_module_exists``: ``exclude_modules``, ``target_modules`` as a full-match regular
    expression or as names matched exactly or as a dotted suffix, ``layers_to_transform`` with
    ``layers_pattern`` for name lists, ``all-linear`` for any layer but the output head). PEFT loads the
    factors of other modules as unexpected keys and drops them, so a merge that used them would differ
    from the model PEFT builds."""
    exclude, targets = cfg.get("exclude_modules"), cfg.get("target_modules")
    if isinstance(exclude, str) and _fullmatch(exclude, module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.get("modules_to_save") or []):
        return False  # PEFT never puts an adapter on a module it saves in full
    if isinstance(exclude, list) and (module in exclude or any(module.endswith("." + e) for e in exclude)):
        return False
    if targets is None:  # PEFT's per-architecture defaults: not checked here
        return True
    if isinstance(targets, str):
        return module.rsplit(".", 1)[-1] != "lm_head" if targets == "all-linear" else _fullmatch(targets, module)
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if patterns:
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    else:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    if found is None:
        return False
    index = int(found.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _read_config(folder: Path, allow_external_files: bool) -> dict[str, Any]:
    cfg_path = member(folder, ADAPTER_CONFIG, allow_external_files=allow_external_files)
    if cfg_path is None:
        raise CheckpointError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    cfg = read_json_object(cfg_path)
    for key, kind, low in (("r", int, 1), ("lora_alpha", (int, float), None)):
        if key in cfg:
            value = expect(cfg[key], kind, str(cfg_path), repr(key))
            if low is not None and value < low:
                raise CheckpointError(f"{cfg_path}: {key!r} must be at least {low}, found {value}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = expect(cfg.get(key) or {}, dict, str(cfg_path), repr(key))
        for module, value in patterns.items():
            expect(value, int if key == "rank_pattern" else (int, float), str(cfg_path), f"{key}[{module!r}]")
            if key == "rank_pattern" and value < 1:
                raise CheckpointError(f"{cfg_path}: {key}[{module!r}] must be at least 1, found {value}")
    expect(cfg.get("base_model_name_or_path") or "", str, str(cfg_path), "'base_model_name_or_path'")
    for key in ("target_modules", "exclude_modules"):
        _names(cfg.get(key), str(cfg_path), repr(key))
    layers = cfg.get("layers_to_transform")
    if layers is not None and not isinstance(layers, int) or isinstance(layers, bool):
        for n in expect(layers, list, str(cfg_path), "'layers_to_transform'"):
            expect(n, int, str(cfg_path), "an entry of 'layers_to_transform'")
    pattern = cfg.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str):
        for n in expect(pattern, list, str(cfg_path), "'layers_pattern'"):
            expect(n, str, str(cfg_path), "an entry of 'layers_pattern'")
    saved = cfg.get("modules_to_save")
    if saved is not None:
        for n in expect(saved, list, str(cfg_path), "'modules_to_save'"):
            expect(n, str, str(cfg_path), "an entry of 'modules_to_save'")
    for value in ([pattern] if isinstance(pattern, str) else pattern or []) + list(saved or []):
        try:  # PEFT puts these in regular expressions as they are
            re.compile(value)
        except re.error as e:
            raise CheckpointError(f"{cfg_path}: {value!r} is not a valid regular expression ({e})") from None
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(f"{cfg_path}: PEFT type {kind} is not supported (only LoRA adapters)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (their magnitude vector rescales "
                              "whole columns, so ΔW is not B·A)")
    if not cfg.get("base_model_name_or_path"):
        raise CheckpointError(f"{cfg_path}: no base_model_name_or_path; cannot expand the adapter")
    return cfg


class PeftAdapter:
    """One LoRA adapter folder: ``pairs`` (adapted weight name → its factors and scale) and ``full``
    (base tensor name → the adapter tensor stored in full: ``modules_to_save``, trained biases)."""

    def __init__(self, folder: Path, *, allow_external_files: bool = False) -> None:
        cfg = _read_config(folder, allow_external_files)
        weights = member(folder, ADAPTER_WEIGHTS, allow_external_files=allow_external_files)
        if weights is None:
            bin_file = folder / "adapter_model.bin"
            hint = "convert it to safetensors" if bin_file.exists() else None
            raise CheckpointError(f"{folder}: adapter has no {ADAPTER_WEIGHTS}", hint=hint)
        self.folder = folder
        self.weights = weights
        self.base_ref: str = cfg["base_model_name_or_path"]
        self.reader = SafetensorsReader(weights)
        self.pairs: dict[str, LoraPair] = {}
        self.full: dict[str, str] = {}
        try:
            self._scan(cfg)
        except BaseException:
            self.reader.close()
            raise

    def _scan(self, cfg: dict[str, Any]) -> None:
        r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rs = bool(cfg.get("use_rslora"))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        names = set(self.reader.entries)
        for name in sorted(names):
            if not name.startswith(PREFIX):
                raise CheckpointError(f"{self.weights}: unexpected tensor {name!r} (PEFT names start with {PREFIX!r})")
            key = name[len(PREFIX):]
            m = re.fullmatch(r"(.+)\.lora_(A|embedding_A)(?:\.[^.]+)?(\.weight)?", key)
            if m:
                module = m.group(1)
                if not targeted(cfg, module):
                    raise CheckpointError(
                        f"{self.weights}: holds LoRA factors of {module!r}, which the target_modules of "
                        f"{self.folder / ADAPTER_CONFIG} do not select; PEFT would drop them and build another "
                        "model than the one merged", hint="fix target_modules (or remove the stray factors)")
                b_name = name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
                if b_name not in names:
                    raise CheckpointError(f"{self.weights}: {name!r} has no matching {b_name!r}")
                r = int(_pattern_value(rank_pat, module, r0))
                alpha = float(_pattern_value(alpha_pat, module, alpha0))
                scale = alpha / (math.sqrt(r) if rs else r)
                embedding = m.group(2) == "embedding_A"
                self.pairs[module + ".weight"] = LoraPair(name, b_name, scale, embedding or fan_in_fan_out, r)
            elif re.search(r"\.lora_(B|embedding_B)", key):
                a_name = name.replace("lora_B", "lora_A").replace("lora_embedding_B", "lora_embedding_A")
                if a_name not in names:
                    raise CheckpointError(f"{self.weights}: {name!r} has no matching {a_name!r}")
            elif "lora_magnitude" in key:
                raise CheckpointError(f"{self.weights}: {name!r} is a DoRA magnitude; DoRA is not supported")
            else:  # modules_to_save / trained bias: a full replacement tensor
                self.full[key.replace(".modules_to_save.default", "")] = name

    def factor_shapes(self, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B of an adapted weight."""
        pair = self.pairs[target]
        return self.reader.entries[pair.a].shape, self.reader.entries[pair.b].shape

    def close(self) -> None:
        self.reader.close()

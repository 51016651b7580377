"""Loading a model folder (full weights, or a PEFT adapter merged into its base) and task heads."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moerge.io.containment import member
from moerge.io.sources import is_adapter_folder


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrapping a model with PEFT reads transformers' deprecated ``is_gradient_checkpointing`` and prints a
    FutureWarning on every call that users can do nothing about; this hides that one warning only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def files_hash(folder: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "adapter_config.json",
                                                          "config.json", "moerge_routing.json")) -> str:
    """blake2b of the weight files of a folder (names and bytes), 16 hex digits; each file state is
    hashed once per process (a model scored on many tasks is not re-read for each)."""
    files = [f for pattern in patterns for f in sorted(folder.glob(pattern))]
    return _hash_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=256)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name, _, _ in files:
        h.update(Path(name).name.encode())
        with open(name, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def check_files(folder: Path, *, allow_external_files: bool = False) -> None:
    """Before ``transformers`` reads ``folder``: its weights, index, config and tokenizer files (and its
    base's, for an adapter) are regular files inside their folders, and none is a pickle
    (:mod:`moerge.io.containment`); ``from_pretrained`` itself would follow any of them anywhere."""
    from moerge.io.checkpoint import open_source
    from moerge.io.sidefiles import TOKENIZER_FILES

    with open_source(folder, allow_external_files=allow_external_files) as source:
        for name in ("config.json", *TOKENIZER_FILES):
            source.side_file(name)
        if is_adapter_folder(folder):
            for name in TOKENIZER_FILES:
                member(folder, name, allow_external_files=allow_external_files)


def load_model(folder: Path, track: str, *, allow_external_files: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a full folder or a PEFT adapter folder (merged into its base), float32, in
    eval mode. ``track``: ``decoder`` (a causal LM with its head) or ``encoder`` (the bare encoder)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if track == "decoder" else AutoModel
    check_files(folder, allow_external_files=allow_external_files)
    if is_adapter_folder(folder):
        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        with quiet_peft():
            model = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), str(folder))
        model = model.merge_and_unload()
        tok_dir = folder if (folder / "tokenizer_config.json").exists() else Path(base)
    else:
        model, tok_dir = cls.from_pretrained(str(folder), dtype=torch.float32), folder
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(tok_dir))


def save_head(head: torch.nn.Linear, path: Path, task: str) -> None:
    """A task's linear head as ``head.safetensors`` (weight, bias; the task in the metadata)."""
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(path), metadata={"task": task})


def load_head(path: Path) -> torch.nn.Linear:
    from safetensors.torch import load_file

    t = load_file(str(path))
    head = torch.nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(t["weight"])
        head.bias.copy_(t["bias"])
    return head

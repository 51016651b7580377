"""A model's tokenizer, read as data: its token → id map cheaply from ``tokenizer.json``, or the whole
tokenizer through ``transformers`` (fast tokenizers only, never remote code) when one must be built.

Only files inside the model folder are read (:meth:`TensorSource.side_file`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import CheckpointError

if TYPE_CHECKING:
    from moerge.io.sources import TensorSource

MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def tokenizer_dir(source: TensorSource) -> Path | None:
    """The folder of ``source``'s tokenizer files, or None when it has none."""
    for name in MARKERS:
        if (p := source.side_file(name)) is not None:
            return p.parent
    return None


def fast_vocab(source: TensorSource) -> dict[str, int] | None:
    """Token → id of ``source``'s ``tokenizer.json`` (model vocabulary and added tokens), without loading
    ``transformers``; None when there is no such file or it is not one ``tokenizers`` wrote."""
    p = source.side_file("tokenizer.json")
    if p is None:
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            out = {str(k): int(v) for k, v in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            out = {str(e[0]): i for i, e in enumerate(vocab)}
        else:
            return None
        for t in data.get("added_tokens") or []:
            out[str(t["content"])] = int(t["id"])
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def load_tokenizer(source: TensorSource) -> Any:
    """``source``'s tokenizer through ``transformers`` (fast, no remote code)."""
    folder = tokenizer_dir(source)
    if folder is None:
        raise CheckpointError(f"{source.ref}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)",
                              hint="copy the tokenizer of the model it was fine-tuned from into its folder")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many kinds; name the folder once
        raise CheckpointError(f"{folder}: the tokenizer cannot be loaded ({type(err).__name__}: {err})",
                              hint="a tokenizer that needs remote code is refused; moerge never runs it") from None


def chat_template(source: TensorSource) -> str | None:
    """``source``'s chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s), or None."""
    if (p := source.side_file("chat_template.jinja")) is not None:
        try:
            return p.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    if (p := source.side_file("tokenizer_config.json")) is not None:
        try:
            t = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
        return t.strip() if isinstance(t, str) and t.strip() else None
    return None

